"""The bundled demo: a small model trained on generated arithmetic word problems, AR and adapted.

``models/demo/ar_base`` is the autoregressive base (stage 1, ``configs/demo_ar.gin``) and
``models/demo/fast_dllm`` the same model after the Fast-dLLM v2 block-diffusion fine-tuning
(stage 2, ``configs/demo_adapt.gin``); ``bash scripts/build_demo.sh`` rebuilds both.

    from fdllm_jax import demo
    model_dir = demo.FAST_DLLM_DIR        # Fast_dLLM_Qwen, bd_size 32
    question = demo.DEMO_QUESTION         # a held-out problem, for decode.py's default run
"""

from __future__ import annotations

import os

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_DIR = os.path.join(_REPO_ROOT, "models", "demo")
AR_BASE_DIR = os.path.join(DEMO_DIR, "ar_base")
FAST_DLLM_DIR = os.path.join(DEMO_DIR, "fast_dllm")

# A held-out problem (test split, seed 0: ``task.generate("test", 40, 0)[26]``) that both bundled
# models solve, in both decoding engines; decode.py's default run.
DEMO_QUESTION = ("Lily has 2 jars of cookies. Each jar has 8 cookies. Then the number of cookies "
                 "Lily has doubles. Lily buys 6 more cookies. How many cookies does Lily have now?")
DEMO_ANSWER = 38

__all__ = ["AR_BASE_DIR", "DEMO_ANSWER", "DEMO_DIR", "DEMO_QUESTION", "FAST_DLLM_DIR"]
