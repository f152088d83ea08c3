"""Task harnesses (GSM8K, HumanEval) with the reference's protocol and honest throughput.

Command line: ``python -m fdllm_jax.eval --model PATH --task gsm8k --out DIR`` (see
``harness.parse_args``). Library: ``harness.evaluate`` with any ``generate_fn``;
``gsm8k.extract_answer``; ``humaneval.check``; ``sandbox.run_python``.
"""

from fdllm_jax.eval import data, gsm8k, humaneval, sandbox, throughput
from fdllm_jax.eval.harness import TASKS, Task, evaluate, plot_sweep

__all__ = ["TASKS", "Task", "data", "evaluate", "gsm8k", "humaneval", "plot_sweep", "sandbox",
           "throughput"]
