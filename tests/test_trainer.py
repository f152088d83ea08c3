"""Trainer: exact resume after SIGKILL, atomic saves, incompatible workdirs, export, MASK rows.

Heavier variants are marked slow: ``pytest -m slow tests/test_trainer.py``.
"""

import json
import os
import signal
import subprocess
import sys
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdllm_jax import sharding
from fdllm_jax.checkpoints import load_model
from fdllm_jax.tokenizer import load_tokenizer
from fdllm_jax.training import make_sample_data
from fdllm_jax.training import objective as objective_lib
from fdllm_jax.training import trainer as trainer_lib
from tests import hf_models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["TrainConfig.num_steps = 12", "TrainConfig.checkpoint_every = 4",
         "TrainConfig.seq_len = 64", "TrainConfig.export = False",
         "TrainConfig.progress_bar = False", "TrainConfig.keep_checkpoints = 5"]

# Runs train.py, SIGKILLing itself inside the data-state save of the N-th checkpoint (after the
# parameters of that checkpoint were handed to orbax, before it is finalised).
_KILL_DURING_SAVE = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from fdllm_jax.training import trainer
calls = []
original = trainer.DataStateHandler.save
def save(self, directory, args):
  original(self, directory, args)
  calls.append(directory)
  if len(calls) == {nth}:
    os.kill(os.getpid(), signal.SIGKILL)
trainer.DataStateHandler.save = save
import train
sys.exit(train.main(sys.argv[1:]))
"""


def _cli(workdir, params=(), gin_file="configs/tiny_cpu.gin"):
  args = ["--gin_file", gin_file, "--workdir", str(workdir)]
  for p in list(SMALL) + list(params):
    args += ["--gin_param", p]
  return args


def _run(argv, script=None, **kwargs):
  command = ([sys.executable, "-c", script] if script else [sys.executable, "train.py"]) + argv
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, **kwargs)


def _reference_losses(tmp_path, params=()):
  """The uninterrupted run, in this process, from the same gin files and bindings."""
  gin.clear_config()
  try:
    with _cwd(REPO):
      gin.parse_config_files_and_bindings(["configs/tiny_cpu.gin"], list(SMALL) + list(params))
      history = trainer_lib.train(str(tmp_path / "reference"))
  finally:
    gin.clear_config()
  return {h["step"]: h["loss"] for h in history}


class _cwd:
  def __init__(self, path):
    self.path = path

  def __enter__(self):
    self.old = os.getcwd()
    os.chdir(self.path)

  def __exit__(self, *exc):
    os.chdir(self.old)


def _assert_resumed_losses_equal(workdir, reference, resumed_from):
  metrics = trainer_lib.read_metrics(str(workdir))
  assert [m["step"] for m in metrics] == list(range(1, 13))
  after = {m["step"]: m["loss"] for m in metrics if m["step"] > resumed_from}
  assert after and len(after) == 12 - resumed_from
  for step, loss in after.items():
    assert loss == reference[step], (step, loss, reference[step])  # bitwise


def test_sigkill_during_a_save_then_resume_equals_uninterrupted_run(tmp_path):
  workdir = tmp_path / "run"
  killed = _run(_cli(workdir), script=_KILL_DURING_SAVE.format(repo=REPO, nth=2))
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  entries = os.listdir(workdir / "checkpoints")
  assert "4" in entries and "8" not in entries
  assert any(e.startswith("8.") and "tmp" in e for e in entries), entries  # the half-written one
  resumed = _run(_cli(workdir))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from" in resumed.stderr and "step 4" in resumed.stderr
  reference = _reference_losses(tmp_path)
  _assert_resumed_losses_equal(workdir, reference, resumed_from=4)
  assert sorted(int(e) for e in os.listdir(workdir / "checkpoints") if e.isdigit()) == [4, 8, 12]


@pytest.mark.slow
def test_external_sigkill_at_a_random_time_then_resume(tmp_path):
  """SIGKILL from outside once step 6 is logged (wherever the run is then), rerun, compare."""
  workdir = tmp_path / "run"
  command = [sys.executable, "train.py"] + _cli(workdir, ["TrainConfig.checkpoint_every = 2"])
  process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  metrics, deadline = workdir / "metrics.jsonl", time.time() + 300
  while time.time() < deadline and process.poll() is None:
    if metrics.exists() and sum(1 for _ in open(metrics)) >= 6:
      break
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  process.wait()
  steps = sorted(int(e) for e in os.listdir(workdir / "checkpoints") if e.isdigit())
  assert steps and steps[-1] < 12
  resumed = _run(_cli(workdir, ["TrainConfig.checkpoint_every = 2"]))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  reference = _reference_losses(tmp_path, ["TrainConfig.checkpoint_every = 2"])
  _assert_resumed_losses_equal(workdir, reference, resumed_from=steps[-1])


def _tiny_config(**overrides):
  fields = dict(
      data_files=make_sample_data.CHAT_FILE, tokenizer=make_sample_data.TOKENIZER_DIR,
      seq_len=32, block_size=8, init="scratch",
      model=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=16, rope_theta=10000.0),
      num_steps=3, global_batch_size=8, learning_rate=3e-3, warmup_steps=0,
      checkpoint_every=100, export=False, progress_bar=False, async_checkpointing=False)
  fields.update(overrides)
  return trainer_lib.TrainConfig(**fields)


def _one_device():
  return sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])


def _run_losses(config, workdir):
  trainer = trainer_lib.Trainer(config, str(workdir), mesh=_one_device())
  try:
    return np.array([h["loss"] for h in trainer.run()])
  finally:
    trainer.close()


def test_independent_clipped_views_train_and_accumulate(tmp_path):
  """The non-reference noise options reach the loss, also through gradient accumulation."""
  options = dict(num_steps=2, mask_ratio_range=(0.0, 0.3), complementary_masks=False)
  reference = _run_losses(_tiny_config(num_steps=2), tmp_path / "reference")
  clipped = _run_losses(_tiny_config(**options), tmp_path / "clipped")
  accumulated = _run_losses(_tiny_config(grad_accum_steps=2, **options), tmp_path / "accum")
  assert np.isfinite(clipped).all() and not np.allclose(clipped, reference)
  np.testing.assert_allclose(accumulated, clipped, rtol=1e-5)
  sub_block = _run_losses(_tiny_config(num_steps=2, mask_pattern="sub_block",
                                       mask_sub_block_size=4), tmp_path / "sub_block")
  assert np.isfinite(sub_block).all() and not np.allclose(sub_block, reference)
  active_only = dict(num_steps=2, mask_pattern="sub_block", mask_sub_block_size=4,
                     mask_loss="active_sub_block")
  active = _run_losses(_tiny_config(**active_only), tmp_path / "active")
  accumulated = _run_losses(_tiny_config(grad_accum_steps=2, **active_only), tmp_path / "acc2")
  assert np.isfinite(active).all() and (active != sub_block).all()
  np.testing.assert_allclose(accumulated, active, rtol=1e-5)


def _program_and_batch(config, seed):
  """A TrainProgram of ``config``, its initial params, a random batch [4, 32] and view A."""
  program = trainer_lib.TrainProgram(config, trainer_lib.ModelConfig(
      vocab_size=64, **config.model), _one_device(), mask_id=63)
  params = trainer_lib.init_params(program.model_config, dtype=jnp.float32, seed=3)
  keys = jax.random.split(jax.random.key(seed), 3)
  input_ids = jax.random.randint(keys[0], (4, 32), 0, 63)
  labels = jnp.where(jax.random.bernoulli(keys[1], 0.7, (4, 32)), input_ids, -100)
  view_a = jax.random.bernoulli(keys[2], 0.5, (4, 32))
  return program, params, input_ids, labels, view_a


def test_masked_input_weight_and_focal_gamma_reach_the_objective():
  program, params, input_ids, labels, view_a = _program_and_batch(
      _tiny_config(masked_input_loss_weight=2.0, diffusion_focal_gamma=1.0), seed=8)
  unused = jnp.zeros((4, 32), bool)
  total, _ = program._loss_sums(params, input_ids, labels, view_a, ~view_a, unused, unused)
  model = trainer_lib.build_model(program.model_config, params, dtype=jnp.float32)
  sums = {(weight, gamma): objective_lib.block_diffusion_loss_sums(
      model, input_ids, labels, view_a, ~view_a, block_size=8, mask_id=63,
      masked_input_weight=weight, focal_gamma=gamma)[0]
      for weight, gamma in ((1.0, 0.0), (2.0, 0.0), (2.0, 1.0))}
  np.testing.assert_allclose(total, sums[2.0, 1.0], rtol=1e-5)
  assert float(sums[2.0, 0.0]) > 1.2 * float(sums[1.0, 0.0])
  assert float(sums[2.0, 1.0]) < float(sums[2.0, 0.0])


@pytest.mark.parametrize("objective", ["block_diffusion", "autoregressive"])
def test_end_at_last_label_reaches_the_block_diffusion_data(tmp_path, objective):
  streams = {}
  for ended in (False, True):
    trainer = trainer_lib.Trainer(_tiny_config(end_at_last_label=ended, objective=objective),
                                  str(tmp_path / f"{objective}{ended}"), mesh=_one_device())
    try:
      batches = trainer.data_iterator()
      streams[ended] = np.concatenate([next(batches)["input_ids"] for _ in range(2)])
    finally:
      trainer.close()
  # block diffusion: the newline after each sample's final <|im_end|> gives way to padding;
  # the AR stage keeps its data as it was
  assert (streams[True] != streams[False]).any() == (objective == "block_diffusion")


def test_ar_replay_adds_the_weighted_causal_loss(tmp_path):
  """ar_loss_weight adds w x the causal next-token CE of the clean batch to the objective."""
  program, params, input_ids, labels, view_a = _program_and_batch(
      _tiny_config(ar_loss_weight=0.5), seed=7)
  unused = jnp.zeros((4, 32), bool)
  total, (count, ar_ce) = program._loss_sums(params, input_ids, labels, view_a, ~view_a,
                                             unused, unused)
  model = trainer_lib.build_model(program.model_config, params, dtype=jnp.float32)
  diffusion, expected_count = objective_lib.block_diffusion_loss_sums(
      model, input_ids, labels, view_a, ~view_a, block_size=8, mask_id=63)
  expected_ar, _ = objective_lib.autoregressive_loss_sums(model, input_ids, labels)
  # token shift: a row's first label has no position before it
  assert float(count) == float(expected_count) == float((labels[:, 1:] != -100).sum())
  np.testing.assert_allclose(ar_ce, expected_ar, rtol=1e-5)
  np.testing.assert_allclose(total, diffusion + 0.5 * expected_ar, rtol=1e-5)

  # in training: step 0's diffusion part is the run without replay, later steps differ, and
  # gradient accumulation gives the same steps
  def history(workdir, **overrides):
    trainer = trainer_lib.Trainer(_tiny_config(num_steps=2, **overrides), str(tmp_path / workdir),
                                  mesh=_one_device())
    try:
      return trainer.run()
    finally:
      trainer.close()
  plain = history("plain")
  replay = history("replay", ar_loss_weight=0.5)
  accumulated = history("accum", ar_loss_weight=0.5, grad_accum_steps=2)
  assert "ar_loss" not in plain[0]
  assert replay[0]["diffusion_loss"] == pytest.approx(plain[0]["loss"], rel=1e-5)
  assert replay[0]["loss"] == pytest.approx(replay[0]["diffusion_loss"]
                                            + 0.5 * replay[0]["ar_loss"], rel=1e-5)
  assert replay[1]["diffusion_loss"] != pytest.approx(plain[1]["loss"], rel=1e-5)
  for name in ("loss", "ar_loss", "diffusion_loss"):
    np.testing.assert_allclose([h[name] for h in accumulated], [h[name] for h in replay],
                               rtol=1e-5)


@pytest.mark.parametrize("overrides,match", [
    (dict(mask_pattern="prefix"), "mask_pattern='prefix' is unknown"),
    (dict(mask_pattern="sub_block", mask_sub_block_size=3), "sub_block_size=3 must be"),
    (dict(mask_loss="active"), "mask_loss='active' is unknown"),
    (dict(mask_loss="active_sub_block"), "needs mask_pattern='sub_block'")])
def test_mask_pattern_config_errors(overrides, match):
  with pytest.raises(ValueError, match=match):
    _tiny_config(**overrides).validate()


def test_shared_clean_stream_trains_like_two_rows(tmp_path):
  two_rows = _run_losses(_tiny_config(num_steps=3), tmp_path / "two_rows")
  shared = _run_losses(_tiny_config(num_steps=3, share_clean_stream=True), tmp_path / "shared")
  assert two_rows[-1] < two_rows[0]
  np.testing.assert_allclose(shared, two_rows, rtol=1e-5)


def test_incompatible_checkpoint_in_workdir_is_an_error(tmp_path):
  trainer = trainer_lib.Trainer(_tiny_config(num_steps=1), str(tmp_path), mesh=_one_device())
  trainer.run()
  trainer.close()
  other = trainer_lib.Trainer(_tiny_config(num_steps=2, seq_len=64), str(tmp_path),
                              mesh=_one_device())
  with pytest.raises(trainer_lib.IncompatibleCheckpointError,
                     match=r"different run.*\n.*seq_len: checkpoint 32 != this run 64"):
    other.run()
  other.close()
  # A directory that is not one of our checkpoints at all.
  foreign = tmp_path / "foreign"
  (foreign / "checkpoints" / "7").mkdir(parents=True)
  (foreign / "checkpoints" / "7" / "something.bin").write_bytes(b"\0" * 10)
  stranger = trainer_lib.Trainer(_tiny_config(), str(foreign), mesh=_one_device())
  with pytest.raises(trainer_lib.IncompatibleCheckpointError, match="not a checkpoint of this"):
    stranger.run()
  stranger.close()


def test_autoregressive_objective_export_and_reload(tmp_path):
  """Stage 1 (AR from scratch) -> export -> the exported model reproduces the trained params."""
  config = _tiny_config(objective="autoregressive", num_steps=3, export=True)
  trainer = trainer_lib.Trainer(config, str(tmp_path), mesh=_one_device())
  history = trainer.run()
  trainer.close()
  assert [h["step"] for h in history] == [1, 2, 3]
  assert all(np.isfinite(h["loss"]) and h["tokens_per_s"] > 0 for h in history)
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(lines[0])
  exported = load_model(str(tmp_path / "export"))
  assert exported.config.model_type == "qwen2"  # AR: a plain Qwen2 checkpoint
  got = trainer_lib.params_of(exported)
  want = trainer.final_state["params"]
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  tok = load_tokenizer(str(tmp_path / "export"))
  assert tok.mask_id == load_tokenizer(make_sample_data.TOKENIZER_DIR).mask_id


def _tokenizer_without_mask(directory):
  with open(os.path.join(make_sample_data.TOKENIZER_DIR, "tokenizer.json")) as f:
    spec = json.load(f)
  mask = [t for t in spec["added_tokens"] if t["content"] == "|<MASK>|"][0]
  assert mask["id"] == len(spec["model"]["vocab"]) - 1 or mask["id"] < 512
  spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "|<MASK>|"]
  spec["model"]["vocab"].pop("|<MASK>|", None)
  # Renumber so the ids stay dense: MASK was id 3; move the last id into its slot.
  vocab = spec["model"]["vocab"]
  last_token = max(vocab, key=vocab.get)
  vocab[last_token] = mask["id"]
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "tokenizer.json"), "w") as f:
    json.dump(spec, f)


def test_mask_row_added_when_the_vocabulary_has_no_room(tmp_path):
  """Stage 2 from an HF checkpoint whose vocabulary (511) has no row for MASK."""
  ckpt = str(tmp_path / "ckpt")
  hf_models.save_random_model(ckpt, hf_models.tiny_config("qwen2", vocab_size=511,
                                                          hidden_size=32, intermediate_size=64,
                                                          num_hidden_layers=1,
                                                          num_attention_heads=2,
                                                          num_key_value_heads=1))
  _tokenizer_without_mask(ckpt)
  config = _tiny_config(init="checkpoint", checkpoint=ckpt, tokenizer=None, model=None,
                        vocab_multiple=8, num_steps=1, export=True)
  trainer = trainer_lib.Trainer(config, str(tmp_path / "run"), mesh=_one_device())
  assert trainer.tokenizer.mask_id == 511 and trainer.tokenizer.vocab_size == 512
  assert trainer.model_config.vocab_size == 512  # 512 rounded to a multiple of 8
  original = load_model(ckpt)
  state = trainer.initial_state()
  embedding = np.asarray(state["params"]["embed_tokens"]["embedding"])
  old = np.asarray(original.embed_tokens.embedding[...])
  np.testing.assert_array_equal(embedding[:511], old)
  np.testing.assert_allclose(embedding[511], old.mean(axis=0), rtol=1e-6)
  head = np.asarray(state["params"]["lm_head"]["kernel"])
  np.testing.assert_allclose(head[:, 511], np.asarray(original.lm_head.kernel[...]).mean(axis=1),
                             rtol=1e-6)
  trainer.run()
  trainer.close()
  exported = load_model(str(tmp_path / "run" / "export"))
  assert exported.config.vocab_size == 512
  assert exported.config.model_type == "Fast_dLLM_Qwen" and exported.config.bd_size == 8


def test_learning_rate_schedule():
  config = _tiny_config(num_steps=100, warmup_steps=10, learning_rate=1.0, schedule="cosine",
                        min_lr_ratio=0.1)
  schedule = trainer_lib.learning_rate_schedule(config)
  assert float(schedule(0)) == 0.0 and float(schedule(5)) == pytest.approx(0.5)
  assert float(schedule(10)) == pytest.approx(1.0)
  assert float(schedule(100)) == pytest.approx(0.1)
  constant = trainer_lib.learning_rate_schedule(_tiny_config(num_steps=100, warmup_ratio=0.03,
                                                             warmup_steps=None,
                                                             learning_rate=2e-5))
  assert float(constant(1)) == pytest.approx(2e-5 / 3, rel=1e-6)
  assert float(constant(50)) == pytest.approx(2e-5, rel=1e-6)


def test_progress_off_a_terminal_is_log_lines(tmp_path, monkeypatch, caplog, capsys):
  """In a log file (stderr not a terminal) process 0 logs every log_every steps and the last
  one instead of redrawing a bar; a terminal or a notebook gets the bar."""
  monkeypatch.setattr(trainer_lib, "_interactive", lambda: False)
  with caplog.at_level("INFO", logger=trainer_lib.__name__):
    losses = _run_losses(_tiny_config(num_steps=4, progress_bar=True, log_every=3), tmp_path)
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
  assert [line.split(":")[0] for line in lines] == ["step 3/4", "step 4/4"], lines
  assert f"loss {losses[-1]:.4f}, lr " in lines[-1] and " s/step, " in lines[-1], lines
  assert "train:" not in capsys.readouterr().err  # no tqdm redraws

  class Stream:
    def __init__(self, tty):
      self.tty = tty

    def isatty(self):
      return self.tty

  monkeypatch.undo()
  monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
  for tty in (True, False):
    monkeypatch.setattr(sys, "stderr", Stream(tty))
    assert trainer_lib._interactive() is tty
  monkeypatch.setitem(sys.modules, "ipykernel", object())  # a notebook: tqdm.auto's widget
  assert trainer_lib._interactive()


@pytest.mark.parametrize("field,value,message", [
    ("seq_len", 36, "multiple of the block size"),
    ("objective", "mdlm", "objective='mdlm' is unknown"),
    ("init", "magic", "init='magic'"),
    ("data_files", "", "data_files is empty"),
    ("compute_dtype", "float16", "compute_dtype='float16' is not supported"),
    ("mask_ratio_range", (0.5, 0.2), "mask_ratio_range must satisfy"),
    ("mask_ratio_range", 0.3, "mask_ratio_range must be two numbers"),
    ("complementary_masks", "no", "complementary_masks must be True or False"),
    ("share_clean_stream", 1, "share_clean_stream must be True or False"),
    ("ar_loss_weight", -0.5, "ar_loss_weight must be a finite number >= 0; got -0.5"),
    ("ar_loss_weight", float("nan"), "ar_loss_weight must be a finite number >= 0; got nan"),
    ("ar_loss_weight", "1", "ar_loss_weight must be a finite number >= 0; got '1'"),
    ("masked_input_loss_weight", 0.0, r"masked_input_weight=0.0 must be a finite number > 0"),
    ("masked_input_loss_weight", "2", "masked_input_weight='2' must be a finite number > 0"),
    ("diffusion_focal_gamma", 0.5, r"focal_gamma=0.5 must be 0 \(plain cross-entropy\)"),
    ("log_every", -1, r"log_every must be an integer >= 0 \(0: every 5% of the steps\); got -1"),
    ("log_every", True, "log_every must be an integer >= 0"),
    # each of these trained silently wrong, or failed deep inside optax / flax
    ("max_grad_norm", -1.0, r"max_grad_norm must be a finite number > 0, or None .*got -1.0"),
    ("max_grad_norm", 0.0, "max_grad_norm must be a finite number > 0, or None"),
    ("learning_rate", -0.01, "learning_rate must be a finite number >= 0; got -0.01"),
    ("learning_rate", float("inf"), "learning_rate must be a finite number >= 0; got inf"),
    ("learning_rate", "3e-4", "learning_rate must be a finite number >= 0; got '3e-4'"),
    ("min_lr_ratio", 2.0, r"min_lr_ratio must be a number in \[0, 1\]; got 2.0"),
    ("warmup_ratio", float("nan"), r"warmup_ratio must be a number in \[0, 1\]; got nan"),
    ("weight_decay", -0.1, "weight_decay must be a finite number >= 0"),
    ("adam_b1", 1.0, r"adam_b1 must be a number in \[0, 1\); got 1.0"),
    ("adam_b2", -0.5, r"adam_b2 must be a number in \[0, 1\)"),
    ("adam_eps", 0.0, "adam_eps must be a finite number > 0; got 0.0"),
    ("warmup_steps", -3, "warmup_steps must be an integer >= 0, or None"),
    ("warmup_steps", 2.5, "warmup_steps must be an integer >= 0, or None"),
    ("seed", 2**40, r"seed must be an integer in \[0, 2\*\*32\)"),
    ("seed", "1", "seed must be an integer"),
    ("num_steps", True, "num_steps must be a positive integer; got True"),
    ("block_size", 4.0, "block_size must be a positive integer; got 4.0"),
    ("shuffle", "false", "shuffle must be True or False; got 'false'"),
    ("remat", 1, "remat must be True or False"),
    ("mesh_shape", (1.5, 1, 1), "mesh_shape .* entries must be positive integers"),
    ("mesh_shape", "auto", "mesh_shape must be 3 integers"),
    ("attention_impl", "flash", "attention_impl='flash' is unknown"),
])
def test_config_errors(field, value, message):
  with pytest.raises(ValueError, match=message):
    _tiny_config(**{field: value}).validate()


def test_ar_replay_needs_the_block_diffusion_objective():
  with pytest.raises(ValueError, match="ar_loss_weight=1.0 needs objective='block_diffusion'"):
    _tiny_config(objective="autoregressive", ar_loss_weight=1.0).validate()
  with pytest.raises(ValueError,
                     match="masked_input_loss_weight=2.0 needs objective='block_diffusion'"):
    _tiny_config(objective="autoregressive", masked_input_loss_weight=2.0).validate()
  with pytest.raises(ValueError,
                     match="diffusion_focal_gamma=2.0 needs objective='block_diffusion'"):
    _tiny_config(objective="autoregressive", diffusion_focal_gamma=2.0).validate()


def test_batch_must_divide_over_batch_devices():
  with pytest.raises(ValueError, match="divisible by the batch-parallel devices"):
    trainer_lib.Trainer(_tiny_config(global_batch_size=6), "/tmp/unused",
                        mesh=sharding.make_mesh((2, 2, 2)))


def test_bfloat16_compute_with_remat_tracks_float32(tmp_path):
  """bf16 matmuls on float32 master weights (plus remat) follow the float32 run closely."""
  ref = trainer_lib.Trainer(_tiny_config(num_steps=2), str(tmp_path / "f32"), mesh=_one_device())
  ref_losses = [h["loss"] for h in ref.run()]
  ref.close()
  mixed = trainer_lib.Trainer(_tiny_config(num_steps=2, compute_dtype="bfloat16", remat=True),
                              str(tmp_path / "bf16"), mesh=_one_device())
  losses = [h["loss"] for h in mixed.run()]
  mixed.close()
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-2)
  assert losses != ref_losses  # bf16 really was used
  for leaf in jax.tree.leaves(mixed.final_state["params"]):
    assert leaf.dtype == jnp.float32


def test_kernel_attention_on_an_8_device_mesh_trains_like_xla(tmp_path, shard_attention_meshes):
  """attention_impl="pallas" on a (2, 2, 2) mesh: the kernels run per shard (shard_map under
  the trainer's mesh context) and the losses are the xla reference's."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 (simulated) devices")
  meshes = shard_attention_meshes

  def losses(impl):
    trainer = trainer_lib.Trainer(_tiny_config(num_steps=2, attention_impl=impl),
                                  str(tmp_path / impl), mesh=sharding.make_mesh((2, 2, 2)))
    try:
      return np.array([h["loss"] for h in trainer.run()])
    finally:
      trainer.close()

  np.testing.assert_allclose(losses("pallas"), losses("xla"), rtol=1e-5)
  assert meshes and all(dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2} for m in meshes)
