"""Block-diffusion ``generate`` and the AR baseline ``generate_ar`` (spec section 4).

The cached, jitted engine is checked token for token against deliberately simple references
written here: the no-cache one re-runs the whole sequence with the block-causal mask at every
step; the DualCache one follows spec 4.6 literally with two cache objects and Python loops.
"""

import collections
import importlib
import warnings

import jax
import numpy as np
import pytest
from flax import nnx

import fdllm_jax
from fdllm_jax import masks
from fdllm_jax.cache import KVCache
from fdllm_jax.config import ModelConfig
from fdllm_jax.model import Transformer

generate_lib = importlib.import_module("fdllm_jax.generate")  # the package attribute is the function

VOCAB, MASK, STOP = 517, 516, 515
BLOCK, SUB = 32, 8
CONFIG = ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     rope_theta=10000.0)


def _model(seed, head_scale=1.0):
  model = Transformer(CONFIG, rngs=nnx.Rngs(seed))
  model.lm_head.kernel[...] = model.lm_head.kernel[...] * head_scale
  return model


@pytest.fixture(scope="module")
def plain_model():
  """Random weights: confidences near 1/V, so one token per step."""
  return _model(1)


@pytest.fixture(scope="module")
def confident_model():
  """Output head scaled up: many positions pass a 0.9 / 0.5 threshold in one step."""
  return _model(2, head_scale=80.0)


def _prompt(length, seed=0):
  return np.random.RandomState(seed + length).randint(0, STOP, length).tolist()


def _config(**overrides):
  kwargs = dict(block_size=BLOCK, sub_block_size=SUB, threshold=0.9, max_new_tokens=40,
                mask_id=MASK, stop_ids=(STOP,))
  kwargs.update(overrides)
  return fdllm_jax.DecodeConfig(**kwargs)


# ------------------------------------------------------------------------ simple references

def _argmax_no_mask(logits_V):
  logits_V = np.asarray(logits_V, np.float64).copy()
  probs = np.exp(logits_V - logits_V.max())
  probs /= probs.sum()
  logits_V[MASK] = -np.inf
  token = int(np.argmax(logits_V))
  return token, probs[token]


def _window_stopped(seq, lo, hi, stop_ids):
  """Stop rule: a stop id in seq[lo:hi] with no MASK before it."""
  for i in range(lo, hi):
    if seq[i] == MASK:
      return False
    if seq[i] in stop_ids:
      return True
  return False


def _finish(seq, steps, prompt_len, limit, stop_ids, forwards, finished):
  """(tokens, steps, finished, forwards, confidences); ``steps`` maps position -> (step, conf)."""
  generated = seq[prompt_len:limit]
  end = next((i for i, t in enumerate(generated) if t in stop_ids or t == MASK), len(generated))
  fixed = [steps[prompt_len + i] for i in range(end)]
  return (generated[:end], [step for step, _ in fixed], finished, forwards,
          [conf for _, conf in fixed])


def _note(kinds, kind):
  if kinds is not None:
    kinds.append(kind)


def reference_no_cache(model, prompt, *, threshold, max_new_tokens, stop_ids=(STOP,),
                       kinds=None):
  """Spec 4 greedy, without cache: every forward re-runs the whole sequence (block-causal).

  ``kinds``, if a list, receives each forward's kind: "prefill", "full" (a step), "commit".
  """
  logits_of = lambda seq: np.asarray(fdllm_jax.compute_logits(
      model, np.asarray([seq]), attention="block_causal", block_size=BLOCK))[0]
  P, limit = len(prompt), len(prompt) + max_new_tokens
  seq, steps, forwards, row_step = list(prompt), {}, 0, 0
  start = P // BLOCK * BLOCK
  if start:
    logits = logits_of(seq[:start])
    forwards += 1
    _note(kinds, "prefill")
    if P == start:
      row_step += 1
      seq.append(_argmax_no_mask(logits[-1])[0])
      steps[P] = row_step, _argmax_no_mask(logits[-1])[1]
  while True:
    seq = seq + [MASK] * (start + BLOCK - len(seq))
    lo, hi = max(start, P), min(start + BLOCK, limit)
    for sub in range(BLOCK // SUB):
      sub_lo, sub_hi = start + sub * SUB, start + (sub + 1) * SUB
      while True:
        if _window_stopped(seq, lo, hi, stop_ids):
          return _finish(seq, steps, P, limit, stop_ids, forwards, True)
        candidates = [i for i in range(max(sub_lo, P), min(sub_hi, limit)) if seq[i] == MASK]
        if not candidates:
          break
        logits = logits_of(seq)
        forwards += 1
        _note(kinds, "full")
        row_step += 1
        choices = {i: _argmax_no_mask(logits[max(i - 1, start)]) for i in candidates}
        best = max(candidates, key=lambda i: (choices[i][1], -i))
        for i in candidates:
          if choices[i][1] > threshold or i == best:
            seq[i] = choices[i][0]
            steps[i] = row_step, choices[i][1]
    if _window_stopped(seq, lo, hi, stop_ids):
      return _finish(seq, steps, P, limit, stop_ids, forwards, True)
    if start + BLOCK >= limit:
      return _finish(seq, steps, P, limit, stop_ids, forwards, False)
    logits = logits_of(seq)  # the commit forward: the clean window's K/V and the next token
    forwards += 1
    _note(kinds, "commit")
    row_step += 1
    seq.append(_argmax_no_mask(logits[-1])[0])
    steps[start + BLOCK] = row_step, _argmax_no_mask(logits[-1])[1]
    start += BLOCK


@nnx.jit(static_argnames=("mask",))
def _cached_forward(model, tokens, cache, write_start, kv_length, mask):
  logits, cache = model(tokens, mask=mask, cache=cache, write_start=write_start,
                        kv_lengths=kv_length[None])
  return logits, cache


def reference_dual_cache(model, prompt, *, threshold, max_new_tokens, stop_ids=(STOP,),
                         kinds=None):
  """Spec 4.6 literally: a prefix cache, plus a block cache refreshed by full-window forwards
  while the sub-block's first position is MASK and updated S slots at a time otherwise.
  ``kinds`` as in ``reference_no_cache``, with "sub" for an S-token step."""
  P, limit = len(prompt), len(prompt) + max_new_tokens
  total = -(-limit // BLOCK) * BLOCK
  prefix = KVCache.init(CONFIG, 1, total)
  seq, steps, forwards, row_step = list(prompt), {}, 0, 0
  start = P // BLOCK * BLOCK
  i32 = lambda v: np.int32(v)
  if start:
    logits, prefix = _cached_forward(model, np.asarray([seq[:start]]), prefix, i32(0),
                                     i32(start), masks.BlockCausal(BLOCK))
    forwards += 1
    _note(kinds, "prefill")
    if P == start:
      row_step += 1
      seq.append(_argmax_no_mask(np.asarray(logits)[0, -1])[0])
      steps[P] = row_step, _argmax_no_mask(np.asarray(logits)[0, -1])[1]
  while True:
    seq = seq + [MASK] * (start + BLOCK - len(seq))
    lo, hi = max(start, P), min(start + BLOCK, limit)
    block_cache = None
    for sub in range(BLOCK // SUB):
      sub_lo, sub_hi = start + sub * SUB, start + (sub + 1) * SUB
      while True:
        if _window_stopped(seq, lo, hi, stop_ids):
          return _finish(seq, steps, P, limit, stop_ids, forwards, True)
        candidates = [i for i in range(max(sub_lo, P), min(sub_hi, limit)) if seq[i] == MASK]
        if not candidates:
          break
        if block_cache is None or seq[sub_lo] == MASK:
          logits, block_cache = _cached_forward(
              model, np.asarray([seq[start:start + BLOCK]]), prefix, i32(start),
              i32(start + BLOCK), masks.Full())
          logits, first = np.asarray(logits)[0], start
          _note(kinds, "full")
        else:
          logits, block_cache = _cached_forward(
              model, np.asarray([seq[sub_lo:sub_hi]]), block_cache, i32(sub_lo),
              i32(start + BLOCK), masks.Full())
          logits, first = np.asarray(logits)[0], sub_lo
          _note(kinds, "sub")
        forwards += 1
        row_step += 1
        choices = {i: _argmax_no_mask(logits[max(i - 1, first) - first]) for i in candidates}
        best = max(candidates, key=lambda i: (choices[i][1], -i))
        for i in candidates:
          if choices[i][1] > threshold or i == best:
            seq[i] = choices[i][0]
            steps[i] = row_step, choices[i][1]
    if _window_stopped(seq, lo, hi, stop_ids):
      return _finish(seq, steps, P, limit, stop_ids, forwards, True)
    if start + BLOCK >= limit:
      return _finish(seq, steps, P, limit, stop_ids, forwards, False)
    logits, prefix = _cached_forward(model, np.asarray([seq[start:start + BLOCK]]), prefix,
                                     i32(start), i32(start + BLOCK), masks.Full())
    forwards += 1
    _note(kinds, "commit")
    row_step += 1
    seq.append(_argmax_no_mask(np.asarray(logits)[0, -1])[0])
    steps[start + BLOCK] = row_step, _argmax_no_mask(np.asarray(logits)[0, -1])[1]
    start += BLOCK


def _assert_same(out, row, ref):
  tokens, steps, finished, _, confidences = ref
  assert out.tokens[row] == tokens
  assert out.step_of_token[row] == steps
  assert out.finished[row] == finished
  # the confidence each token had when fixed: the softmax probability of that forward
  np.testing.assert_allclose(out.confidence_of_token[row], confidences, rtol=1e-4, atol=1e-6)


# -------------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("prompt_len", [5, 32, 45])
@pytest.mark.parametrize("threshold", [1.0, 0.9, 0.5])
@pytest.mark.parametrize("confident", [False, True])
def test_matches_no_cache_reference(plain_model, confident_model, prompt_len, threshold,
                                    confident):
  model = confident_model if confident else plain_model
  prompt = _prompt(prompt_len)
  out = fdllm_jax.generate(model, [prompt], _config(threshold=threshold, stop_ids=()))
  ref = reference_no_cache(model, prompt, threshold=threshold, max_new_tokens=40, stop_ids=())
  _assert_same(out, 0, ref)
  assert out.num_forwards == ref[3]
  assert len(out.tokens[0]) == 40
  if confident and threshold < 1.0:  # parallel unmasking really happened
    assert out.num_forwards < 30


def test_long_prompt_prefill_runs_in_a_padded_bucket(confident_model):
  # 288 prompt tokens are prefilled by a 320-token forward (the shape bucket); the padding
  # must change nothing.
  assert generate_lib.bucket(288, BLOCK) == 320
  prompt = _prompt(290)
  out = fdllm_jax.generate(confident_model, [prompt], _config(max_new_tokens=20, stop_ids=()))
  _assert_same(out, 0, reference_no_cache(confident_model, prompt, threshold=0.9,
                                          max_new_tokens=20, stop_ids=()))


def test_shape_buckets_are_block_multiples_with_bounded_waste():
  sizes = [1, 32, 33, 100, 256, 257, 1000, 2100, 5000]
  assert [generate_lib.bucket(n, 32) for n in sizes] == [32, 32, 64, 128, 256, 320, 1024, 2560,
                                                        5120]
  for n in range(1, 5000, 7):
    b = generate_lib.bucket(n, 32)
    assert b % 32 == 0 and n <= b < max(n * 1.25, n + 32)


@pytest.mark.parametrize("prompt_len", [5, 32, 45])
@pytest.mark.parametrize("threshold", [1.0, 0.7])
def test_dual_cache_matches_literal_reference(plain_model, confident_model, prompt_len,
                                              threshold):
  model = confident_model if threshold < 1.0 else plain_model
  prompt = _prompt(prompt_len)
  out = fdllm_jax.generate(model, [prompt], _config(threshold=threshold, stop_ids=(),
                                                    use_dual_cache=True))
  ref = reference_dual_cache(model, prompt, threshold=threshold, max_new_tokens=40,
                             stop_ids=())
  _assert_same(out, 0, ref)
  assert out.num_forwards == ref[3]


@pytest.mark.parametrize("dual", [False, True])
@pytest.mark.parametrize("prompt_len,max_new", [(5, 40), (31, 2), (32, 40), (45, 52), (64, 1),
                                                (70, 33)])
def test_threshold_one_fixes_one_token_per_forward(plain_model, dual, prompt_len, max_new):
  # Every forward but a prefill that yields no token fixes exactly one token, so
  # num_forwards = max_new + [P >= B] - [P % B == 0], and the row's steps are 1..max_new.
  out = fdllm_jax.generate(plain_model, [_prompt(prompt_len)],
                           _config(threshold=1.0, max_new_tokens=max_new, stop_ids=(),
                                   use_dual_cache=dual))
  expected = max_new + (prompt_len >= BLOCK) - (prompt_len % BLOCK == 0)
  assert out.num_forwards == expected
  assert len(out.tokens[0]) == max_new
  assert sorted(out.step_of_token[0]) == list(range(1, max_new + 1))


def _stop_token_of(tokens, index=10):
  return tokens[index]


@pytest.mark.parametrize("dual", [False, True])
def test_batch_invariance_with_ragged_prompts_and_stops(confident_model, dual):
  lengths = [5, 70, 32, 1, 45]
  prompts = [_prompt(n, seed=3) for n in lengths]
  base = _config(threshold=0.9, max_new_tokens=45, stop_ids=(), use_dual_cache=dual)
  free = fdllm_jax.generate(confident_model, prompts, base)
  # A stop id that row 2 produces mid-way: rows then finish at different times.
  stop = _stop_token_of(free.tokens[2], 20)
  config = _config(threshold=0.9, max_new_tokens=45, stop_ids=(stop,), use_dual_cache=dual)
  batch = fdllm_jax.generate(confident_model, prompts, config)
  assert any(batch.finished) and batch.finished[2]
  for row, prompt in enumerate(prompts):
    alone = fdllm_jax.generate(confident_model, [prompt], config)
    assert batch.tokens[row] == alone.tokens[0], row
    assert batch.step_of_token[row] == alone.step_of_token[0], row
    assert batch.finished[row] == alone.finished[0], row
    # Stopping only cuts: the tokens before the first stop are those decoded without stop.
    cut = free.tokens[row].index(stop) if stop in free.tokens[row] else len(free.tokens[row])
    assert batch.tokens[row] == free.tokens[row][:cut], row
    assert batch.finished[row] == (stop in free.tokens[row])


def test_batch_matches_no_cache_reference(confident_model):
  prompts = [_prompt(n, seed=5) for n in (40, 9)]
  out = fdllm_jax.generate(confident_model, prompts, _config(threshold=0.5, stop_ids=()))
  for row, prompt in enumerate(prompts):
    _assert_same(out, row, reference_no_cache(confident_model, prompt, threshold=0.5,
                                              max_new_tokens=40, stop_ids=()))


def _batch_schedule(row_kinds, dual):
  """Forwards a batch needs when each row runs, in its own window, the forwards it runs alone
  (``kinds`` of the references): one prefill for the rows that have one, then without
  DualCache every forward serves every row; with it a full-window forward serves the rows that
  need one (a step or a commit), then S-token forwards follow while at least as many rows need
  one."""
  queues = [[k for k in kinds if k != "prefill"] for kinds in row_kinds]
  forwards = int(any("prefill" in kinds for kinds in row_kinds))
  if not dual:
    return forwards + max(len(q) for q in queues)
  wants = lambda kind: [bool(q) and (q[0] == "sub") == (kind == "sub") for q in queues]
  serve = lambda rows: [q.pop(0) for q, r in zip(queues, rows) if r]
  while any(queues):
    serve(wants("full"))
    forwards += 1
    while any(wants("sub")) and sum(wants("sub")) >= sum(wants("full")):
      serve(wants("sub"))
      forwards += 1
  return forwards


@pytest.mark.parametrize("dual", [False, True])
def test_rows_move_their_own_windows(confident_model, dual):
  # A row never waits for another to finish a block nor commits windows of its prompt: the
  # batch runs exactly the forwards of _batch_schedule (the reference's window and prefill,
  # shared by the batch, need more).
  lengths = [5, 70, 32, 1, 45, 9]
  prompts = [_prompt(n, seed=3) for n in lengths]
  reference = reference_dual_cache if dual else reference_no_cache
  free = [reference(confident_model, p, threshold=0.9, max_new_tokens=45, stop_ids=())
          for p in prompts]
  stop = free[2][0][20]  # rows then finish at different times
  kinds = [[] for _ in prompts]
  refs = [reference(confident_model, p, threshold=0.9, max_new_tokens=45, stop_ids=(stop,),
                    kinds=k) for p, k in zip(prompts, kinds)]
  out = fdllm_jax.generate(confident_model, prompts,
                           _config(max_new_tokens=45, stop_ids=(stop,), use_dual_cache=dual))
  for row, ref in enumerate(refs):
    _assert_same(out, row, ref)
  assert out.finished[2] and not all(out.finished)
  assert out.num_forwards == _batch_schedule(kinds, dual)
  if dual:
    assert {"full", "sub", "commit"} <= {k for row in kinds for k in row}


@pytest.mark.parametrize("dual", [False, True])
def test_max_batch_size_streams_prompts_through_the_rows(confident_model, dual):
  # 7 prompts through 3 rows: an ended row takes the next prompt, whose prompt blocks enter
  # through its window instead of a prefill. Every prompt's result is that of one batch.
  lengths = [5, 70, 32, 1, 45, 9, 64]
  prompts = [_prompt(n, seed=4) for n in lengths]
  free = fdllm_jax.generate(confident_model, prompts, _config(max_new_tokens=40, stop_ids=(),
                                                              use_dual_cache=dual))
  stop = free.tokens[1][15]
  config = _config(max_new_tokens=40, stop_ids=(stop,), use_dual_cache=dual)
  one_batch = fdllm_jax.generate(confident_model, prompts, config)
  reports = []
  streamed = fdllm_jax.generate(confident_model, prompts, config, max_batch_size=3,
                                progress=lambda done, total: reports.append((done, total)))
  assert streamed.tokens == one_batch.tokens
  assert streamed.step_of_token == one_batch.step_of_token
  assert streamed.finished == one_batch.finished and any(streamed.finished)
  np.testing.assert_allclose(sum(streamed.confidence_of_token, []),
                             sum(one_batch.confidence_of_token, []), rtol=1e-4, atol=1e-6)
  assert reports[-1] == (280, 280)  # 7 prompts x 40 positions
  assert [d for d, _ in reports] == sorted(d for d, _ in reports)
  # Three rows take more forwards than seven, fewer than 7 prompts one after the other.
  alone = sum(fdllm_jax.generate(confident_model, [p], config).num_forwards for p in prompts)
  assert one_batch.num_forwards < streamed.num_forwards < alone
  # A batch no larger than max_batch_size is one batch: one device call.
  whole = fdllm_jax.generate(confident_model, prompts, config, max_batch_size=7)
  assert whole.tokens == one_batch.tokens and whole.host_syncs == 1
  with pytest.raises(ValueError, match="max_batch_size must be None or an integer >= 1; got 0"):
    fdllm_jax.generate(confident_model, prompts, config, max_batch_size=0)


def test_max_batch_size_keeps_each_prompts_samples(plain_model):
  # Sampling keys follow the prompt, not the row it is decoded in: streamed rows draw what one
  # batch draws (identical prompts 0 and 1 still draw different tokens).
  prompts = [_prompt(n, seed=12) for n in (6, 6, 37, 3, 40)]
  prompts[1] = list(prompts[0])
  config = _config(temperature=1.0, top_p=0.9, seed=3, stop_ids=(), max_new_tokens=24)
  one_batch = fdllm_jax.generate(plain_model, prompts, config)
  streamed = fdllm_jax.generate(plain_model, prompts, config, max_batch_size=2)
  assert streamed.tokens == one_batch.tokens
  assert streamed.tokens[0] != streamed.tokens[1]


@pytest.mark.parametrize("dual", [False, True])
def test_sampled_threshold_one_is_batch_invariant(dual):
  # Sharp distributions at top-p 0.5: many positions have a one-token nucleus, confidence 1.0,
  # and the first of them commits; a row decodes the same alone, in a batch or streamed.
  model = _model(8, head_scale=20.0)
  prompts = [_prompt(n, seed=5) for n in (56, 47, 5, 74)]
  config = _config(threshold=1.0, temperature=0.5, top_p=0.5, seed=23, max_new_tokens=51,
                   use_dual_cache=dual)
  one_batch = fdllm_jax.generate(model, prompts, config)
  streamed = fdllm_jax.generate(model, prompts, config, max_batch_size=1)
  alone = fdllm_jax.generate(model, prompts[:1], config)
  assert streamed.tokens == one_batch.tokens
  assert streamed.step_of_token == one_batch.step_of_token
  assert alone.tokens[0] == one_batch.tokens[0]


def test_stop_at_first_token_and_finished_rows_freeze(plain_model):
  prompt = _prompt(32)
  first = fdllm_jax.generate(plain_model, [prompt], _config(max_new_tokens=1, stop_ids=()))
  stop = first.tokens[0][0]  # the prefill's token
  out = fdllm_jax.generate(plain_model, [prompt, _prompt(7)], _config(stop_ids=(stop,)))
  assert out.tokens[0] == [] and out.finished[0] and out.step_of_token[0] == []
  alone = fdllm_jax.generate(plain_model, [_prompt(7)], _config(stop_ids=(stop,)))
  assert out.tokens[1] == alone.tokens[0]


def test_max_length_caps_generation_and_full_prompt_is_an_error(plain_model):
  out = fdllm_jax.generate(plain_model, [_prompt(8)], _config(max_length=11, stop_ids=()))
  assert len(out.tokens[0]) == 3 and not out.finished[0]
  with pytest.raises(ValueError, match=r"prompt 1 has 11 tokens.*max_length=11"):
    fdllm_jax.generate(plain_model, [_prompt(3), _prompt(11)], _config(max_length=11))
  with pytest.raises(ValueError, match="max_length"):
    fdllm_jax.generate_ar(plain_model, [_prompt(11)], max_new_tokens=4, max_length=11,
                          stop_ids=())


def test_max_length_past_the_trained_positions_warns(plain_model):
  trained = plain_model.config.max_position_embeddings
  with pytest.warns(UserWarning, match=f"max_length={trained + 1} exceeds the model's "
                                       f"max_position_embeddings={trained}"):
    fdllm_jax.generate(plain_model, [_prompt(8)],
                       _config(max_length=trained + 1, max_new_tokens=2))
  with pytest.warns(UserWarning, match="never trained"):
    fdllm_jax.generate_ar(plain_model, [_prompt(8)], max_new_tokens=2, max_length=trained + 1,
                          stop_ids=(STOP,))
  with warnings.catch_warnings():
    warnings.simplefilter("error")   # within the trained positions: silent
    fdllm_jax.generate(plain_model, [_prompt(8)], _config(max_length=trained, max_new_tokens=2))


# -------------------------------------------------------------------------------- sampling

def test_sampling_batch_reproducible_and_row_independent(plain_model):
  prompts = [_prompt(n, seed=7) for n in (6, 6, 37)]
  prompts[1] = list(prompts[0])  # identical prompts must still draw different tokens
  config = _config(temperature=1.0, top_p=0.9, seed=3, stop_ids=(), max_new_tokens=24)
  a = fdllm_jax.generate(plain_model, prompts, config)
  b = fdllm_jax.generate(plain_model, prompts, config)
  assert a.tokens == b.tokens
  assert a.tokens[0] != a.tokens[1]
  for row in a.tokens:
    assert len(row) == 24 and all(0 <= t < VOCAB and t != MASK for t in row)
  other_seed = fdllm_jax.generate(plain_model, prompts,
                                  _config(temperature=1.0, top_p=0.9, seed=4, stop_ids=(),
                                          max_new_tokens=24))
  assert other_seed.tokens != a.tokens
  alone = fdllm_jax.generate(plain_model, [prompts[0]], config)
  assert alone.tokens[0] == a.tokens[0]  # a row's draws do not depend on the other rows
  greedy = fdllm_jax.generate(plain_model, prompts, _config(stop_ids=(), max_new_tokens=24))
  assert greedy.tokens != a.tokens


def test_tiny_top_p_keeps_only_the_top_token(plain_model):
  prompts = [_prompt(n, seed=8) for n in (12, 40)]
  greedy = fdllm_jax.generate_ar(plain_model, prompts, max_new_tokens=12, stop_ids=())
  nucleus_of_one = fdllm_jax.generate_ar(plain_model, prompts, max_new_tokens=12, stop_ids=(),
                                         temperature=1.0, top_p=1e-6, seed=5)
  assert nucleus_of_one.tokens == greedy.tokens


def test_jax_enable_x64_decodes_the_same_tokens(confident_model):
  """A notebook that turned on 64-bit JAX: Python integers become int64 inside the jitted loop
  (the cache's dynamic_update_slice refused int64 beside int32 indices)."""
  runs = []
  for x64 in (True, False):  # 64-bit first: generate's executable cache would serve the other
    with jax.enable_x64(x64):
      runs.append([fdllm_jax.generate(confident_model, prompts, _config(use_dual_cache=dual)).tokens
                   for prompts in ([_prompt(5)], [_prompt(5), _prompt(37, seed=1)])
                   for dual in (False, True)])
      runs[-1].append(fdllm_jax.generate_ar(confident_model, [_prompt(37, seed=1)],
                                            max_new_tokens=12, stop_ids=(STOP,)).tokens)
  assert runs[0] == runs[1]


# ----------------------------------------------------------------------------- compilation

def test_same_bucket_does_not_recompile(plain_model):
  config = _config(max_new_tokens=20)
  fdllm_jax.generate(plain_model, [_prompt(40), _prompt(50)], config)
  before = dict(generate_lib.COMPILE_COUNT)
  # Same bucket: prefill 32 tokens, cache 96 slots, batch 2; other values, threshold and seed.
  out = fdllm_jax.generate(plain_model, [_prompt(33, seed=1), _prompt(60, seed=2)],
                           _config(max_new_tokens=30, threshold=0.6, seed=9))
  assert dict(generate_lib.COMPILE_COUNT) == before
  assert out.compile_seconds == 0.0
  assert out.host_syncs == 1  # the whole decode is one device call
  other_model = _model(11)  # another model of the same shapes reuses the executables
  fdllm_jax.generate(other_model, [_prompt(40), _prompt(50)], config)
  assert dict(generate_lib.COMPILE_COUNT) == before


def test_chunked_progress_gives_the_same_result(plain_model):
  prompts = [_prompt(n, seed=9) for n in (10, 50)]
  config = _config(max_new_tokens=70, stop_ids=())
  whole = fdllm_jax.generate(plain_model, prompts, config)
  reports = []
  chunked = fdllm_jax.generate(plain_model, prompts, config,
                               progress=lambda done, total: reports.append((done, total)))
  assert chunked.tokens == whole.tokens and chunked.num_forwards == whole.num_forwards
  assert reports[-1] == (140, 140) and len(reports) >= 3
  assert [d for d, _ in reports] == sorted(d for d, _ in reports)
  assert chunked.host_syncs == len(reports) + 1


# ------------------------------------------------------------------------------ AR baseline

@pytest.fixture(scope="module")
def hf_pair(tiny_qwen_dir):
  import transformers
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen_dir).eval()
  return torch_model, fdllm_jax.load_model(tiny_qwen_dir)


def _hf_greedy(torch_model, prompt, max_new_tokens):
  import torch
  with torch.no_grad():
    out = torch_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                                                                dtype=torch.long),
                               max_new_tokens=max_new_tokens, do_sample=False,
                               eos_token_id=None, pad_token_id=0, min_new_tokens=max_new_tokens)
  return out[0, len(prompt):].tolist()


def test_generate_ar_equals_transformers_greedy(hf_pair):
  torch_model, model = hf_pair
  prompts = [_prompt(n, seed=11) for n in (3, 33, 17)]
  out = fdllm_jax.generate_ar(model, prompts, max_new_tokens=25, stop_ids=())
  expected = [_hf_greedy(torch_model, p, 25) for p in prompts]
  assert out.tokens == expected
  assert out.num_forwards == 25  # prefill + 24 one-token steps
  assert out.step_of_token[0] == list(range(1, 26))
  # Stops: cut at the first stop id, the row is finished, the other rows unaffected.
  stop = expected[1][6]
  stopped = fdllm_jax.generate_ar(model, prompts, max_new_tokens=25, stop_ids=(stop,))
  for row, tokens in enumerate(expected):
    cut = tokens.index(stop) if stop in tokens else len(tokens)
    assert stopped.tokens[row] == tokens[:cut]
    assert stopped.finished[row] == (stop in tokens)


def test_generate_ar_sampling_reproducible(plain_model):
  prompts = [_prompt(n, seed=12) for n in (4, 4)]
  a = fdllm_jax.generate_ar(plain_model, prompts, max_new_tokens=16, stop_ids=(), temperature=1.0,
                            top_p=0.9, seed=1)
  b = fdllm_jax.generate_ar(plain_model, prompts, max_new_tokens=16, stop_ids=(), temperature=1.0,
                            top_p=0.9, seed=1)
  assert a.tokens == b.tokens and a.tokens[0] != a.tokens[1]



def test_generate_ar_max_batch_size_streams_prompts_through_the_rows(plain_model):
  # 7 ragged prompts through 3 rows: an ended row takes the next prompt (a one-row forward of
  # its prompt) while the others go on. Every prompt's result is that of one batch.
  prompts = [_prompt(n, seed=5) for n in (5, 70, 32, 1, 45, 9, 64)]
  free = fdllm_jax.generate_ar(plain_model, prompts, max_new_tokens=30, stop_ids=())
  stop = free.tokens[1][9]
  kwargs = dict(max_new_tokens=30, stop_ids=(stop,))
  one_batch = fdllm_jax.generate_ar(plain_model, prompts, **kwargs)
  assert any(one_batch.finished) and not all(one_batch.finished)
  reports = []
  streamed = fdllm_jax.generate_ar(plain_model, prompts, max_batch_size=3, **kwargs,
                                   progress=lambda done, total: reports.append((done, total)))
  assert streamed.tokens == one_batch.tokens
  assert streamed.finished == one_batch.finished
  assert streamed.step_of_token == one_batch.step_of_token
  assert reports[-1] == (210, 210)  # 7 prompts x 30 tokens
  assert [d for d, _ in reports] == sorted(d for d, _ in reports)
  # Three rows take more forwards than seven, fewer than the prompts one after the other.
  alone = sum(fdllm_jax.generate_ar(plain_model, [p], **kwargs).num_forwards for p in prompts)
  assert one_batch.num_forwards < streamed.num_forwards < alone
  again = fdllm_jax.generate_ar(plain_model, prompts[::-1], max_batch_size=3, **kwargs)
  assert again.compile_seconds == 0.0  # refills of any row share one executable
  # One row: each prompt's forwards as alone (the refill forward is its prompt's forward).
  assert fdllm_jax.generate_ar(plain_model, prompts, max_batch_size=1, **kwargs).num_forwards \
      == alone
  whole = fdllm_jax.generate_ar(plain_model, prompts, max_batch_size=7, **kwargs)
  assert whole.tokens == one_batch.tokens and whole.host_syncs == 1
  with pytest.raises(ValueError, match="max_batch_size must be None or an integer >= 1; got 0"):
    fdllm_jax.generate_ar(plain_model, prompts, max_batch_size=0, **kwargs)


def test_generate_ar_max_batch_size_keeps_each_prompts_samples(plain_model):
  # Keys follow the prompt and its own token count, not the row: streamed rows draw what one
  # batch draws, and identical prompts 0 and 1 still draw different tokens.
  prompts = [_prompt(n, seed=12) for n in (6, 6, 37, 3, 40)]
  prompts[1] = list(prompts[0])
  kwargs = dict(max_new_tokens=20, stop_ids=(), temperature=1.0, top_p=0.9, seed=3)
  one_batch = fdllm_jax.generate_ar(plain_model, prompts, **kwargs)
  streamed = fdllm_jax.generate_ar(plain_model, prompts, max_batch_size=2, **kwargs)
  assert streamed.tokens == one_batch.tokens
  assert streamed.tokens[0] != streamed.tokens[1]
  alone = fdllm_jax.generate_ar(plain_model, [prompts[2]], **kwargs)
  assert alone.tokens[0] != one_batch.tokens[2]  # a row's keys are its prompt's index

# ------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("overrides,match", [
    (dict(threshold=0.0), r"threshold must be in \(0, 1\]; got 0.0"),
    (dict(threshold=1.5), r"threshold must be in \(0, 1\]; got 1.5"),
    (dict(sub_block_size=5), r"sub_block_size=5 must divide block_size=32"),
    (dict(max_new_tokens=0), r"max_new_tokens must be an integer >= 1; got 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]; got 0.0"),
    (dict(temperature=-1.0), r"temperature must be a finite number >= 0; got -1.0"),
    (dict(stop_ids=(MASK,)), r"mask_id=516 is also in stop_ids"),
])
def test_config_errors_name_the_value(overrides, match):
  with pytest.raises(ValueError, match=match):
    _config(**overrides)


def test_config_is_hashable_and_normalises_stop_ids():
  a, b = _config(stop_ids=[STOP, 3]), _config(stop_ids=(STOP, 3))
  assert a == b and hash(a) == hash(b) and a.stop_ids == (STOP, 3)
  assert _config(stop_ids=STOP).stop_ids == (STOP,)


@pytest.mark.parametrize("prompts,match", [
    ([], "prompts is empty"),
    ([[1, 2], []], "prompt 1 is empty"),
    ([[1, VOCAB]], r"prompt 0: token id 517 .* outside the vocabulary \[0, 517\)"),
    ([[1, -2]], r"prompt 0: token id -2"),
    ([[4, 5], [1, MASK, 2]], r"prompt 1: holds the mask id 516 at position 1"),
])
def test_bad_prompts_name_the_value(plain_model, prompts, match):
  with pytest.raises(ValueError, match=match):
    fdllm_jax.generate(plain_model, prompts, _config())


def test_ids_outside_the_model_vocabulary(plain_model):
  with pytest.raises(ValueError, match=r"mask_id=600 is outside the model's vocabulary"):
    fdllm_jax.generate(plain_model, [[1]], _config(mask_id=600))
  with pytest.raises(ValueError, match=r"stop id=9999 is outside"):
    fdllm_jax.generate_ar(plain_model, [[1]], max_new_tokens=2, stop_ids=(9999,))
  with pytest.raises(ValueError, match=r"max_new_tokens must be an integer >= 1; got 0"):
    fdllm_jax.generate_ar(plain_model, [[1]], max_new_tokens=0)


@pytest.mark.parametrize("engine", ["diffusion", "dual_cache", "ar"])
def test_stale_cache_slots_never_reach_the_output(confident_model, monkeypatch, engine):
  """Cache slots past a row's kv_lengths hold whatever an earlier prompt of that row (or an
  earlier step) left there. Even NaN there must not reach any token: every cache starts
  filled with NaN instead of zeros, and the tokens are those of a clean run, in one batch and
  streamed through fewer rows (refilled rows keep their predecessor's slots)."""
  prompts = [_prompt(n, seed=9) for n in (5, 40, 17, 33)]

  def run():
    if engine == "ar":
      return [fdllm_jax.generate_ar(confident_model, prompts, max_new_tokens=24, stop_ids=(),
                                    max_batch_size=b).tokens for b in (None, 2)]
    config = _config(max_new_tokens=24, stop_ids=(), use_dual_cache=engine == "dual_cache")
    return [fdllm_jax.generate(confident_model, prompts, config, max_batch_size=b).tokens
            for b in (None, 2)]

  clean = run()
  clean_init = KVCache.init.__func__

  def nan_init(cls, *args, **kwargs):
    cache = clean_init(cls, *args, **kwargs)
    fill = lambda x: jax.numpy.full_like(x, jax.numpy.nan)
    return cache.replace(keys=tuple(map(fill, cache.keys)), values=tuple(map(fill, cache.values)))

  monkeypatch.setattr(KVCache, "init", classmethod(nan_init))
  monkeypatch.setattr(generate_lib, "_COMPILED", collections.OrderedDict())  # retrace
  assert run() == clean
