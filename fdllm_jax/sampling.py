"""Token choice for decoding: greedy / temperature / top-p, and the confidence of the choice.

All functions take logits ``[..., V]`` (any float dtype; computed in float32) and are pure and
jit-friendly. The MASK id can be excluded from the candidates (Fast-dLLM v2 never emits MASK,
spec section 4.3) while the confidence stays a probability of the *full* distribution, so that
decisions equal the reference's whenever MASK is not the top token.

Top-p rule (spec 4.3): sort by probability, keep the smallest prefix whose cumulative probability
exceeds ``top_p`` (the top token always), renormalise. Equivalently, token i is kept when the
mass of tokens strictly more probable than i is at most ``top_p``; ties with the last kept
probability are all kept (a deterministic tie rule, where a sort would keep an arbitrary subset).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG_INF = -jnp.inf


def _exclude(logits_xV: jax.Array, exclude_id) -> jax.Array:
  if exclude_id is None:
    return logits_xV
  ids = jax.lax.broadcasted_iota(jnp.int32, logits_xV.shape, logits_xV.ndim - 1)
  return jnp.where(ids == exclude_id, _NEG_INF, logits_xV)


def greedy(logits_xV: jax.Array, exclude_id=None) -> tuple[jax.Array, jax.Array]:
  """(argmax id over the candidates, its probability under the full softmax), float32."""
  logits_xV = logits_xV.astype(jnp.float32)
  ids_x = jnp.argmax(_exclude(logits_xV, exclude_id), axis=-1).astype(jnp.int32)
  chosen_x = jnp.take_along_axis(logits_xV, ids_x[..., None], axis=-1)[..., 0]
  conf_x = jnp.exp(chosen_x - jax.nn.logsumexp(logits_xV, axis=-1))
  return ids_x, conf_x


def _cutoff(sorted_desc, top_p):
  """The smallest kept probability, from a descending prefix of the distribution."""
  mass_before = jnp.cumsum(sorted_desc, axis=-1) - sorted_desc  # exclusive cumulative sum
  num_kept = jnp.maximum(jnp.sum(mass_before <= top_p, axis=-1, keepdims=True), 1)
  return jnp.take_along_axis(sorted_desc, num_kept - 1, axis=-1)


def top_p_mask(probs_xV: jax.Array, top_p, prefix: int = 64) -> jax.Array:
  """Whether each token is in the top-p nucleus of its distribution (module docstring).

  ``top_p`` in (0, 1] may be a traced scalar; ``top_p >= 1`` keeps every token with p > 0.
  The nucleus is found among the ``prefix`` most probable tokens (``lax.top_k``) when they
  hold more than ``top_p`` of the mass in every row, else by a full sort: exact either way.
  """
  probs_xV = probs_xV.astype(jnp.float32)
  vocab = probs_xV.shape[-1]
  full_sort = lambda p: _cutoff(-jnp.sort(-p, axis=-1), top_p)
  if prefix < vocab:
    top = jax.lax.top_k(probs_xV, prefix)[0]
    enough = jnp.all(jnp.sum(top, axis=-1) > top_p)  # then the nucleus lies inside `top`
    cutoff = jax.lax.cond(enough, lambda p: _cutoff(top, top_p), full_sort, probs_xV)
  else:
    cutoff = full_sort(probs_xV)
  cutoff = jnp.where(top_p >= 1.0, jnp.zeros_like(cutoff), cutoff)
  return (probs_xV >= cutoff) & (probs_xV > 0)


def top_p_filter(probs_xV: jax.Array, top_p, prefix: int = 64) -> jax.Array:
  """Keeps the top-p nucleus of each distribution (``top_p_mask``) and renormalises."""
  probs_xV = probs_xV.astype(jnp.float32)
  kept = jnp.where(top_p_mask(probs_xV, top_p, prefix), probs_xV, 0.0)
  return kept / jnp.sum(kept, axis=-1, keepdims=True)


def sample(logits_xV: jax.Array, key: jax.Array, *, temperature, top_p,
           exclude_id=None) -> tuple[jax.Array, jax.Array]:
  """Samples from softmax(logits / T) restricted to its top-p nucleus.

  Returns (ids int32, confidence float32), the confidence being the probability of the chosen
  id under the filtered, renormalised distribution (the reference's ``p_1t[x]``). An excluded id
  is never drawn; should it be the whole nucleus, the most probable other token is taken.
  ``temperature`` > 0 and ``top_p`` may be traced scalars. ``key`` is one key for all
  positions, or a batch of keys [B] (``row_keys``), one per row of ``logits`` [B, ..., V].
  """
  logits_xV = logits_xV.astype(jnp.float32)
  scaled_xV = logits_xV / temperature
  # Renormalised as the softmax of the nucleus' logits, as the reference does: a nucleus of one
  # token then has probability exactly 1.0. Dividing by the kept mass instead gives p / p,
  # which XLA computes as p * (1 / p): 1 - 2**-24 for some p, and then which of two such
  # tokens commits first at threshold 1.0 depended on the batch a row was decoded in.
  keep_xV = top_p_mask(jax.nn.softmax(scaled_xV, axis=-1), top_p)
  probs_xV = jax.nn.softmax(jnp.where(keep_xV, scaled_xV, _NEG_INF), axis=-1)
  candidates_xV = probs_xV
  if exclude_id is not None:
    candidates_xV = jnp.where(
        jax.lax.broadcasted_iota(jnp.int32, probs_xV.shape, probs_xV.ndim - 1) == exclude_id,
        0.0, probs_xV)
  draw = lambda k, c: jax.random.categorical(k, jnp.log(c), axis=-1)
  if jnp.ndim(key) == 1:  # one key per row; the filtering above stays unbatched
    drawn_x = jax.vmap(draw)(key, candidates_xV)
  else:
    drawn_x = draw(key, candidates_xV)
  drawn_x = drawn_x.astype(jnp.int32)
  has_candidate_x = jnp.sum(candidates_xV, axis=-1) > 0
  fallback_x = jnp.argmax(_exclude(logits_xV, exclude_id), axis=-1).astype(jnp.int32)
  ids_x = jnp.where(has_candidate_x, drawn_x, fallback_x)
  conf_x = jnp.take_along_axis(probs_xV, ids_x[..., None], axis=-1)[..., 0]
  return ids_x, conf_x


def choose(logits_xV: jax.Array, key, *, greedy_only: bool, temperature=0.0, top_p=1.0,
           exclude_id=None) -> tuple[jax.Array, jax.Array]:
  """``greedy`` when ``greedy_only`` (static), else ``sample``."""
  if greedy_only:
    return greedy(logits_xV, exclude_id)
  return sample(logits_xV, key, temperature=temperature, top_p=top_p, exclude_id=exclude_id)


def row_keys(seed, step_B: jax.Array, row_B: jax.Array | None = None) -> jax.Array:
  """One PRNG key per row from (seed, row index, that row's own step counter).

  Keying by the row's own counter makes a row's samples independent of what the other rows of
  the batch do (a row decoded alone draws the same numbers as row 0 of a batch). ``row_B``
  overrides the row index (default ``arange(B)``): the prompt a row decodes, when rows take
  prompts in turn (``generate``'s ``max_batch_size``).
  """
  base = jax.random.key(seed)
  rows = jnp.arange(step_B.shape[0], dtype=jnp.int32) if row_B is None else row_B
  return jax.vmap(lambda r, s: jax.random.fold_in(jax.random.fold_in(base, r), s))(rows, step_B)
