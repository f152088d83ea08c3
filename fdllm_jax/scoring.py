"""compute_logits: full-sequence logits for parity checks and log-likelihood scoring."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fdllm_jax import masks as masks_lib
from fdllm_jax.model import Transformer


def check_token_ids(ids, vocab_size: int, what: str = "input_ids") -> None:
  """Raises ValueError naming the first id outside [0, vocab_size)."""
  ids = np.asarray(ids)
  bad = (ids < 0) | (ids >= vocab_size)
  if bad.any():
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(f"{what}: token id {int(ids[where])} at index {where} is outside the "
                     f"vocabulary [0, {vocab_size})")


def compute_logits(model: Transformer, input_ids, *, attention: str = "causal",
                   block_size: int = 32) -> jax.Array:
  """Logits float32 [batch, seq, vocab] of ``input_ids`` [batch, seq] (or [seq]).

  Args:
    model: a loaded ``Transformer``.
    input_ids: integer token ids.
    attention: "causal" (AR models) or "block_causal" (Fast-dLLM v2, bidirectional in blocks).
    block_size: the block size of "block_causal".
  """
  ids = np.asarray(input_ids)
  if ids.ndim == 1:
    ids = ids[None]
  if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"input_ids must be a non-empty integer array [batch, seq]; got dtype "
                     f"{ids.dtype} and shape {ids.shape}")
  check_token_ids(ids, model.config.vocab_size)
  mask = masks_lib.by_name(attention, block_size)
  return _logits(model, jnp.asarray(ids, jnp.int32), mask)


@functools.partial(nnx.jit, static_argnames=("mask",))
def _logits(model, ids_BxT, mask):
  logits, _ = model(ids_BxT, mask=mask)
  return logits.astype(jnp.float32)
