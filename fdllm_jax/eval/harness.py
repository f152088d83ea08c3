"""Evaluation harness: prompts -> generate -> score, per-sample JSONL, summaries, threshold sweeps.

The generation backend is any callable ``generate_fn(prompts: list[list[int]]) -> output`` whose
output has ``tokens`` (generated ids per row) and ``num_forwards`` (model forwards of the call),
like ``fdllm_jax.GenerateOutput``; ``evaluate`` times each call itself. The command line
(``python -m fdllm_jax.eval``, see ``main``) builds it from ``fdllm_jax.generate`` /
``fdllm_jax.generate_ar``.

Output of one run, in ``OUT/<run name>/``:
  samples.jsonl  one line per sample: index, id, prompt (the user turn), prompt_tokens, output,
                 extracted, correct (+ gold for GSM8K; status / detail for HumanEval), tokens
                 (generated, up to the stop token), forwards and seconds of the generate call
                 the sample was part of (shared by its ``batch_rows`` rows), finished;
  summary.json   accuracy, tokens/s, tokens per forward and the run's configuration.
``OUT/summary.json`` lists every run; with more than one run ``OUT/sweep.png`` plots accuracy
against tokens/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

from fdllm_jax.eval import data, gsm8k, humaneval
from fdllm_jax import cli
from fdllm_jax.eval.throughput import Throughput, truncate_at_stop

# What Qwen2.5-Instruct's own chat template inserts when the conversation has no system turn;
# the reference applies that template, so our default prompt matches it token for token.
QWEN25_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

GenerateFn = Callable[[list[list[int]]], Any]


@dataclasses.dataclass(frozen=True)
class Task:
  """How to prompt and score one benchmark."""

  name: str
  load: Callable[[str | None], list[dict]]
  messages: Callable[[dict, str | None], list[dict]]  # (row, system prompt) -> chat messages
  assistant_prefix: str  # text the assistant turn starts with (encoded after the chat prompt)
  sample_id: Callable[[dict, int], str]
  score: Callable[..., dict]  # (row, output text, **score_kwargs) -> {extracted, correct, ...}


TASKS = {
    "gsm8k": Task("gsm8k", data.load_gsm8k, gsm8k.row_messages, "",
                  lambda row, i: f"gsm8k/{i}", gsm8k.score),
    "humaneval": Task("humaneval", data.load_humaneval, humaneval.build_messages,
                      humaneval.ASSISTANT_PREFIX, lambda row, i: row["task_id"],
                      humaneval.score),
}


def encode_prompt(task: Task, row: dict, tokenizer,
                  system_prompt: str | None = None) -> tuple[str, list[int]]:
  """(user-turn text, prompt ids): the chat template with a generation prompt, then the
  task's assistant pre-fill."""
  messages = task.messages(row, system_prompt)
  ids = [int(t) for t in tokenizer.apply_chat_template(messages)]
  if task.assistant_prefix:
    ids += [int(t) for t in tokenizer.encode(task.assistant_prefix)]
  return messages[-1]["content"], ids


def evaluate(task: Task, rows: Sequence[dict], tokenizer, generate_fn: GenerateFn, *,
             out_dir: str, batch_size: int = 1, stop_ids: Sequence[int] = (),
             system_prompt: str | None = None, warmup: bool = True, progress: bool = True,
             run_name: str = "run", config: dict | None = None,
             score_kwargs: dict | None = None) -> dict:
  """Generates and scores every row, writes ``samples.jsonl`` and ``summary.json`` to
  ``out_dir``, and returns the summary.

  Rows go to ``generate_fn`` in order, ``batch_size`` at a time. With ``warmup`` the first
  batch is generated once before timing starts, so compilation is not counted as decoding
  time; a later call's ``compile_seconds`` (a new shape bucket), when the backend reports it,
  is subtracted from its wall time and summed in the summary.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1; got {batch_size}")
  from tqdm.auto import tqdm

  os.makedirs(out_dir, exist_ok=True)
  score_kwargs = dict(score_kwargs or {})
  prompts = [encode_prompt(task, row, tokenizer, system_prompt) for row in rows]
  batches = [list(range(i, min(i + batch_size, len(rows)))) for i in range(0, len(rows),
                                                                           batch_size)]
  warmup_seconds = None
  if warmup and batches:
    start = time.perf_counter()
    generate_fn([prompts[i][1] for i in batches[0]])
    warmup_seconds = time.perf_counter() - start

  meter, correct, finished_rows, score_seconds, compile_seconds = Throughput(), 0, 0, 0.0, 0.0
  samples_path = os.path.join(out_dir, "samples.jsonl")
  with open(samples_path, "w", encoding="utf-8") as f, tqdm(
      total=len(rows), desc=run_name, unit="sample", disable=not progress,
      dynamic_ncols=True) as bar:
    for batch in batches:
      start = time.perf_counter()
      output = generate_fn([prompts[i][1] for i in batch])
      # wall time of the call, less the compilation the backend reports (a new shape bucket)
      compile_s = float(getattr(output, "compile_seconds", 0.0) or 0.0)
      seconds = max(0.0, time.perf_counter() - start - compile_s)
      compile_seconds += compile_s
      row_tokens = _row_tokens(output, len(batch), stop_ids)
      forwards = int(getattr(output, "num_forwards", 0) or 0)
      finished = list(getattr(output, "finished", None) or [None] * len(batch))
      device_rows = getattr(output, "batch_rows", None) or len(batch)  # fewer when streamed
      meter.add_batch([len(t) for t in row_tokens], seconds, forwards, device_rows)
      for j, i in enumerate(batch):
        text = tokenizer.decode(row_tokens[j])
        start = time.perf_counter()
        scored = task.score(rows[i], text, **score_kwargs)
        score_seconds += time.perf_counter() - start
        correct += bool(scored["correct"])
        finished_rows += bool(finished[j])
        record = {"index": i, "id": task.sample_id(rows[i], i), "prompt": prompts[i][0],
                  "prompt_tokens": len(prompts[i][1]), "output": text, **scored,
                  "correct": bool(scored["correct"]), "tokens": len(row_tokens[j]),
                  "forwards": forwards, "seconds": round(seconds, 4),
                  "batch_rows": device_rows, "finished": finished[j]}
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
      f.flush()
      done = batch[-1] + 1
      bar.update(len(batch))
      bar.set_postfix(acc=f"{correct / done:.1%}", tok_s=f"{meter.tokens_per_s:.1f}",
                      tpf=f"{meter.tokens_per_forward:.2f}")

  summary = {"task": task.name, "run": run_name, "n": len(rows), "correct": correct,
             "accuracy": correct / len(rows) if rows else 0.0, **meter.as_dict(),
             "finished_fraction": finished_rows / len(rows) if rows else 0.0,
             "batch_size": batch_size,
             "warmup_seconds": None if warmup_seconds is None else round(warmup_seconds, 3),
             "compile_seconds": round(compile_seconds, 3),
             "score_seconds": round(score_seconds, 3), "config": config or {},
             "counting": "tokens up to the stop token (excluded); seconds = wall time of the "
                         "generate calls incl. prefill, less reported compilation; warm-up "
                         "call excluded",
             "samples": os.path.abspath(samples_path)}
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def _row_tokens(output, rows: int, stop_ids) -> list[list[int]]:
  tokens = getattr(output, "tokens", None)
  if tokens is None or len(tokens) != rows:
    raise ValueError(f"generate_fn returned {None if tokens is None else len(tokens)} rows of "
                     f"tokens for a batch of {rows} prompts")
  return [truncate_at_stop(t, stop_ids) for t in tokens]


def plot_sweep(summaries: Sequence[dict], path: str, title: str = "") -> str:
  """PNG of accuracy against tokens/s: threshold runs as a line, AR runs as stars (Agg only)."""
  from fdllm_jax import viz
  viz.plot_accuracy_vs_speed(
      summaries, path, title=title or "accuracy vs throughput",
      xlabel="tokens / s (generated tokens up to stop, wall time incl. prefill)")
  return path


# ----------------------------------------------------------------------------- command line

@dataclasses.dataclass(frozen=True)
class RunPlan:
  """One decoding setting of a sweep."""

  name: str  # output sub-directory
  kind: str  # 'dllm' (fdllm_jax.generate) or 'ar' (fdllm_jax.generate_ar)
  threshold: float | None = None


def _threshold(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"threshold must be a number in (0, 1]; got {text!r}")
  if not 0.0 < value <= 1.0:
    raise argparse.ArgumentTypeError(f"threshold must be in (0, 1]; got {value}")
  return value


def _positive(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}")
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer; got {value}")
  return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m fdllm_jax.eval",
      description="Accuracy and throughput of Fast-dLLM v2 decoding on GSM8K / HumanEval, with "
                  "the reference's protocol (chat template, greedy, block 32, sub-block 8).")
  parser.add_argument("--model", required=True, help="checkpoint directory or hub id")
  parser.add_argument("--tokenizer", help="tokenizer directory or hub id (default: --model)")
  parser.add_argument("--task", required=True, choices=sorted(TASKS))
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--data", help="local .jsonl / .jsonl.gz with the task's rows (default: "
                      "the bundled GSM8K test split / HumanEval)")
  parser.add_argument("--limit", type=_positive, help="evaluate the first N rows only")
  parser.add_argument("--threshold", type=_threshold, nargs="+",
                      help="confidence threshold(s); several = a sweep with a plot (default "
                           "1.0, the reference's accuracy setting; 0.9 is its speed setting)")
  parser.add_argument("--ar", action="store_true",
                      help="autoregressive baseline (alone, or beside --threshold runs)")
  parser.add_argument("--block_size", type=_positive, help="default 32")
  parser.add_argument("--sub_block_size", type=_positive, help="default 8")
  parser.add_argument("--dual_cache", action="store_true", help="sub-block DualCache")
  parser.add_argument("--batch_size", type=_positive, default=1,
                      help="prompts per generate call (one batch, or see --max_batch_size)")
  parser.add_argument("--max_batch_size", type=_positive,
                      help="device rows per call: with --batch_size above it, the call's "
                           "prompts stream through this many rows (an ended row takes the next "
                           "prompt) instead of waiting for the slowest row of one batch")
  parser.add_argument("--max_new_tokens", type=_positive, default=2048)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--system_prompt", default=QWEN25_SYSTEM_PROMPT,
                      help="system turn ('' for none; default: Qwen2.5's default system prompt)")
  parser.add_argument("--timeout", type=float, default=10.0,
                      help="HumanEval: seconds per problem's tests")
  parser.add_argument("--memory_mb", type=_positive, default=2048,
                      help="HumanEval: address-space limit of the test process, MiB")
  parser.add_argument("--no_warmup", action="store_true",
                      help="time the first batch too (compilation included)")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)
  if args.ar and not args.threshold:
    # flags only block-diffusion runs read: with --ar alone they would be ignored silently
    ignored = [f"--{name}" for name in ("block_size", "sub_block_size", "dual_cache")
               if getattr(args, name)]
    if ignored:
      parser.error(f"with --ar alone, {' '.join(ignored)} would be ignored: block-diffusion "
                   "runs read them (add --threshold to run one beside AR)")
  args.block_size = 32 if args.block_size is None else args.block_size
  args.sub_block_size = 8 if args.sub_block_size is None else args.sub_block_size
  if args.block_size % args.sub_block_size:
    parser.error(f"--sub_block_size {args.sub_block_size} must divide --block_size "
                 f"{args.block_size}")
  if not args.timeout > 0:
    parser.error(f"--timeout must be > 0; got {args.timeout}")
  return args


def plan_runs(args: argparse.Namespace) -> list[RunPlan]:
  """The runs a command line asks for: one per threshold, plus AR with ``--ar``."""
  thresholds = args.threshold if args.threshold else ([] if args.ar else [1.0])
  plans = [RunPlan(f"threshold_{t:g}", "dllm", t) for t in dict.fromkeys(thresholds)]
  if args.ar:
    plans.append(RunPlan("ar", "ar"))
  return plans


def load_backend(args: argparse.Namespace):
  """(tokenizer, model) of the command line."""
  import fdllm_jax

  tokenizer = fdllm_jax.load_tokenizer(args.tokenizer or args.model)
  model = fdllm_jax.load_model(args.model, dtype=args.dtype)
  return tokenizer, model


def _decoding_api():
  """``fdllm_jax.generate``'s module (its functions whether or not the package re-exports them)."""
  import importlib
  return importlib.import_module("fdllm_jax.generate")


def make_generate_fn(model, tokenizer, plan: RunPlan,
                     args: argparse.Namespace) -> tuple[GenerateFn, dict]:
  """(generate_fn, configuration to record) of one run."""
  fdllm_jax = _decoding_api()
  stop_ids = tuple(int(s) for s in tokenizer.stop_ids)
  max_batch_size = getattr(args, "max_batch_size", None)
  if plan.kind == "ar":
    config = {"kind": "ar", "max_new_tokens": args.max_new_tokens, "stop_ids": stop_ids,
              "temperature": 0.0, "seed": args.seed, "max_batch_size": max_batch_size}

    def generate_ar(prompts):
      return fdllm_jax.generate_ar(model, prompts, max_new_tokens=args.max_new_tokens,
                                   stop_ids=stop_ids, temperature=0.0, seed=args.seed,
                                   max_batch_size=max_batch_size)
    return generate_ar, config
  decode_config = fdllm_jax.DecodeConfig(
      block_size=args.block_size, sub_block_size=args.sub_block_size, threshold=plan.threshold,
      max_new_tokens=args.max_new_tokens, temperature=0.0, mask_id=int(tokenizer.mask_id),
      stop_ids=stop_ids, use_dual_cache=args.dual_cache, seed=args.seed)

  def generate(prompts):
    return fdllm_jax.generate(model, prompts, decode_config, max_batch_size=max_batch_size)
  config = {"kind": "dllm", **dataclasses.asdict(decode_config),
            "max_batch_size": max_batch_size}
  return generate, config


def _device() -> str:
  try:
    import jax
    device = jax.devices()[0]
    return f"{device.platform}:{getattr(device, 'device_kind', '')}"
  except Exception:  # noqa: BLE001 -- informational only
    return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    return _run(args, argv)
  except (data.DataError, *cli.USER_ERRORS) as e:  # a bad path, value or model: one line
    print(f"error: {e}", file=sys.stderr)
    return 2


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
  task = TASKS[args.task]
  if os.path.exists(args.out) and not os.path.isdir(args.out):
    raise ValueError(f"--out {args.out!r} is a file; give a directory for the results")
  rows = data.load_task_data(args.task, args.data, args.limit)
  plans = plan_runs(args)
  os.makedirs(args.out, exist_ok=True)  # before the model loads: a bad --out fails at once
  tokenizer, model = load_backend(args)
  score_kwargs = ({"timeout_s": args.timeout, "memory_mb": args.memory_mb}
                  if args.task == "humaneval" else {})
  summaries = []
  for plan in plans:
    generate_fn, config = make_generate_fn(model, tokenizer, plan, args)
    summary = evaluate(task, rows, tokenizer, generate_fn,
                       out_dir=os.path.join(args.out, plan.name), batch_size=args.batch_size,
                       stop_ids=tokenizer.stop_ids, system_prompt=args.system_prompt or None,
                       warmup=not args.no_warmup, progress=not args.no_progress,
                       run_name=plan.name, config=config, score_kwargs=score_kwargs)
    summary.update(kind=plan.kind, threshold=plan.threshold, model=args.model,
                   data=args.data or "bundled", device=_device())
    with open(os.path.join(args.out, plan.name, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
    summaries.append(summary)
    print(f"{plan.name}: accuracy {summary['accuracy']:.2%} ({summary['correct']}/"
          f"{summary['n']}), {summary['tokens_per_s']:.1f} tokens/s, "
          f"{summary['tokens_per_forward']:.2f} tokens/forward", file=sys.stderr)
  overview = {"task": args.task, "model": args.model,
              "argv": list(sys.argv[1:] if argv is None else argv), "runs": summaries}
  if len(summaries) > 1:
    model_name = os.path.basename(args.model.rstrip("/"))
    overview["plot"] = plot_sweep(summaries, os.path.join(args.out, "sweep.png"),
                                  f"{args.task}: accuracy vs tokens/s ({model_name})")
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump(overview, f, indent=2)
  return 0
