"""Training objectives: the Fast-dLLM v2 block-diffusion loss and plain next-token CE.

Block diffusion (spec section 3), for ``input_ids`` / ``labels`` [N, L] with ``L % B == 0`` and
``labels == IGNORE`` (-100) on tokens that carry no loss:

1. ``sample_block_masks`` draws, per block of every row, ``t ~ U(0, 1)``,
   ``p = (1 - 1e-3) t + 1e-3`` and a Bernoulli(p) mask per token, kept only where a label
   exists. This is view A; view B is its complement on the labelled tokens, so every label
   token is masked in exactly one view. The randomness lives here, outside the loss, so the
   loss is a deterministic function that tests can check exactly.

   Three options leave the reference recipe (all off by default; ``sample_view_masks``):
   ``mask_ratio_range=(lo, hi)`` draws ``t ~ U(lo, hi)`` (a clipped schedule, as in BD3-LM),
   and ``complementary=False`` draws view B independently instead of as the complement. With
   complementary views view B's rate is 1 - t: a clipped range gives view A rates in [lo, hi]
   and view B rates in [1 - hi, 1 - lo]. The demo measured both (docs/demo_history.md).
   ``mask_pattern="sub_block"`` draws the states the sub-block decoder visits
   instead of masks spread over the whole block: clean sub-blocks, one partly masked
   sub-block, MASK after it (``sample_sub_block_regions``); the loss may then be kept to the
   active sub-block (``sample_sub_block_views`` names it, ``loss_masks`` of the loss).
2. ``block_diffusion_loss`` builds, per view, ``x_t`` (labelled tokens of the view replaced by
   MASK) and the input ``x_t ++ x_0`` [2N, 2L] with RoPE positions ``0..L-1`` twice, runs the
   model under ``masks.Training(B, L)``, keeps the hidden states of the ``x_t`` half, and takes
   the token-shifted cross-entropy (the logit at ``j - 1`` predicts the token at ``j``, also
   across block boundaries) on the positions masked in that view.
3. The summed CE of both views is divided by the number of supervised (shifted) label tokens
   of the original batch: a per-token mean, no ``1/t`` weighting.

``share_clean_stream=True`` computes the same loss from one sequence per row,
``x_t^A ++ x_t^B ++ x_0`` [N, 3L] under ``masks.Training(B, L, num_noisy_streams=2)``, instead
of two ``x_t ++ x_0`` rows [2N, 2L]. The clean stream attends only to itself, so its hidden
states are the same in both views and one copy serves both: a quarter less dense work (3L
tokens per row instead of 4L) and a quarter fewer attention tiles for the block kernels.

The denominator counts ``labels[:, 1:] != IGNORE``: a label on the first position of a window
can never be predicted by a shifted logit, so it is left out of both the sum and the count.

``loss_chunk_size`` (both objectives) runs the LM head and the CE over that many positions at a
time (``head_shifted_cross_entropy_sums``), so the [rows, L, vocab] logits never exist at once.

Both losses also come as ``*_sums`` returning (CE sum, token count), which the trainer uses for
gradient accumulation: gradients of the sums are added over micro-batches and divided once by
the token count of the whole global batch, so accumulation does not re-weight micro-batches.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fdllm_jax import masks as masks_lib

IGNORE = -100  # label of tokens without loss (prompt, padding)
MASK_EPS = 1e-3  # lower bound of the per-block masking probability
OBJECTIVES = ("block_diffusion", "autoregressive")
MASK_PATTERNS = ("bernoulli", "sub_block")


def check_block_shape(seq_len: int, block_size: int) -> None:
  """Raises ValueError unless ``seq_len`` is a positive multiple of ``block_size``."""
  if block_size < 1 or seq_len < 1 or seq_len % block_size:
    raise ValueError(f"sequence length {seq_len} must be a positive multiple of the block size "
                     f"{block_size} (the block-diffusion objective masks whole blocks)")


def check_mask_ratio_range(mask_ratio_range) -> tuple[float, float]:
  """``(lo, hi)`` as floats; ValueError unless ``0 <= lo < hi <= 1``."""
  try:
    lo, hi = (float(x) for x in mask_ratio_range)
  except (TypeError, ValueError):
    raise ValueError(f"mask_ratio_range must be two numbers (lo, hi); got {mask_ratio_range!r}")
  if not 0.0 <= lo < hi <= 1.0:
    raise ValueError(f"mask_ratio_range must satisfy 0 <= lo < hi <= 1; got {mask_ratio_range!r} "
                     f"(the reference draws t ~ U(0, 1))")
  return lo, hi


def sample_block_masks(rng, labels_NxL, block_size: int, *, mask_ratio_range=(0.0, 1.0)):
  """The view-A mask, bool [N, L]: per-block Bernoulli(p) masking of the labelled tokens.

  Per block ``t ~ U(*mask_ratio_range)`` (the reference: U(0, 1)) and
  ``p = (1 - MASK_EPS) t + MASK_EPS``.
  """
  lo, hi = check_mask_ratio_range(mask_ratio_range)
  num_rows, seq_len = labels_NxL.shape
  check_block_shape(seq_len, block_size)
  num_blocks = seq_len // block_size
  t_rng, m_rng = jax.random.split(rng)
  t_NxK = jax.random.uniform(t_rng, (num_rows, num_blocks), jnp.float32, lo, hi)
  p_NxK = (1.0 - MASK_EPS) * t_NxK + MASK_EPS
  p_NxL = jnp.repeat(p_NxK, block_size, axis=1)
  draws_NxL = jax.random.uniform(m_rng, (num_rows, seq_len), jnp.float32)
  return (draws_NxL < p_NxL) & (labels_NxL != IGNORE)


def check_mask_pattern(mask_pattern: str, block_size: int, sub_block_size: int) -> None:
  """ValueError unless ``mask_pattern`` is known and ``sub_block_size`` divides the block."""
  if mask_pattern not in MASK_PATTERNS:
    raise ValueError(f"mask_pattern={mask_pattern!r} is unknown; use one of {MASK_PATTERNS}")
  if mask_pattern == "sub_block" and (not isinstance(sub_block_size, int) or sub_block_size < 1
                                      or block_size % sub_block_size):
    raise ValueError(f"sub_block_size={sub_block_size!r} must be a positive divisor of the "
                     f"block size {block_size} (the decoder's sub-block, 8 in the reference)")


def sample_sub_block_regions(rng, num_rows: int, seq_len: int, block_size: int,
                             sub_block_size: int):
  """(active, after), bool [N, L]: per block one active sub-block ``s ~ U{0, ..., B/S}``.

  ``active`` marks the tokens of sub-block ``s``, ``after`` those of the later sub-blocks.
  ``s = B/S`` (no active sub-block) leaves the whole block clean: the state of the decoder's
  block-commit forward, whose last logit predicts the next block's first token.
  """
  check_block_shape(seq_len, block_size)
  sub_blocks_per_block = block_size // sub_block_size
  s_NxK = jax.random.randint(rng, (num_rows, seq_len // block_size), 0, sub_blocks_per_block + 1)
  s_NxL = jnp.repeat(s_NxK, block_size, axis=1)
  sub_block_of_L = (jnp.arange(seq_len) % block_size) // sub_block_size
  return sub_block_of_L[None, :] == s_NxL, sub_block_of_L[None, :] > s_NxL


def _sub_block_view(rng, labels_NxL, block_size, sub_block_size, mask_ratio_range):
  """One view of the ``sub_block`` pattern, its complement inside the active sub-block, and
  the active sub-blocks."""
  region_rng, bernoulli_rng = jax.random.split(rng)
  active, after = sample_sub_block_regions(region_rng, *labels_NxL.shape, block_size,
                                           sub_block_size)
  bernoulli = sample_block_masks(bernoulli_rng, labels_NxL, block_size,
                                 mask_ratio_range=mask_ratio_range)
  supervised = labels_NxL != IGNORE
  return ((after | (active & bernoulli)) & supervised,
          (after | (active & ~bernoulli)) & supervised, active)


def sample_sub_block_views(rng, labels_NxL, block_size: int, sub_block_size: int, *,
                           mask_ratio_range=(0.0, 1.0), complementary: bool = True):
  """``sample_view_masks``'s ``sub_block`` views and each view's active sub-blocks:
  (view A, view B, active A, active B), bool [N, L] each."""
  check_mask_pattern("sub_block", block_size, sub_block_size)
  if complementary:
    view_a, view_b, active = _sub_block_view(rng, labels_NxL, block_size, sub_block_size,
                                             mask_ratio_range)
    return view_a, view_b, active, active
  (view_a, _, active_a), (view_b, _, active_b) = (
      _sub_block_view(r, labels_NxL, block_size, sub_block_size, mask_ratio_range)
      for r in jax.random.split(rng))
  return view_a, view_b, active_a, active_b


def sample_view_masks(rng, labels_NxL, block_size: int, *, mask_ratio_range=(0.0, 1.0),
                      complementary: bool = True, mask_pattern: str = "bernoulli",
                      sub_block_size: int = 8):
  """(view-A mask, view-B mask), bool [N, L] each, restricted to the labelled tokens.

  ``mask_pattern="bernoulli"`` (the reference) masks every token of a block with the same
  probability. ``complementary`` (the reference): view B masks exactly the labelled tokens view
  A keeps, and view A is ``sample_block_masks(rng, ...)``. Otherwise both views are drawn
  independently.

  ``mask_pattern="sub_block"`` (not in the reference) draws the states the decoder visits with
  sub-blocks of ``sub_block_size``: per block an active sub-block (``sample_sub_block_regions``),
  the sub-blocks before it clean, those after it all MASK, and the active one Bernoulli-masked
  as above. ``complementary`` views share the regions and split the active sub-block.
  """
  check_mask_pattern(mask_pattern, block_size, sub_block_size)
  if mask_pattern == "sub_block":
    return sample_sub_block_views(rng, labels_NxL, block_size, sub_block_size,
                                  mask_ratio_range=mask_ratio_range,
                                  complementary=complementary)[:2]
  if complementary:
    view_a = sample_block_masks(rng, labels_NxL, block_size, mask_ratio_range=mask_ratio_range)
    return view_a, ~view_a & (labels_NxL != IGNORE)
  a_rng, b_rng = jax.random.split(rng)
  return tuple(sample_block_masks(r, labels_NxL, block_size, mask_ratio_range=mask_ratio_range)
               for r in (a_rng, b_rng))


def complementary_views(input_ids_NxL, labels_NxL, view_a_mask_NxL, mask_id: int,
                        view_b_mask_NxL=None, loss_masks=None):
  """Noisy inputs and labels of both views, stacked on the batch axis: ([2N, L], [2N, L]).

  View A masks the labelled tokens selected by ``view_a_mask``, view B those selected by
  ``view_b_mask`` (default: the other labelled tokens, the reference's complement); labels
  survive only where the token was replaced by MASK (and, given ``loss_masks`` = (view A's,
  view B's) bool [N, L], only where that view's loss mask is set).
  """
  supervised = labels_NxL != IGNORE
  if view_b_mask_NxL is None:
    view_b_mask_NxL = ~view_a_mask_NxL
  masked_a = view_a_mask_NxL & supervised
  masked_b = view_b_mask_NxL & supervised
  masked_2NxL = jnp.concatenate([masked_a, masked_b], axis=0)
  ids_2NxL = jnp.concatenate([input_ids_NxL, input_ids_NxL], axis=0)
  labels_2NxL = jnp.concatenate([labels_NxL, labels_NxL], axis=0)
  noisy_2NxL = jnp.where(masked_2NxL, jnp.asarray(mask_id, ids_2NxL.dtype), ids_2NxL)
  if loss_masks is not None:
    masked_2NxL = masked_2NxL & jnp.concatenate(loss_masks, axis=0)
  view_labels_2NxL = jnp.where(masked_2NxL, labels_2NxL, IGNORE)
  return noisy_2NxL, view_labels_2NxL


def _cross_entropy_sums(logits_BxTxV, targets_BxT, weights_BxT=None, focal_gamma: float = 0.0):
  """(sum of CE where ``targets`` != IGNORE, their count): logit t scores target t.

  ``weights`` (float [B, T]) scale each target's CE in the sum, not in the count.
  ``focal_gamma`` > 0 scales each CE by ``(1 - p)^gamma``, ``p`` the target's probability (the
  focal loss of Lin et al. 2017): the sum leans on the predictions the model gets wrong.
  """
  logits = logits_BxTxV.astype(jnp.float32)
  valid = targets_BxT != IGNORE
  log_z = jax.nn.logsumexp(logits, axis=-1)
  safe_targets = jnp.where(valid, targets_BxT, 0)
  target_logit = jnp.take_along_axis(logits, safe_targets[..., None], axis=-1)[..., 0]
  ce = jnp.where(valid, log_z - target_logit, 0.0)
  if focal_gamma:
    # 1 - p = -expm1(-ce); ce >= 0 up to rounding, and a negative base has no real power
    ce = ce * jnp.power(-jnp.expm1(-jnp.maximum(ce, 0.0)), focal_gamma)
  if weights_BxT is not None:
    ce = ce * weights_BxT
  return jnp.sum(ce), jnp.sum(valid).astype(jnp.float32)


def shifted_cross_entropy_sums(logits_BxTxV, labels_BxT):
  """(sum of CE where ``labels[:, 1:]`` != IGNORE, number of such tokens); logit j-1 -> token j."""
  return _cross_entropy_sums(logits_BxTxV[:, :-1], labels_BxT[:, 1:])


def check_loss_chunk_size(chunk_size: int | None) -> None:
  """Raises ValueError unless ``chunk_size`` is None or a positive int."""
  if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                 or chunk_size < 1):
    raise ValueError(f"loss_chunk_size={chunk_size!r} must be a positive number of positions or "
                     "None (the whole sequence in one piece)")


def head_shifted_cross_entropy_sums(logits_fn, hidden_BxTxD, labels_BxT,
                                    chunk_size: int | None = None, weights_BxT=None,
                                    focal_gamma: float = 0.0):
  """``shifted_cross_entropy_sums(logits_fn(hidden), labels)``, ``chunk_size`` positions at a time.

  ``weights`` (float [B, T], aligned with ``labels``: ``weights[:, j]`` scales the CE of the
  token at ``j``) weight the sum; None: all 1. ``focal_gamma``: see ``_cross_entropy_sums``.

  With a chunk size, the LM head and the CE run on one chunk of positions after another
  (``lax.scan``) under ``jax.checkpoint``: the backward pass recomputes each chunk's logits, so
  only [B, chunk_size, V] logits live at once instead of [B, T, V] (for a 152k vocabulary at
  2048 positions that is 1.2 GiB per row in float32, times two for its gradient). The sums
  are the same up to float summation order. ``chunk_size=None`` computes all logits at once.
  """
  check_loss_chunk_size(chunk_size)
  hidden, targets = hidden_BxTxD[:, :-1], labels_BxT[:, 1:]
  weights = (jnp.ones(targets.shape, jnp.float32) if weights_BxT is None
             else weights_BxT[:, 1:].astype(jnp.float32))
  batch, num_positions, width = hidden.shape
  if chunk_size is None or chunk_size >= num_positions:
    return _cross_entropy_sums(logits_fn(hidden), targets,
                               None if weights_BxT is None else weights, focal_gamma)
  num_chunks = -(-num_positions // chunk_size)
  pad = num_chunks * chunk_size - num_positions  # padded positions carry IGNORE: no loss
  hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
  targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE)
  weights = jnp.pad(weights, ((0, 0), (0, pad)))

  def by_chunk(x_BxTx):  # [B, C*K, ...] -> [C, B, K, ...], the scan's leading axis
    x = x_BxTx.reshape(batch, num_chunks, chunk_size, *x_BxTx.shape[2:])
    return jnp.moveaxis(x, 1, 0)

  @jax.checkpoint
  def chunk_sums(hidden_BxKxD, targets_BxK, weights_BxK):
    return _cross_entropy_sums(logits_fn(hidden_BxKxD), targets_BxK, weights_BxK, focal_gamma)

  def accumulate(totals, chunk):
    ce, count = chunk_sums(*chunk)
    return (totals[0] + ce, totals[1] + count), None

  zero = jnp.zeros((), jnp.float32)
  (ce_sum, count), _ = jax.lax.scan(accumulate, (zero, zero),
                                    (by_chunk(hidden), by_chunk(targets), by_chunk(weights)))
  return ce_sum, count


def check_masked_input_weight(weight) -> None:
  """ValueError unless ``weight`` is a finite number > 0."""
  if (isinstance(weight, bool) or not isinstance(weight, (int, float))
      or not math.isfinite(weight) or weight <= 0):
    raise ValueError(f"masked_input_weight={weight!r} must be a finite number > 0 (1: the "
                     "reference's unweighted loss)")


def check_focal_gamma(gamma) -> None:
  """ValueError unless ``gamma`` is 0 (plain CE) or a finite number >= 1 (below 1 the gradient
  of ``(1 - p)^gamma`` is infinite where ``p`` reaches 1)."""
  if (isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma)
      or not (gamma == 0 or gamma >= 1)):
    raise ValueError(f"focal_gamma={gamma!r} must be 0 (plain cross-entropy) or a finite "
                     "number >= 1")


def masked_input_weights(noisy_BxL, mask_id: int, weight: float):
  """float [B, L]: ``weight`` at ``j`` where the input at ``j - 1`` is MASK, else 1.

  With token shift the token at ``j`` is predicted from position ``j - 1``; where that input is
  MASK the model decides the token without seeing its left neighbour, which is where parallel
  decoding commits several tokens in one forward (docs/demo_history.md, "Session 26").
  Position 0 has no predicting position (its label never counts) and gets 1.
  """
  left_is_mask = noisy_BxL[:, :-1] == mask_id
  shifted = jnp.where(left_is_mask, jnp.float32(weight), jnp.float32(1.0))
  return jnp.concatenate([jnp.ones_like(shifted[:, :1]), shifted], axis=1)


def _noisy_hidden_two_rows(model, noisy_2NxL, input_ids_NxL, *, block_size, attention_impl):
  """Hidden states [2N, L, D] of the noisy streams: each view its own x_t ++ x_0 row."""
  seq_len = input_ids_NxL.shape[1]
  clean_2NxL = jnp.concatenate([input_ids_NxL, input_ids_NxL], axis=0)
  tokens_2Nx2L = jnp.concatenate([noisy_2NxL, clean_2NxL], axis=1)
  positions_2L = jnp.tile(jnp.arange(seq_len, dtype=jnp.int32), 2)
  hidden, _ = model(tokens_2Nx2L, jnp.broadcast_to(positions_2L, tokens_2Nx2L.shape),
                    mask=masks_lib.Training(block_size, seq_len), attention_impl=attention_impl,
                    return_hidden=True)
  return hidden[:, :seq_len]


def _noisy_hidden_shared_clean(model, noisy_2NxL, input_ids_NxL, *, block_size, attention_impl):
  """The same [2N, L, D] from one x_t^A ++ x_t^B ++ x_0 row per sample."""
  num_rows, seq_len = input_ids_NxL.shape
  tokens_Nx3L = jnp.concatenate([noisy_2NxL[:num_rows], noisy_2NxL[num_rows:], input_ids_NxL],
                                axis=1)
  positions_3L = jnp.tile(jnp.arange(seq_len, dtype=jnp.int32), 3)
  hidden, _ = model(tokens_Nx3L, jnp.broadcast_to(positions_3L, tokens_Nx3L.shape),
                    mask=masks_lib.Training(block_size, seq_len, num_noisy_streams=2),
                    attention_impl=attention_impl, return_hidden=True)
  return jnp.concatenate([hidden[:, :seq_len], hidden[:, seq_len:2 * seq_len]], axis=0)


def block_diffusion_loss_sums(model, input_ids_NxL, labels_NxL, view_a_mask_NxL,
                              view_b_mask_NxL=None, *, block_size: int, mask_id: int,
                              attention_impl: str | None = None,
                              loss_chunk_size: int | None = None,
                              share_clean_stream: bool = False, loss_masks=None,
                              masked_input_weight: float = 1.0, focal_gamma: float = 0.0):
  """(CE summed over both views, number of label tokens of the original batch).

  ``view_b_mask`` None: view B is view A's complement (the reference). ``loss_masks`` (not in
  the reference): per view, the masked tokens that carry loss; None: all of them.
  ``masked_input_weight`` (not in the reference; 1 is the reference): weight of the CE of
  predictions made at a MASK (``masked_input_weights``). ``focal_gamma`` (not in the
  reference; 0 is the reference): the focal loss's exponent (``_cross_entropy_sums``).
  """
  num_rows, seq_len = input_ids_NxL.shape
  check_block_shape(seq_len, block_size)
  check_masked_input_weight(masked_input_weight)
  check_focal_gamma(focal_gamma)
  noisy_2NxL, view_labels_2NxL = complementary_views(input_ids_NxL, labels_NxL,
                                                     view_a_mask_NxL, mask_id, view_b_mask_NxL,
                                                     loss_masks)
  noisy_hidden = _noisy_hidden_shared_clean if share_clean_stream else _noisy_hidden_two_rows
  hidden_2NxLxD = noisy_hidden(model, noisy_2NxL, input_ids_NxL, block_size=block_size,
                               attention_impl=attention_impl)
  weights_2NxL = (None if masked_input_weight == 1.0
                  else masked_input_weights(noisy_2NxL, mask_id, masked_input_weight))
  ce_sum, _ = head_shifted_cross_entropy_sums(model.logits, hidden_2NxLxD, view_labels_2NxL,
                                              loss_chunk_size, weights_2NxL, focal_gamma)
  num_labels = jnp.sum(labels_NxL[:, 1:] != IGNORE).astype(jnp.float32)
  return ce_sum, num_labels


def block_diffusion_loss(model, input_ids_NxL, labels_NxL, view_a_mask_NxL, view_b_mask_NxL=None,
                         *, block_size: int, mask_id: int, attention_impl: str | None = None,
                         loss_chunk_size: int | None = None, share_clean_stream: bool = False,
                         masked_input_weight: float = 1.0, focal_gamma: float = 0.0):
  """Fast-dLLM v2 loss: (per-token mean CE over both views, metrics dict)."""
  ce_sum, num_labels = block_diffusion_loss_sums(
      model, input_ids_NxL, labels_NxL, view_a_mask_NxL, view_b_mask_NxL,
      block_size=block_size, mask_id=mask_id, attention_impl=attention_impl,
      loss_chunk_size=loss_chunk_size, share_clean_stream=share_clean_stream,
      masked_input_weight=masked_input_weight, focal_gamma=focal_gamma)
  loss = ce_sum / jnp.maximum(num_labels, 1.0)
  return loss, {"loss": loss, "ce_sum": ce_sum, "num_label_tokens": num_labels}


def autoregressive_loss_sums(model, input_ids_NxL, labels_NxL, *,
                             attention_impl: str | None = None,
                             loss_chunk_size: int | None = None):
  """(next-token CE summed over labelled positions under the causal mask, their count)."""
  hidden, _ = model(input_ids_NxL, mask=masks_lib.Causal(), attention_impl=attention_impl,
                    return_hidden=True)
  return head_shifted_cross_entropy_sums(model.logits, hidden, labels_NxL, loss_chunk_size)


def autoregressive_loss(model, input_ids_NxL, labels_NxL, *, attention_impl: str | None = None,
                        loss_chunk_size: int | None = None):
  """Plain next-token CE (per-token mean): (loss, metrics dict)."""
  ce_sum, num_labels = autoregressive_loss_sums(model, input_ids_NxL, labels_NxL,
                                                attention_impl=attention_impl,
                                                loss_chunk_size=loss_chunk_size)
  loss = ce_sum / jnp.maximum(num_labels, 1.0)
  return loss, {"loss": loss, "ce_sum": ce_sum, "num_label_tokens": num_labels}
