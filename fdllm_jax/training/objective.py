"""Training objectives: the Fast-dLLM v2 block-diffusion loss and plain next-token CE.

Block diffusion (spec section 3), for ``input_ids`` / ``labels`` [N, L] with ``L % B == 0`` and
``labels == IGNORE`` (-100) on tokens that carry no loss:

1. ``sample_block_masks`` draws, per block of every row, ``t ~ U(0, 1)``,
   ``p = (1 - 1e-3) t + 1e-3`` and a Bernoulli(p) mask per token, kept only where a label
   exists. This is view A; view B is its complement on the labelled tokens, so every label
   token is masked in exactly one view. The randomness lives here, outside the loss, so the
   loss is a deterministic function that tests can check exactly.
2. ``block_diffusion_loss`` builds, per view, ``x_t`` (labelled tokens of the view replaced by
   MASK) and the input ``x_t ++ x_0`` [2N, 2L] with RoPE positions ``0..L-1`` twice, runs the
   model under ``masks.Training(B, L)``, keeps the hidden states of the ``x_t`` half, and takes
   the token-shifted cross-entropy (the logit at ``j - 1`` predicts the token at ``j``, also
   across block boundaries) on the positions masked in that view.
3. The summed CE of both views is divided by the number of supervised (shifted) label tokens
   of the original batch: a per-token mean, no ``1/t`` weighting.

The denominator counts ``labels[:, 1:] != IGNORE``: a label on the first position of a window
can never be predicted by a shifted logit, so it is left out of both the sum and the count.

Both losses also come as ``*_sums`` returning (CE sum, token count), which the trainer uses for
gradient accumulation: gradients of the sums are added over micro-batches and divided once by
the token count of the whole global batch, so accumulation does not re-weight micro-batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fdllm_jax import masks as masks_lib

IGNORE = -100  # label of tokens without loss (prompt, padding)
MASK_EPS = 1e-3  # lower bound of the per-block masking probability
OBJECTIVES = ("block_diffusion", "autoregressive")


def check_block_shape(seq_len: int, block_size: int) -> None:
  """Raises ValueError unless ``seq_len`` is a positive multiple of ``block_size``."""
  if block_size < 1 or seq_len < 1 or seq_len % block_size:
    raise ValueError(f"sequence length {seq_len} must be a positive multiple of the block size "
                     f"{block_size} (the block-diffusion objective masks whole blocks)")


def sample_block_masks(rng, labels_NxL, block_size: int):
  """The view-A mask, bool [N, L]: per-block Bernoulli(p) masking of the labelled tokens."""
  num_rows, seq_len = labels_NxL.shape
  check_block_shape(seq_len, block_size)
  num_blocks = seq_len // block_size
  t_rng, m_rng = jax.random.split(rng)
  t_NxK = jax.random.uniform(t_rng, (num_rows, num_blocks), jnp.float32)
  p_NxK = (1.0 - MASK_EPS) * t_NxK + MASK_EPS
  p_NxL = jnp.repeat(p_NxK, block_size, axis=1)
  draws_NxL = jax.random.uniform(m_rng, (num_rows, seq_len), jnp.float32)
  return (draws_NxL < p_NxL) & (labels_NxL != IGNORE)


def complementary_views(input_ids_NxL, labels_NxL, view_a_mask_NxL, mask_id: int):
  """Noisy inputs and labels of both views, stacked on the batch axis: ([2N, L], [2N, L]).

  View A masks the labelled tokens selected by ``view_a_mask``, view B the other labelled
  tokens; labels survive only where the token was replaced by MASK.
  """
  supervised = labels_NxL != IGNORE
  masked_a = view_a_mask_NxL & supervised
  masked_b = ~view_a_mask_NxL & supervised
  masked_2NxL = jnp.concatenate([masked_a, masked_b], axis=0)
  ids_2NxL = jnp.concatenate([input_ids_NxL, input_ids_NxL], axis=0)
  labels_2NxL = jnp.concatenate([labels_NxL, labels_NxL], axis=0)
  noisy_2NxL = jnp.where(masked_2NxL, jnp.asarray(mask_id, ids_2NxL.dtype), ids_2NxL)
  view_labels_2NxL = jnp.where(masked_2NxL, labels_2NxL, IGNORE)
  return noisy_2NxL, view_labels_2NxL


def shifted_cross_entropy_sums(logits_BxTxV, labels_BxT):
  """(sum of CE where ``labels[:, 1:]`` != IGNORE, number of such tokens); logit j-1 -> token j."""
  logits = logits_BxTxV[:, :-1].astype(jnp.float32)
  targets = labels_BxT[:, 1:]
  valid = targets != IGNORE
  log_z = jax.nn.logsumexp(logits, axis=-1)
  safe_targets = jnp.where(valid, targets, 0)
  target_logit = jnp.take_along_axis(logits, safe_targets[..., None], axis=-1)[..., 0]
  ce = jnp.where(valid, log_z - target_logit, 0.0)
  return jnp.sum(ce), jnp.sum(valid).astype(jnp.float32)


def block_diffusion_loss_sums(model, input_ids_NxL, labels_NxL, view_a_mask_NxL, *,
                              block_size: int, mask_id: int, attention_impl: str | None = None):
  """(CE summed over both views, number of label tokens of the original batch)."""
  num_rows, seq_len = input_ids_NxL.shape
  check_block_shape(seq_len, block_size)
  noisy_2NxL, view_labels_2NxL = complementary_views(input_ids_NxL, labels_NxL,
                                                     view_a_mask_NxL, mask_id)
  clean_2NxL = jnp.concatenate([input_ids_NxL, input_ids_NxL], axis=0)
  tokens_2Nx2L = jnp.concatenate([noisy_2NxL, clean_2NxL], axis=1)
  positions_L = jnp.arange(seq_len, dtype=jnp.int32)
  positions_2Nx2L = jnp.broadcast_to(jnp.concatenate([positions_L, positions_L]),
                                     tokens_2Nx2L.shape)
  hidden, _ = model(tokens_2Nx2L, positions_2Nx2L, mask=masks_lib.Training(block_size, seq_len),
                    attention_impl=attention_impl, return_hidden=True)
  logits_2NxLxV = model.logits(hidden[:, :seq_len])
  ce_sum, _ = shifted_cross_entropy_sums(logits_2NxLxV, view_labels_2NxL)
  num_labels = jnp.sum(labels_NxL[:, 1:] != IGNORE).astype(jnp.float32)
  return ce_sum, num_labels


def block_diffusion_loss(model, input_ids_NxL, labels_NxL, view_a_mask_NxL, *, block_size: int,
                         mask_id: int, attention_impl: str | None = None):
  """Fast-dLLM v2 loss: (per-token mean CE over both complementary views, metrics dict)."""
  ce_sum, num_labels = block_diffusion_loss_sums(
      model, input_ids_NxL, labels_NxL, view_a_mask_NxL, block_size=block_size, mask_id=mask_id,
      attention_impl=attention_impl)
  loss = ce_sum / jnp.maximum(num_labels, 1.0)
  return loss, {"loss": loss, "ce_sum": ce_sum, "num_label_tokens": num_labels}


def autoregressive_loss_sums(model, input_ids_NxL, labels_NxL, *,
                             attention_impl: str | None = None):
  """(next-token CE summed over labelled positions under the causal mask, their count)."""
  logits, _ = model(input_ids_NxL, mask=masks_lib.Causal(), attention_impl=attention_impl)
  return shifted_cross_entropy_sums(logits, labels_NxL)


def autoregressive_loss(model, input_ids_NxL, labels_NxL, *, attention_impl: str | None = None):
  """Plain next-token CE (per-token mean): (loss, metrics dict)."""
  ce_sum, num_labels = autoregressive_loss_sums(model, input_ids_NxL, labels_NxL,
                                                attention_impl=attention_impl)
  loss = ce_sum / jnp.maximum(num_labels, 1.0)
  return loss, {"loss": loss, "ce_sum": ce_sum, "num_label_tokens": num_labels}
