"""benchmarks/train_speed.py: the objectives it times run the real train step, side by side."""

import json
import os

import pytest

from tests import benchmark_modules

train_speed = benchmark_modules.load("train_speed")

_ARGS = ["--gin_file", "configs/tiny_cpu.gin", "--gin_param", "TrainConfig.seq_len = 64",
         "--gin_param", "TrainConfig.global_batch_size = 8", "--num_layers", "1",
         "--steps", "1", "--warmup", "1"]


@pytest.fixture(autouse=True)
def _repo_root_and_clean_gin(monkeypatch):
  import gin
  monkeypatch.chdir(os.path.dirname(benchmark_modules.BENCHMARKS_DIR))
  gin.clear_config()
  yield
  gin.clear_config()


def test_shared_clean_stream_same_loss_less_model_work(capsys):
  train_speed.main(_ARGS + ["--objectives", "block_diffusion,block_diffusion_shared"])
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  two_rows, shared, ratio = lines
  assert (two_rows["objective"], shared["objective"]) == ("block_diffusion",
                                                          "block_diffusion_shared")
  assert shared["loss"] == pytest.approx(two_rows["loss"], rel=1e-4)  # same init, same batch
  # x_t^A ++ x_t^B ++ x_0: 3L trunk tokens per sample instead of 4L, so 3/4 of the matmuls;
  # dense attention (counted here as XLA computes it) grows to 9/8: this tiny model is 0.875
  assert 0.7 < shared["model_tflops_per_step"] / two_rows["model_tflops_per_step"] < 0.9
  assert ratio["ratio"] == "block_diffusion/block_diffusion_shared" and ratio["step_s"] > 0


def test_unknown_objective_is_an_error(capsys):
  with pytest.raises(SystemExit):
    train_speed.main(_ARGS + ["--objectives", "block_diffusion,mdlm"])
  assert "'mdlm' is unknown" in capsys.readouterr().err


def test_rounds_alternate_and_ratio_uses_medians(capsys):
  train_speed.main(_ARGS + ["--objectives", "autoregressive,block_diffusion", "--rounds", "3"])
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  *records, ratio = lines
  assert [r["objective"] for r in records] == ["autoregressive", "block_diffusion"] * 3
  median = {name: sorted(r["step_s"] for r in records if r["objective"] == name)[1]
            for name in ("autoregressive", "block_diffusion")}
  assert ratio["rounds"] == 3
  assert ratio["step_s"] == pytest.approx(median["autoregressive"] / median["block_diffusion"])
  assert ratio["tokens_per_s"] == pytest.approx(1 / ratio["step_s"])


def test_attention_impls_time_each_objective_with_each(capsys):
  train_speed.main(_ARGS + ["--objectives", "block_diffusion_shared",
                            "--attention_impls", "xla_blocks,xla"])
  blocks, dense, ratio = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert (blocks["attention_impl"], dense["attention_impl"]) == ("xla_blocks", "xla")
  assert blocks["loss"] == pytest.approx(dense["loss"], rel=1e-5)  # same loss, less work
  assert ratio["ratio"] == "block_diffusion_shared@xla_blocks/block_diffusion_shared@xla"


def test_records_name_the_default_attention_implementation(capsys):
  train_speed.main(_ARGS + ["--objectives", "autoregressive"])
  record, = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert record["attention_impl"] == "xla_blocks"  # CPU's default


@pytest.mark.parametrize("flags, message", [
    (["--objectives", "block_diffusion,block_diffusion"], "names one twice"),
    (["--attention_impls", "xla,xla"], "names one twice"),
    (["--attention_impls", "flash"], "'flash' is unknown"),
    (["--rounds", "0"], "--rounds must be >= 1, got 0")])
def test_bad_repeats_are_errors(capsys, flags, message):
  with pytest.raises(SystemExit):
    train_speed.main(_ARGS + flags)
  assert message in capsys.readouterr().err
