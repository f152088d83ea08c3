"""KVCache: a pytree of per-layer keys and values with a static maximum length.

The model writes new keys/values at slots chosen by the caller and never moves ``lengths``
itself: the decoding engine decides what is committed (a block-diffusion step writes its
window's K/V into slots past ``lengths`` and leaves them uncommitted, to be overwritten by the
next step; a block commit advances ``lengths``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
  """keys/values: one [B, max_len, num_kv_heads, head_dim] array per layer; lengths: int32[B]."""

  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]
  lengths: jax.Array

  @classmethod
  def init(cls, config, batch_size: int, max_len: int, dtype=jnp.float32) -> "KVCache":
    """An empty cache for ``config`` (a ModelConfig)."""
    shape = (batch_size, max_len, config.num_key_value_heads, config.head_dim)
    zeros = lambda: jnp.zeros(shape, dtype)
    layers = config.num_hidden_layers
    return cls(keys=tuple(zeros() for _ in range(layers)),
               values=tuple(zeros() for _ in range(layers)),
               lengths=jnp.zeros((batch_size,), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.keys[0].shape[1]

  @property
  def batch_size(self) -> int:
    return self.keys[0].shape[0]

  def with_lengths(self, lengths_B) -> "KVCache":
    return self.replace(lengths=jnp.broadcast_to(jnp.asarray(lengths_B, jnp.int32),
                                                 self.lengths.shape))


def write(cache_BxSxKxD: jax.Array, new_BxTxKxD: jax.Array, start) -> jax.Array:
  """Writes T consecutive slots per row, from ``start`` (a scalar shared by all rows, or int32[B]).

  A scalar start (every write of a batch of one row, and the prefill) is one dynamic update
  slice; per-row starts (each row's own block window, the AR baseline on ragged prompts) become
  a per-row update.
  """
  new_BxTxKxD = new_BxTxKxD.astype(cache_BxSxKxD.dtype)
  start = jnp.asarray(start, jnp.int32)
  zero = jnp.zeros((), jnp.int32)  # not a Python 0: int64 under jax_enable_x64
  if start.ndim == 0:
    return jax.lax.dynamic_update_slice(cache_BxSxKxD, new_BxTxKxD, (zero, start, zero, zero))
  update_row = lambda c, n, s: jax.lax.dynamic_update_slice(c, n, (s, zero, zero))
  return jax.vmap(update_row)(cache_BxSxKxD, new_BxTxKxD, start)
