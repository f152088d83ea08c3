"""``python -m fdllm_jax.eval``: see ``fdllm_jax.eval.harness.main``."""

import sys

from fdllm_jax.eval.harness import main

if __name__ == "__main__":
  sys.exit(main())
