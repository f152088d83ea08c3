"""One attention entry point, several implementations.

``attention(q, k, v, mask=..., q_offset=..., kv_lengths=...)`` computes softmax attention with
grouped-query heads. Query ``t`` of row ``b`` has index ``q_offset[b] + t`` in the key sequence;
key ``s`` is visible when ``mask(q_index, s)`` holds and ``s < kv_lengths[b]``.

``implementation="xla"`` is the reference every other path is tested against: scores and
softmax in float32, probabilities cast to the value dtype before the second matmul (as the
Hugging Face eager path does).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from fdllm_jax import masks as masks_lib

Implementation = Literal["xla", "pallas", "triton", "cudnn"]
IMPLEMENTATIONS = ("xla", "pallas", "triton", "cudnn")

# Finite, so a query with no visible key yields a uniform average instead of NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def default_implementation() -> str:
  """The implementation used when none is named: the reference until a kernel is faster."""
  return "xla"


def visibility(mask, num_queries: int, num_keys: int, q_offset_B=None, kv_lengths_B=None):
  """Boolean [B or 1, T, S]: which keys each query may attend to."""
  q_idx_T = jnp.arange(num_queries, dtype=jnp.int32)
  k_idx_S = jnp.arange(num_keys, dtype=jnp.int32)
  if q_offset_B is None:
    q_idx_BxT = q_idx_T[None, :]
  else:
    q_idx_BxT = jnp.asarray(q_offset_B, jnp.int32)[:, None] + q_idx_T[None, :]
  allowed = mask(q_idx_BxT[:, :, None], k_idx_S[None, None, :])
  if allowed.ndim == 2:
    allowed = allowed[None]
  if kv_lengths_B is not None:
    in_range_BxS = k_idx_S[None, :] < jnp.asarray(kv_lengths_B, jnp.int32)[:, None]
    allowed = allowed & in_range_BxS[:, None, :]
  return allowed


def xla_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, *, mask, q_offset_B=None,
                  kv_lengths_B=None, sm_scale=None):
  """Reference attention in plain jnp (any backend)."""
  batch, num_q, num_heads, head_dim = q_BxTxHxD.shape
  num_kv_heads = k_BxSxKxD.shape[2]
  group = num_heads // num_kv_heads
  scale = head_dim ** -0.5 if sm_scale is None else sm_scale
  q_BxTxKxGxD = q_BxTxHxD.reshape(batch, num_q, num_kv_heads, group, head_dim)
  scores = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxD, k_BxSxKxD,
                      preferred_element_type=jnp.float32) * scale
  allowed_BxTxS = visibility(mask, num_q, k_BxSxKxD.shape[1], q_offset_B, kv_lengths_B)
  scores = jnp.where(allowed_BxTxS[:, None, None], scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxKxD.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v_BxSxKxD,
                   preferred_element_type=jnp.float32)
  return out.reshape(batch, num_q, num_heads, head_dim).astype(q_BxTxHxD.dtype)


def attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, *, mask=masks_lib.Causal(), q_offset_B=None,
              kv_lengths_B=None, sm_scale=None, implementation: str | None = None):
  """Grouped-query attention; see the module docstring for the index conventions.

  Args:
    q_BxTxHxD: queries, H a multiple of K.
    k_BxSxKxD, v_BxSxKxD: keys and values.
    mask: a mask of ``fdllm_jax.masks``.
    q_offset_B: int32[B], index of each row's first query in the key sequence (default 0).
    kv_lengths_B: int32[B], number of valid keys per row (default all S).
    sm_scale: softmax scale (default 1/sqrt(D)).
    implementation: "xla" (reference), "pallas", "triton" or "cudnn"; None picks the default
      for the backend.
  """
  _check_shapes(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD)
  implementation = implementation or default_implementation()
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"attention implementation {implementation!r} is unknown; use one of {IMPLEMENTATIONS}")
  if implementation == "xla":
    return xla_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask=mask, q_offset_B=q_offset_B,
                         kv_lengths_B=kv_lengths_B, sm_scale=sm_scale)
  raise NotImplementedError(f"attention implementation {implementation!r} is not wired yet")


def _check_shapes(q, k, v):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"attention expects rank-4 q/k/v [B, T, H, D]; got {q.shape}, {k.shape}, "
                     f"{v.shape}")
  if k.shape != v.shape:
    raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
  if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
    raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head_dim")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
