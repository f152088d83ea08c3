"""train.py: the tiny config learns, bad input gives a readable error, multi-process == single,
a multi-process run resumes on one process.

Slow ones (the full tiny_cpu.gin run, the real 2-process runs):
``pytest -m slow tests/test_train_cli.py``.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import gin
import numpy as np
import pytest

from fdllm_jax.training import make_sample_data
from fdllm_jax.training import trainer as trainer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = ["TrainConfig.progress_bar = False"]


def _train(argv, env=None, timeout=600):
  return subprocess.run([sys.executable, "train.py"] + argv, cwd=REPO, capture_output=True,
                        text=True, timeout=timeout, env=env)


def _args(workdir, params=(), gin_file="configs/tiny_cpu.gin"):
  argv = ["--gin_file", gin_file, "--workdir", str(workdir)]
  for p in params:
    argv += ["--gin_param", p]
  return argv


def _losses(workdir):
  return np.array([m["loss"] for m in trainer_lib.read_metrics(str(workdir))])


def test_tiny_config_loss_decreases(tmp_path):
  result = _train(_args(tmp_path, QUIET + ["TrainConfig.num_steps = 30",
                                           "TrainConfig.checkpoint_every = 15"]))
  assert result.returncode == 0, result.stderr[-3000:]
  losses = _losses(tmp_path)
  assert len(losses) == 30 and np.isfinite(losses).all()
  assert losses[-5:].mean() < losses[:5].mean() - 0.5, losses
  assert "done: step 30" in result.stdout
  exported = os.listdir(tmp_path / "export")
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(exported)
  with open(tmp_path / "export" / "config.json") as f:
    config = json.load(f)
  assert config["model_type"] == "Fast_dLLM_Qwen" and config["bd_size"] == 16


@pytest.mark.slow
def test_full_tiny_config_under_two_minutes(tmp_path):
  start = time.perf_counter()
  result = _train(_args(tmp_path, QUIET))
  seconds = time.perf_counter() - start
  assert result.returncode == 0, result.stderr[-3000:]
  losses = _losses(tmp_path)
  assert len(losses) == 150 and losses[-10:].mean() < losses[:10].mean() - 2.0
  assert seconds < 120, seconds


# ----------------------------------------------------------------------------- errors (in-process)

def _main(argv):
  import train
  gin.clear_config()
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    return train.main(argv)
  finally:
    os.chdir(cwd)
    gin.clear_config()


def test_missing_data_file(tmp_path, capsys):
  code = _main(_args(tmp_path, ['TrainConfig.data_files = "/nonexistent/chat.jsonl"']))
  assert code == 2
  assert "error: data file '/nonexistent/chat.jsonl' does not exist" in capsys.readouterr().err


def test_malformed_data_line(tmp_path, capsys):
  bad = tmp_path / "bad.jsonl"
  with open(make_sample_data.CHAT_FILE) as f:
    lines = [next(f) for _ in range(3)]
  bad.write_text(lines[0] + lines[1] + '{"messages": [{"role": "user", "content": 1}]}\n')
  code = _main(_args(tmp_path / "w", [f'TrainConfig.data_files = "{bad}"']))
  assert code == 2
  err = capsys.readouterr().err
  assert f"error: {bad}:3: message 0 must be an object with string 'role' and 'content'" in err


def test_seq_len_not_a_multiple_of_block_size(tmp_path, capsys):
  assert _main(_args(tmp_path, ["TrainConfig.seq_len = 100"])) == 2
  assert ("error: sequence length 100 must be a positive multiple of the block size 16"
          in capsys.readouterr().err)


def test_mesh_not_matching_devices(tmp_path, capsys):
  assert _main(_args(tmp_path, ["TrainConfig.mesh_shape = (3, 1, 1)"])) == 2
  assert "error: mesh_shape (3, 1, 1) (data, fsdp, tensor) needs 3 devices, but 8 are" in (
      capsys.readouterr().err)


def test_bad_gin(tmp_path, capsys):
  assert _main(_args(tmp_path, ["TrainConfig.no_such_field = 1"])) == 2
  assert "error: bad gin configuration" in capsys.readouterr().err
  assert _main(["--gin_file", "configs/nope.gin", "--workdir", str(tmp_path)]) == 2
  assert "gin file 'configs/nope.gin' does not exist" in capsys.readouterr().err


def test_workdir_with_another_runs_checkpoint(tmp_path, capsys):
  small = QUIET + ["TrainConfig.num_steps = 1", "TrainConfig.export = False",
                   "TrainConfig.seq_len = 32", "TrainConfig.mesh_shape = (-1, 1, 1)"]
  assert _main(_args(tmp_path, small)) == 0
  capsys.readouterr()
  assert _main(_args(tmp_path, small + ["model_config.num_hidden_layers = 3"])) == 2
  err = capsys.readouterr().err
  assert "holds a checkpoint (step 1) of a different run" in err and "model_config" in err


def test_big_configs_parse():
  """The paper-recipe configs bind valid TrainConfigs (they need the hub checkpoints to run)."""
  for name, steps in (("fast_dllm_v2_1.5b", 6000), ("fast_dllm_v2_7b", 2500)):
    gin.clear_config()
    try:
      gin.parse_config_files_and_bindings([os.path.join(REPO, "configs", name + ".gin")], [])
      config = trainer_lib.TrainConfig()
    finally:
      gin.clear_config()
    config.validate()
    assert (config.seq_len, config.global_batch_size, config.num_steps) == (2048, 256, steps)
    assert config.block_size == 32 and config.init == "checkpoint"
    assert int(np.prod([s for s in config.mesh_shape])) == 64


def _demo_config(*names):
  """The TrainConfig of configs/<names> parsed in order (a stage's file, then overlays)."""
  gin.clear_config()
  try:
    gin.parse_config_files_and_bindings([os.path.join(REPO, "configs", n) for n in names], [])
    config = trainer_lib.TrainConfig()
  finally:
    gin.clear_config()
  config.validate()
  return config


def test_demo_stage1_config_parses_with_the_bundles_steps():
  config = _demo_config("demo_ar.gin")
  # The bundle since session 28: six layers of 192 at 1.5e-3, 1500 AR steps + 1000 stage-2 steps.
  assert config.objective == "autoregressive" and config.init == "scratch"
  assert config.num_steps == 1500 and config.learning_rate == 1.5e-3
  assert (config.model["num_hidden_layers"], config.model["hidden_size"]) == (6, 192)


def test_demo_stage2_and_the_paper_recipe_overlay_parse():
  bundle = _demo_config("demo_adapt.gin")
  assert bundle.objective == "block_diffusion" and bundle.num_steps == 1000
  assert bundle.learning_rate == 6e-4
  assert (bundle.mask_pattern, bundle.mask_sub_block_size, bundle.mask_loss,
          bundle.ar_loss_weight, bundle.end_at_last_label) == (
              "sub_block", 8, "active_sub_block", 1.0, True)
  paper = _demo_config("demo_adapt.gin", "demo_paper_recipe.gin")
  assert (paper.mask_pattern, paper.mask_loss, paper.ar_loss_weight, paper.num_steps,
          paper.end_at_last_label) == ("bernoulli", "masked", 0.0, 500, False)
  assert paper.learning_rate == 3e-4  # the session-7 bundle's rate
  assert paper.mask_ratio_range == (0.0, 1.0) and paper.complementary_masks


def test_demo_quick_overlays_change_only_batch_steps_and_rate():
  """QUICK=1 bash scripts/build_demo.sh: the 30-minute recipe of session 29."""
  ar, quick_ar = _demo_config("demo_ar.gin"), _demo_config("demo_ar.gin", "demo_quick_ar.gin")
  assert (quick_ar.global_batch_size, quick_ar.num_steps) == (16, 2000)
  adapt = _demo_config("demo_adapt.gin")
  quick_adapt = _demo_config("demo_adapt.gin", "demo_quick_adapt.gin")
  assert (quick_adapt.num_steps, quick_adapt.learning_rate) == (360, 1.2e-3)
  changed = {"global_batch_size", "num_steps", "learning_rate"}
  for base, quick in ((ar, quick_ar), (adapt, quick_adapt)):
    differ = {f for f in base.__dataclass_fields__ if getattr(base, f) != getattr(quick, f)}
    assert differ <= changed, differ


# ----------------------------------------------------------------------------- multi-process

def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(workdir, params):
  """train.py as 2 jax.distributed processes (gloo on 127.0.0.1) of 2 CPU devices each."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "train.py"] + _args(workdir, params) +
      ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
       "--process_id", str(i)], cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  return outputs


def _four_devices():
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS="--xla_force_host_platform_device_count=4")


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  """jax.distributed on 127.0.0.1 with gloo: 2 processes x 2 CPU devices vs 1 process x 4."""
  params = QUIET + ["TrainConfig.num_steps = 6", "TrainConfig.checkpoint_every = 3",
                    "TrainConfig.seq_len = 64", "TrainConfig.mesh_shape = (2, 1, 2)"]
  single = _train(_args(tmp_path / "single", params), env=_four_devices())
  assert single.returncode == 0, single.stderr[-3000:]
  outputs = _two_processes(tmp_path / "multi", params)
  assert "over 2 process(es)" in outputs[0][0]
  np.testing.assert_allclose(_losses(tmp_path / "multi"), _losses(tmp_path / "single"),
                             rtol=1e-6)
  # The export written by process 0 equals the single-process export.
  from fdllm_jax.checkpoints import iter_safetensors
  a = dict(iter_safetensors(str(tmp_path / "single" / "export" / "model.safetensors")))
  b = dict(iter_safetensors(str(tmp_path / "multi" / "export" / "model.safetensors")))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_a_two_process_run_resumes_on_one_process_and_another_mesh(tmp_path):
  """Preempted on 2 hosts, resumed on 1 whose devices form another mesh: the parameters,
  optimiser state and both processes' data positions carry over, and the run goes on as the
  uninterrupted one."""
  params = QUIET + ["TrainConfig.num_steps = 6", "TrainConfig.checkpoint_every = 3",
                    "TrainConfig.seq_len = 64", "TrainConfig.export = False"]
  two_hosts = ["TrainConfig.mesh_shape = (2, 1, 2)"]
  one_host = ["TrainConfig.mesh_shape = (1, 4, 1)"]
  single = _train(_args(tmp_path / "single", params + two_hosts), env=_four_devices())
  assert single.returncode == 0, single.stderr[-3000:]
  workdir = tmp_path / "multi"
  _two_processes(workdir, params + two_hosts)
  data_states = [f for f in os.listdir(workdir / "checkpoints" / "3" / "data")
                 if f.startswith("process_")]
  assert sorted(data_states) == ["process_0-of-2.json", "process_1-of-2.json"]
  shutil.rmtree(workdir / "checkpoints" / "6")  # preempted before its last save
  resumed = _train(_args(workdir, params + one_host), env=_four_devices())
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from" in resumed.stderr and "step 3" in resumed.stderr
  assert "mesh_shape: [2, 1, 2] -> [1, 4, 1]" in resumed.stderr, resumed.stderr[-3000:]
  assert [m["step"] for m in trainer_lib.read_metrics(str(workdir))] == [1, 2, 3, 4, 5, 6]
  # fsdp instead of data parallelism sums in another order: float32 noise, not 1e-6 equal
  np.testing.assert_allclose(_losses(workdir), _losses(tmp_path / "single"), rtol=1e-5)
