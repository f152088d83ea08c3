"""Attention masks as functions of token indices.

A mask answers "may query index q attend to key index k?" for integer index arrays that
broadcast against each other. Indices are positions in the *key sequence* (the KV-cache slot
when a cache is used), not RoPE positions: the training sequence x_t ++ x_0 reuses RoPE
positions 0..L-1 twice, yet its two halves are told apart by index.

Masks are frozen, hashable dataclasses, so they can be static arguments of jitted functions
and kernels can pattern-match their kind to skip tiles the mask hides.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Union

import jax.numpy as jnp
import numpy as np


class Mask(Protocol):
  """A static attention mask: ``mask(q_idx, k_idx) -> bool array`` (broadcast shapes)."""

  def __call__(self, q_idx: jnp.ndarray, k_idx: jnp.ndarray) -> jnp.ndarray:
    ...


@dataclasses.dataclass(frozen=True)
class Full:
  """Every query sees every key (restricted only by per-row key lengths when given)."""

  def __call__(self, q_idx, k_idx):
    return jnp.ones(jnp.broadcast_shapes(jnp.shape(q_idx), jnp.shape(k_idx)), bool)


@dataclasses.dataclass(frozen=True)
class Causal:
  """Autoregressive: ``k <= q``."""

  def __call__(self, q_idx, k_idx):
    return k_idx <= q_idx


@dataclasses.dataclass(frozen=True)
class BlockCausal:
  """Fast-dLLM v2 inference mask: bidirectional inside a block, causal across blocks."""

  block_size: int

  def __post_init__(self):
    _check_positive("block_size", self.block_size)

  def __call__(self, q_idx, k_idx):
    return (q_idx // self.block_size) >= (k_idx // self.block_size)


@dataclasses.dataclass(frozen=True)
class Training:
  """The 2L training mask over x_t (indices 0..L-1) ++ x_0 (indices L..2L-1), spec section 2.

  A noisy block sees itself and the clean blocks before it; the clean stream is block-causal.
  ``num_noisy_streams=2`` is the same mask over x_t^A ++ x_t^B ++ x_0 (3L indices): both views'
  noisy streams share one clean stream, which never attends to noisy tokens, so every noisy
  token sees exactly what it sees in its own 2L sequence (and the other view's noisy stream not
  at all).
  """

  block_size: int
  seq_len: int  # L, the length of one stream
  num_noisy_streams: int = 1

  def __post_init__(self):
    _check_positive("block_size", self.block_size)
    _check_positive("seq_len", self.seq_len)
    if self.num_noisy_streams not in (1, 2):
      raise ValueError(f"Training mask: num_noisy_streams must be 1 or 2; got "
                       f"{self.num_noisy_streams!r}")
    if self.seq_len % self.block_size:
      raise ValueError(
          f"Training mask: seq_len={self.seq_len} must be a multiple of block_size="
          f"{self.block_size}")

  @property
  def total_len(self) -> int:
    """Indices the mask spans: (noisy streams + 1) * L."""
    return (self.num_noisy_streams + 1) * self.seq_len

  def __call__(self, q_idx, k_idx):
    # Indices past the last stream count as clean, as in the 2L formula (padding).
    q_stream = jnp.minimum(q_idx // self.seq_len, self.num_noisy_streams)
    k_stream = jnp.minimum(k_idx // self.seq_len, self.num_noisy_streams)
    q_clean = q_stream == self.num_noisy_streams
    k_clean = k_stream == self.num_noisy_streams
    q_blk = (q_idx % self.seq_len) // self.block_size
    k_blk = (k_idx % self.seq_len) // self.block_size
    same_block_same_stream = (q_blk == k_blk) & (q_stream == k_stream)
    noisy_sees_earlier_clean = ~q_clean & k_clean & (q_blk > k_blk)
    clean_block_causal = q_clean & k_clean & (q_blk >= k_blk)
    return same_block_same_stream | noisy_sees_earlier_clean | clean_block_causal


class Explicit:
  """A user-given boolean array [..., T, S] (broadcastable to [batch, T, S]).

  Indexed by (q_idx, k_idx) when those are plain aranges; hashed by identity, so a jitted
  function that takes it as a static argument recompiles per mask object.
  """

  def __init__(self, allowed):
    allowed = jnp.asarray(allowed)
    if allowed.dtype != jnp.bool_ or allowed.ndim < 2:
      raise ValueError(
          f"Explicit mask must be a boolean array of rank >= 2 [..., T, S]; got dtype "
          f"{allowed.dtype} and shape {allowed.shape}")
    self.allowed = allowed

  def __call__(self, q_idx, k_idx):
    del q_idx, k_idx  # the array already is the answer for aranges
    return self.allowed


AnyMask = Union[Full, Causal, BlockCausal, Training, Explicit]


def dense(mask: Mask, num_queries: int, num_keys: int, q_offset: int = 0) -> np.ndarray:
  """The mask materialised as a numpy bool array [num_queries, num_keys] (tests, kernels)."""
  q_idx = np.arange(num_queries)[:, None] + q_offset
  k_idx = np.arange(num_keys)[None, :]
  return np.broadcast_to(np.asarray(mask(q_idx, k_idx)), (num_queries, num_keys))


def by_name(name: str, block_size: int) -> AnyMask:
  """``"causal"`` or ``"block_causal"``: the masks a user names on the command line."""
  if name == "causal":
    return Causal()
  if name == "block_causal":
    return BlockCausal(block_size)
  raise ValueError(f"attention={name!r} is not supported; use 'causal' or 'block_causal'")


def _check_positive(name, value):
  if not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive integer; got {value!r}")
