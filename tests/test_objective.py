"""The block-diffusion objective against explicit references (spec sections 2 and 3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fdllm_jax import masks
from fdllm_jax.checkpoints import load_model
from fdllm_jax.config import ModelConfig
from fdllm_jax.model import Transformer
from fdllm_jax.training import objective

IGNORE = objective.IGNORE
MASK_ID = 516  # the last row of the tiny models' vocabulary (517)


def _batch(seed, rows=3, seq_len=16, vocab=500):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, (rows, seq_len)).astype(np.int32)
  labels = ids.copy()
  labels[rng.random((rows, seq_len)) < 0.35] = IGNORE  # prompts / padding
  labels[0, :5] = IGNORE
  return ids, labels


def _spec_mask(block_size, seq_len):
  """Spec section 2, literally, one element at a time."""
  n = 2 * seq_len
  out = np.zeros((n, n), bool)
  for q in range(n):
    for k in range(n):
      clean_q, clean_k = q >= seq_len, k >= seq_len
      blk_q, blk_k = (q % seq_len) // block_size, (k % seq_len) // block_size
      out[q, k] = ((blk_q == blk_k and clean_q == clean_k)
                   or (not clean_q and clean_k and blk_q > blk_k)
                   or (clean_q and clean_k and blk_q >= blk_k))
  return out


@pytest.mark.parametrize("block_size,seq_len", [(4, 16), (8, 24), (32, 64)])
def test_training_mask_equals_spec_formula(block_size, seq_len):
  dense = masks.dense(masks.Training(block_size, seq_len), 2 * seq_len, 2 * seq_len)
  np.testing.assert_array_equal(dense, _spec_mask(block_size, seq_len))


def test_sample_block_masks_matches_explicit_reference():
  ids, labels = _batch(0, rows=4, seq_len=32)
  rng = jax.random.key(7)
  got = np.asarray(objective.sample_block_masks(rng, jnp.asarray(labels), 8))
  # Reference: same draws, one block and one token at a time.
  t_rng, m_rng = jax.random.split(rng)
  t = np.asarray(jax.random.uniform(t_rng, (4, 4)))
  u = np.asarray(jax.random.uniform(m_rng, (4, 32)))
  want = np.zeros((4, 32), bool)
  for n in range(4):
    for j in range(32):
      p = (1 - 1e-3) * t[n, j // 8] + 1e-3
      want[n, j] = labels[n, j] != IGNORE and u[n, j] < p
  np.testing.assert_array_equal(got, want)
  assert not got[labels == IGNORE].any()


def test_sample_block_masks_statistics():
  """Per block, the masked fraction follows its own t: blocks vary, mean rate is 1/2."""
  labels = jnp.zeros((256, 64), jnp.int32)
  m = np.asarray(objective.sample_block_masks(jax.random.key(0), labels, 32))
  per_block = m.reshape(256, 2, 32).mean(-1)
  assert abs(per_block.mean() - 0.5) < 0.03
  assert per_block.std() > 0.25  # ~U(0,1) rates (std 0.29), not a shared rate
  with pytest.raises(ValueError, match="multiple of the block size"):
    objective.sample_block_masks(jax.random.key(0), jnp.zeros((2, 30), jnp.int32), 8)


def test_clipped_mask_ratio_range_matches_explicit_reference():
  ids, labels = _batch(5, rows=4, seq_len=32)
  rng = jax.random.key(11)
  lo, hi = 0.2, 0.45
  got = np.asarray(objective.sample_block_masks(rng, jnp.asarray(labels), 8,
                                                mask_ratio_range=(lo, hi)))
  t_rng, m_rng = jax.random.split(rng)
  u_t = np.asarray(jax.random.uniform(t_rng, (4, 4)))
  t = np.maximum(np.float32(lo), u_t * (np.float32(hi) - np.float32(lo)) + np.float32(lo))
  assert ((t >= lo) & (t < hi)).all()
  u = np.asarray(jax.random.uniform(m_rng, (4, 32)))
  p = (np.float32(1 - 1e-3) * np.repeat(t, 8, axis=1) + np.float32(1e-3)).astype(np.float32)
  np.testing.assert_array_equal(got, (u < p) & (labels != IGNORE))


def test_clipped_mask_ratio_statistics():
  labels = jnp.zeros((256, 64), jnp.int32)
  m = np.asarray(objective.sample_block_masks(jax.random.key(0), labels, 32,
                                              mask_ratio_range=(0.0, 0.3)))
  per_block = m.reshape(256, 2, 32).mean(-1)
  assert abs(per_block.mean() - 0.15) < 0.02
  assert per_block.max() < 0.6  # no block near the reference's heavy end


@pytest.mark.parametrize("bad", [(0.5, 0.5), (-0.1, 0.5), (0.2, 1.5), (0.6, 0.3), (0.1,), "ab",
                                 None])
def test_mask_ratio_range_errors(bad):
  with pytest.raises(ValueError, match="mask_ratio_range"):
    objective.sample_block_masks(jax.random.key(0), jnp.zeros((1, 8), jnp.int32), 8,
                                 mask_ratio_range=bad)


def test_sample_view_masks_complementary_and_independent():
  _, labels = _batch(6, rows=8, seq_len=64)
  labels = jnp.asarray(labels)
  supervised = np.asarray(labels != IGNORE)
  rng = jax.random.key(4)
  a, b = (np.asarray(x) for x in objective.sample_view_masks(rng, labels, 16))
  np.testing.assert_array_equal(a, np.asarray(objective.sample_block_masks(rng, labels, 16)))
  np.testing.assert_array_equal(a ^ b, supervised)  # the reference: a partition
  a, b = (np.asarray(x) for x in objective.sample_view_masks(
      rng, labels, 16, mask_ratio_range=(0.0, 0.3), complementary=False))
  a_rng, b_rng = jax.random.split(rng)
  for got, r in ((a, a_rng), (b, b_rng)):
    np.testing.assert_array_equal(got, np.asarray(objective.sample_block_masks(
        r, labels, 16, mask_ratio_range=(0.0, 0.3))))
  assert not (a | b)[~supervised].any()
  assert (a & b).any() and ((~a & ~b) & supervised).any()  # neither disjoint nor covering
  assert a.sum() < 0.3 * supervised.sum() and b.sum() < 0.3 * supervised.sum()


def test_sub_block_regions_match_explicit_reference():
  rng = jax.random.key(12)
  active, after = (np.asarray(x) for x in objective.sample_sub_block_regions(rng, 3, 64, 16, 4))
  s = np.asarray(jax.random.randint(rng, (3, 4), 0, 5))
  for n in range(3):
    for j in range(64):
      sub_block = (j % 16) // 4
      assert active[n, j] == (sub_block == s[n, j // 16])
      assert after[n, j] == (sub_block > s[n, j // 16])


def _blocks_are_decoder_states(view, supervised, block_size, sub_block_size):
  """Every block reads clean sub-blocks, one partly masked sub-block, then MASK on labels."""
  for row, sup_row in zip(view, supervised):
    for block, sup in zip(row.reshape(-1, block_size), sup_row.reshape(-1, block_size)):
      sub = block.reshape(-1, sub_block_size)
      sup_sub = sup.reshape(-1, sub_block_size)
      touched = [k for k in range(len(sub)) if sub[k].any()]
      if not touched:
        continue
      first = touched[0]
      assert not sub[:first].any()
      for k in range(first + 1, len(sub)):
        np.testing.assert_array_equal(sub[k], sup_sub[k])  # all labelled tokens masked


def test_sub_block_pattern_complementary_views():
  _, labels = _batch(7, rows=16, seq_len=64)
  labels = jnp.asarray(labels)
  supervised = np.asarray(labels != IGNORE)
  rng = jax.random.key(5)
  a, b = (np.asarray(x) for x in objective.sample_view_masks(
      rng, labels, 32, mask_pattern="sub_block", sub_block_size=8))
  region_rng, bernoulli_rng = jax.random.split(rng)
  active, after = (np.asarray(x) for x in objective.sample_sub_block_regions(
      region_rng, 16, 64, 32, 8))
  bernoulli = np.asarray(objective.sample_block_masks(bernoulli_rng, labels, 32))
  np.testing.assert_array_equal(a, (after | (active & bernoulli)) & supervised)
  # The views agree outside the active sub-block and split it.
  np.testing.assert_array_equal((a & ~active), (b & ~active))
  np.testing.assert_array_equal((a ^ b) & active, active & supervised)
  assert not (a | b)[~supervised].any()
  for view in (a, b):
    _blocks_are_decoder_states(view, supervised, 32, 8)
  assert (a != np.asarray(objective.sample_block_masks(rng, labels, 32))).any()


def test_sub_block_pattern_statistics_and_independent_views():
  labels = jnp.zeros((512, 32), jnp.int32)
  a, b = (np.asarray(x) for x in objective.sample_view_masks(
      jax.random.key(1), labels, 32, mask_pattern="sub_block", sub_block_size=8,
      complementary=False))
  for view in (a, b):
    _blocks_are_decoder_states(view, np.ones_like(view), 32, 8)
    clean_blocks = ~view.any(axis=1)
    assert abs(clean_blocks.mean() - 0.2) < 0.05  # s = B/S: the commit forward's state
    first_masked = np.where(clean_blocks, 32, view.argmax(axis=1)) // 8
    assert set(np.unique(first_masked)) == {0, 1, 2, 3, 4}
  assert (a != b).any()


def test_sub_block_views_name_their_active_sub_blocks():
  _, labels = _batch(8, rows=8, seq_len=64)
  labels = jnp.asarray(labels)
  rng = jax.random.key(9)
  for complementary in (True, False):
    a, b, active_a, active_b = (np.asarray(x) for x in objective.sample_sub_block_views(
        rng, labels, 32, 8, complementary=complementary))
    want_a, want_b = (np.asarray(x) for x in objective.sample_view_masks(
        rng, labels, 32, mask_pattern="sub_block", complementary=complementary))
    np.testing.assert_array_equal(a, want_a)
    np.testing.assert_array_equal(b, want_b)
    for view, active in ((a, active_a), (b, active_b)):
      # Active sub-blocks are whole sub-blocks, at most one per block, before every masked
      # token that lies outside them.
      per_sub_block = active.reshape(8, -1, 8)
      assert (per_sub_block.all(-1) | ~per_sub_block.any(-1)).all()
      assert (active.reshape(8, 2, 32).sum(-1) <= 8).all()
      outside = view & ~active
      for n, k in zip(*np.nonzero(active.reshape(8, 2, 32).any(-1))):
        block_active = active[n, 32 * k:32 * (k + 1)]
        block_outside = outside[n, 32 * k:32 * (k + 1)]
        assert not block_outside[:np.argmax(block_active) + 8].any()
    assert (active_a == active_b).all() == complementary


def test_loss_masks_keep_the_input_and_drop_the_labels():
  ids, labels = _batch(2, rows=4, seq_len=32)
  ids, labels = jnp.asarray(ids), jnp.asarray(labels)
  view_a = objective.sample_block_masks(jax.random.key(3), labels, 8)
  loss_a = jnp.asarray(np.random.default_rng(0).random((4, 32)) < 0.5)
  loss_b = ~loss_a
  noisy, view_labels = objective.complementary_views(ids, labels, view_a, MASK_ID)
  noisy_l, view_labels_l = objective.complementary_views(ids, labels, view_a, MASK_ID,
                                                         loss_masks=(loss_a, loss_b))
  np.testing.assert_array_equal(np.asarray(noisy_l), np.asarray(noisy))
  keep = np.concatenate([np.asarray(loss_a), np.asarray(loss_b)])
  np.testing.assert_array_equal(np.asarray(view_labels_l),
                                np.where(keep, np.asarray(view_labels), IGNORE))
  assert (np.asarray(view_labels_l) != IGNORE).sum() < (np.asarray(view_labels) != IGNORE).sum()


@pytest.mark.parametrize("pattern,sub_block_size,match", [
    ("sub_blocks", 8, "mask_pattern"), ("sub_block", 6, "sub_block_size"),
    ("sub_block", 0, "sub_block_size")])
def test_mask_pattern_errors(pattern, sub_block_size, match):
  with pytest.raises(ValueError, match=match):
    objective.sample_view_masks(jax.random.key(0), jnp.zeros((1, 32), jnp.int32), 32,
                                mask_pattern=pattern, sub_block_size=sub_block_size)


def test_complementary_views_partition_the_labels():
  ids, labels = _batch(1, rows=4, seq_len=32)
  view_a = objective.sample_block_masks(jax.random.key(3), jnp.asarray(labels), 8)
  noisy, view_labels = objective.complementary_views(jnp.asarray(ids), jnp.asarray(labels),
                                                     view_a, MASK_ID)
  noisy, view_labels = np.asarray(noisy), np.asarray(view_labels)
  masked_a, masked_b = noisy[:4] == MASK_ID, noisy[4:] == MASK_ID
  supervised = labels != IGNORE
  np.testing.assert_array_equal(masked_a ^ masked_b, supervised)  # exactly one view
  assert not (masked_a & masked_b).any()
  np.testing.assert_array_equal(np.where(masked_a, ids, noisy[:4]), ids)  # others unchanged
  np.testing.assert_array_equal(view_labels[:4], np.where(masked_a, labels, IGNORE))
  np.testing.assert_array_equal(view_labels[4:], np.where(masked_b, labels, IGNORE))


def _per_example_reference(model, ids, labels, view_a, block_size, view_b=None,
                           masked_input_weight=1.0, focal_gamma=0.0):
  """Loops over rows and views, each a [1, 2L] forward under an explicit spec mask.

  View B: ``view_b`` where given, else the complement of view A. A target whose left input
  is MASK counts ``masked_input_weight`` times; each term is scaled by ``(1 - p)^focal_gamma``."""
  view_b = ~view_a if view_b is None else view_b
  seq_len = ids.shape[1]
  allowed = masks.Explicit(jnp.asarray(_spec_mask(block_size, seq_len)))
  positions = np.concatenate([np.arange(seq_len), np.arange(seq_len)])[None]
  forward = nnx.jit(lambda m, tokens, pos: m(tokens, pos, mask=allowed)[0])
  total, count = 0.0, 0
  for n in range(ids.shape[0]):
    for masked in (view_a[n] & (labels[n] != IGNORE), view_b[n] & (labels[n] != IGNORE)):
      x_t = np.where(masked, MASK_ID, ids[n])
      tokens = np.concatenate([x_t, ids[n]])[None]
      logits = forward(model, jnp.asarray(tokens), jnp.asarray(positions))
      logits = np.asarray(logits[0, :seq_len], np.float64)
      for j in range(1, seq_len):
        if masked[j]:
          row = logits[j - 1]
          weight = masked_input_weight if x_t[j - 1] == MASK_ID else 1.0
          ce = np.log(np.exp(row - row.max()).sum()) + row.max() - row[labels[n, j]]
          total += weight * ce * (1.0 - np.exp(-ce)) ** focal_gamma
    count += int((labels[n, 1:] != IGNORE).sum())
  return total / count


@pytest.fixture(scope="module")
def tiny_model(tiny_qwen_dir):
  return load_model(tiny_qwen_dir)


_bd_loss = nnx.jit(objective.block_diffusion_loss,
                   static_argnames=("block_size", "mask_id", "share_clean_stream",
                                    "masked_input_weight", "focal_gamma"))
_ar_loss = nnx.jit(objective.autoregressive_loss)


def test_loss_equals_per_example_computation(tiny_model):
  ids, labels = _batch(2, rows=3, seq_len=16)
  view_a = np.asarray(objective.sample_block_masks(jax.random.key(5), jnp.asarray(labels), 4))
  loss, metrics = _bd_loss(
      tiny_model, jnp.asarray(ids), jnp.asarray(labels), jnp.asarray(view_a), block_size=4,
      mask_id=MASK_ID)
  want = _per_example_reference(tiny_model, ids, labels, view_a, 4)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert float(metrics["num_label_tokens"]) == (labels[:, 1:] != IGNORE).sum()


def test_masked_input_weights_match_a_loop():
  noisy = np.random.default_rng(0).integers(0, 4, (3, 11)).astype(np.int32)  # MASK id 3
  got = np.asarray(objective.masked_input_weights(jnp.asarray(noisy), 3, 2.5))
  want = np.ones(noisy.shape, np.float32)
  for n in range(noisy.shape[0]):
    for j in range(1, noisy.shape[1]):
      if noisy[n, j - 1] == 3:
        want[n, j] = 2.5
  np.testing.assert_array_equal(got, want)
  assert (want == 2.5).any() and (want[:, 1:] == 1.0).any()


@pytest.mark.parametrize("share_clean_stream", [False, True])
def test_masked_input_weight_scales_predictions_made_at_a_mask(tiny_model, share_clean_stream):
  ids, labels = _batch(4, rows=3, seq_len=16)
  view_a = np.asarray(objective.sample_block_masks(jax.random.key(9), jnp.asarray(labels), 4))
  loss, metrics = _bd_loss(
      tiny_model, jnp.asarray(ids), jnp.asarray(labels), jnp.asarray(view_a), block_size=4,
      mask_id=MASK_ID, share_clean_stream=share_clean_stream, masked_input_weight=3.0)
  want = _per_example_reference(tiny_model, ids, labels, view_a, 4, masked_input_weight=3.0)
  plain = _per_example_reference(tiny_model, ids, labels, view_a, 4)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert want > plain * 1.2  # the weight reaches a real share of the terms
  assert float(metrics["num_label_tokens"]) == (labels[:, 1:] != IGNORE).sum()  # not weighted


@pytest.mark.parametrize("gamma", [1.0, 2.0])
def test_focal_gamma_scales_each_term_by_one_minus_p(tiny_model, gamma):
  ids, labels = _batch(5, rows=3, seq_len=16)
  view_a = np.asarray(objective.sample_block_masks(jax.random.key(4), jnp.asarray(labels), 4))
  loss, _ = _bd_loss(tiny_model, jnp.asarray(ids), jnp.asarray(labels), jnp.asarray(view_a),
                     block_size=4, mask_id=MASK_ID, focal_gamma=gamma, masked_input_weight=2.0)
  want = _per_example_reference(tiny_model, ids, labels, view_a, 4, masked_input_weight=2.0,
                                focal_gamma=gamma)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  plain = _per_example_reference(tiny_model, ids, labels, view_a, 4, masked_input_weight=2.0)
  assert 0 < want < plain


@pytest.mark.parametrize("bad", [0.5, -1.0, float("nan"), float("inf"), True, "2"])
def test_focal_gamma_errors_name_the_value(bad):
  with pytest.raises(ValueError, match=r"focal_gamma=.* must be 0 \(plain cross-entropy\) or"):
    objective.check_focal_gamma(bad)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "2"])
def test_masked_input_weight_errors_name_the_value(bad):
  with pytest.raises(ValueError, match=r"masked_input_weight=.* must be a finite number > 0"):
    objective.check_masked_input_weight(bad)


def test_loss_with_an_independent_view_b(tiny_model):
  ids, labels = _batch(7, rows=3, seq_len=16)
  view_a, view_b = (np.asarray(v) for v in objective.sample_view_masks(
      jax.random.key(8), jnp.asarray(labels), 4, mask_ratio_range=(0.1, 0.6),
      complementary=False))
  args = (tiny_model, jnp.asarray(ids), jnp.asarray(labels), jnp.asarray(view_a))
  loss, _ = _bd_loss(*args, jnp.asarray(view_b), block_size=4, mask_id=MASK_ID)
  want = _per_example_reference(tiny_model, ids, labels, view_a, 4, view_b=view_b)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  # An explicit complement is the default view B.
  explicit, _ = _bd_loss(*args, jnp.asarray(~view_a), block_size=4, mask_id=MASK_ID)
  default, _ = _bd_loss(*args, block_size=4, mask_id=MASK_ID)
  assert float(explicit) == float(default) != float(loss)


def test_loss_matches_torch_reference_formulation(tiny_qwen_dir, tiny_model):
  """The same objective written the reference's way on the transformers model (4-D mask)."""
  import torch
  import transformers
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(
      tiny_qwen_dir, dtype=torch.float32).eval()
  ids, labels = _batch(3, rows=2, seq_len=16)
  view_a = np.asarray(objective.sample_block_masks(jax.random.key(9), jnp.asarray(labels), 8))
  seq_len = 16
  inputs, view_labels = [], []
  for masked_sel in (view_a, ~view_a):
    masked = masked_sel & (labels != IGNORE)
    x_t = np.where(masked, MASK_ID, ids)
    inputs.append(np.concatenate([x_t, ids], axis=1))
    view_labels.append(np.where(masked, labels, IGNORE))
  inputs, view_labels = np.concatenate(inputs), np.concatenate(view_labels)
  mask4d = np.broadcast_to(_spec_mask(8, seq_len), (len(inputs), 1, 2 * seq_len, 2 * seq_len))
  positions = np.broadcast_to(np.concatenate([np.arange(seq_len)] * 2), inputs.shape)
  with torch.no_grad():
    out = torch_model(torch.from_numpy(inputs.astype(np.int64)),
                      attention_mask=torch.from_numpy(np.ascontiguousarray(mask4d)),
                      position_ids=torch.from_numpy(np.ascontiguousarray(positions)))
    logits = out.logits[:, :seq_len]
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        torch.from_numpy(view_labels[:, 1:].astype(np.int64)).reshape(-1),
        ignore_index=IGNORE, reduction="sum")
  want = float(ce) / (labels[:, 1:] != IGNORE).sum()
  loss, _ = _bd_loss(tiny_model, jnp.asarray(ids), jnp.asarray(labels),
                                           jnp.asarray(view_a), block_size=8, mask_id=MASK_ID)
  np.testing.assert_allclose(float(loss), want, rtol=2e-5)


def test_gradients_finite_and_nonzero():
  config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8)
  model = Transformer(config, rngs=nnx.Rngs(0))
  ids, labels = _batch(4, rows=2, seq_len=16, vocab=60)
  view_a = objective.sample_block_masks(jax.random.key(1), jnp.asarray(labels), 8)
  graphdef, state = nnx.split(model)

  def loss_fn(state):
    return objective.block_diffusion_loss(nnx.merge(graphdef, state), jnp.asarray(ids),
                                          jnp.asarray(labels), view_a, block_size=8,
                                          mask_id=63)[0]

  grads = jax.jit(jax.grad(loss_fn))(state)
  leaves = jax.tree.leaves(grads)
  assert leaves and all(bool(jnp.isfinite(g).all()) for g in leaves)
  assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0


def test_autoregressive_loss_equals_plain_next_token_ce(tiny_model):
  ids, labels = _batch(5, rows=2, seq_len=12)
  loss, metrics = _ar_loss(tiny_model, jnp.asarray(ids), jnp.asarray(labels))
  logits = np.asarray(tiny_model(jnp.asarray(ids))[0], np.float64)
  total, count = 0.0, 0
  for n in range(2):
    for j in range(1, 12):
      if labels[n, j] != IGNORE:
        row = logits[n, j - 1]
        total += np.log(np.exp(row - row.max()).sum()) + row.max() - row[labels[n, j]]
        count += 1
  np.testing.assert_allclose(float(loss), total / count, rtol=1e-5)
  assert float(metrics["num_label_tokens"]) == count


def test_no_labels_gives_zero_loss_not_nan(tiny_model):
  ids, _ = _batch(6, rows=1, seq_len=8)
  labels = np.full_like(ids, IGNORE)
  loss, _ = _bd_loss(tiny_model, jnp.asarray(ids), jnp.asarray(labels),
                                           jnp.zeros(ids.shape, bool), block_size=4,
                                           mask_id=MASK_ID)
  assert float(loss) == 0.0


# -- chunked LM head + cross-entropy


def _loss_and_grads(model, ids, labels, view_a, chunk, objective_name, block_size=8):
  graphdef, state = nnx.split(model)
  # "weighted": block diffusion with a masked-input weight (its weights are chunked too) and
  # the focal loss
  weight, gamma = (2.5, 2.0) if objective_name == "weighted" else (1.0, 0.0)

  def loss_fn(state):
    m = nnx.merge(graphdef, state)
    if objective_name in ("block_diffusion", "weighted"):
      return objective.block_diffusion_loss(m, ids, labels, view_a, block_size=block_size,
                                            mask_id=63, loss_chunk_size=chunk,
                                            masked_input_weight=weight,
                                            focal_gamma=gamma)[0]
    return objective.autoregressive_loss(m, ids, labels, loss_chunk_size=chunk)[0]

  return jax.jit(jax.value_and_grad(loss_fn))(state)


@pytest.mark.parametrize("objective_name", ["block_diffusion", "weighted", "autoregressive"])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("chunk", [1, 5, 16])  # 5 does not divide the 31 shifted positions
def test_chunked_loss_and_gradients_equal_unchunked(objective_name, tied, chunk):
  config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                       tie_word_embeddings=tied)
  model = Transformer(config, rngs=nnx.Rngs(3))
  ids, labels = _batch(8, rows=2, seq_len=32, vocab=60)
  ids, labels = jnp.asarray(ids), jnp.asarray(labels)
  view_a = objective.sample_block_masks(jax.random.key(2), labels, 8)
  want_loss, want_grads = _loss_and_grads(model, ids, labels, view_a, None, objective_name)
  loss, grads = _loss_and_grads(model, ids, labels, view_a, chunk, objective_name)
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
  assert float(want_loss) > 0
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("complementary", [True, False])
@pytest.mark.parametrize("attention_impl", ["xla", "pallas"])
def test_shared_clean_stream_equals_two_rows(complementary, attention_impl):
  """x_t^A ++ x_t^B ++ x_0 [N, 3L] gives the loss and gradients of two x_t ++ x_0 rows."""
  config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8)
  graphdef, state = nnx.split(Transformer(config, rngs=nnx.Rngs(5)))
  ids, labels = _batch(9, rows=3, seq_len=32, vocab=60)
  ids, labels = jnp.asarray(ids), jnp.asarray(labels)
  view_a, view_b = objective.sample_view_masks(jax.random.key(6), labels, 8,
                                               complementary=complementary)

  def loss_and_grads(shared, impl):
    def loss_fn(state):
      return objective.block_diffusion_loss(
          nnx.merge(graphdef, state), ids, labels, view_a, view_b, block_size=8, mask_id=63,
          attention_impl=impl, loss_chunk_size=7, share_clean_stream=shared)[0]
    return jax.jit(jax.value_and_grad(loss_fn))(state)

  want_loss, want_grads = loss_and_grads(False, "xla")
  loss, grads = loss_and_grads(True, attention_impl)
  assert float(want_loss) > 0
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=1e-6)


def test_chunked_head_sums_count_only_real_positions():
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.standard_normal((2, 11, 6)), jnp.float32)
  weight = jnp.asarray(rng.standard_normal((6, 9)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 9, (2, 11)), jnp.int32).at[0, 3:6].set(IGNORE)
  head = lambda h: h @ weight
  want = objective.shifted_cross_entropy_sums(head(hidden), labels)
  for chunk in (1, 3, 4, 10, 64):
    got = objective.head_shifted_cross_entropy_sums(head, hidden, labels, chunk)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    assert float(got[1]) == 2 * 10 - 3  # padding of the last chunk carries no loss


@pytest.mark.parametrize("bad", [0, -4, 2.5, True, "64"])
def test_chunk_size_errors_name_the_value(bad):
  with pytest.raises(ValueError, match="loss_chunk_size"):
    objective.head_shifted_cross_entropy_sums(lambda h: h, jnp.zeros((1, 4, 2)),
                                              jnp.zeros((1, 4), jnp.int32), bad)


def test_chunking_bounds_the_memory_of_the_logits():
  """Compiled temporary memory of loss + gradients: the [rows, T, vocab] logits (and their
  gradient) dominate unchunked; chunked they shrink to [rows, chunk, vocab]. (What is left is
  mostly the dense attention scores, which grow with seq_len squared: kept short here.)"""
  vocab, seq_len, rows = 16384, 128, 2
  config = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48,
                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=8)
  graphdef, state = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
  ids = jnp.zeros((rows, seq_len), jnp.int32)

  def temp_bytes(chunk):
    def loss_fn(state):
      return objective.autoregressive_loss(nnx.merge(graphdef, state), ids, ids,
                                           loss_chunk_size=chunk)[0]
    compiled = jax.jit(jax.grad(loss_fn)).lower(state).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  logits_bytes = rows * seq_len * vocab * 4  # 16 MiB
  unchunked, chunk_32, chunk_8 = temp_bytes(None), temp_bytes(32), temp_bytes(8)
  assert unchunked >= 2 * logits_bytes  # the logits and their gradient
  # a chunk holds its logits, their exponentials and their gradient: 3 x chunk / seq_len
  assert chunk_8 < chunk_32 < unchunked / 2, (unchunked, chunk_32, chunk_8)
  assert chunk_8 < logits_bytes / 2, (unchunked, chunk_32, chunk_8)
