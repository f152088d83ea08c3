"""scripts/demo_scale_gpu.sh and the build_demo.sh it drives: a few steps of the whole recipe at a
chosen size, into a work and export directory of its own, leaving the bundled models alone."""

import json
import os
import re
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCRIPT = os.path.join(_ROOT, "scripts", "demo_scale_gpu.sh")
_BUNDLED = os.path.join(_ROOT, "models", "demo", "fast_dllm", "model.safetensors")


def _run(env_extra, out_dir):
  env = {**os.environ, "PYTHON": sys.executable, **env_extra}
  return subprocess.run(["bash", _SCRIPT, str(out_dir)], env=env, cwd=_ROOT,
                        capture_output=True, text=True, timeout=600)


def _operative_gin(path):
  """A run's saved gin config with gin's line continuations joined."""
  return re.sub(r"\\\n\s*", "", path.read_text())


def test_unknown_size_fails_before_any_work(tmp_path):
  result = _run({"SIZES": "s192x", "SCALE_WORK": str(tmp_path / "work")}, tmp_path / "out")
  assert result.returncode == 2, result.stderr
  assert "unknown size 's192x'" in result.stderr and "s192, d192, m384 or l768" in result.stderr
  assert not (tmp_path / "work").exists()


@pytest.mark.slow  # ~70 s on 2 cores (the recipe at a few steps); run before a GPU session
def test_smoke_run_trains_exports_and_summarises(tmp_path):
  work, out = tmp_path / "work", tmp_path / "out"
  bundled_mtime = os.stat(_BUNDLED).st_mtime_ns if os.path.isfile(_BUNDLED) else None
  result = _run({"SIZES": "s192", "SCALE_WORK": str(work), "NUM_TRAIN": "2000",
                 "STAGE1_STEPS": "2", "STAGE2_STEPS": "2", "CHECK_ARGS": "--num_problems 4",
                 "STAGE2_ARGS": "--gin_file configs/demo_paper_recipe.gin"}, out)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

  size_dir = work / "s192"
  # every stage read the work directory's data, with the size's and the caller's settings
  stage1 = _operative_gin(size_dir / "ar" / "config.gin")
  stage2 = _operative_gin(size_dir / "adapt" / "config.gin")
  assert f"TrainConfig.data_files = '{size_dir}/data/train.jsonl'" in stage1
  assert "model_config.hidden_size = 192" in stage1
  assert "TrainConfig.learning_rate = 0.003" in stage1
  assert f"TrainConfig.checkpoint = '{size_dir}/ar/export'" in stage2
  assert "TrainConfig.mask_pattern = 'bernoulli'" in stage2  # the caller's overlay
  assert "TrainConfig.learning_rate = 0.0003" in stage2  # s192 binds no rate: the overlay's
  for stage in ("ar", "adapt"):
    steps = [json.loads(line)["step"] for line in (size_dir / stage / "metrics.jsonl").open()]
    assert steps == [1, 2]
  assert len((size_dir / "data" / "train.jsonl").read_text().splitlines()) == 2000

  # exported beside the work, not over the bundle
  adapted = json.loads((size_dir / "models" / "fast_dllm" / "config.json").read_text())
  assert adapted["model_type"] == "Fast_dLLM_Qwen" and adapted["hidden_size"] == 192
  if bundled_mtime is not None:
    assert os.stat(_BUNDLED).st_mtime_ns == bundled_mtime

  report = json.loads((out / "scale_s192.json").read_text())
  assert report["num_problems"] == 4 and report["adapted_model"].endswith("s192/models/fast_dllm")
  (line,) = [json.loads(l) for l in (out / "scale_summary.jsonl").read_text().splitlines()]
  batch = report["summary"]["batch_size_8"]
  assert line == {
      "size": "s192", "params": report["params"], "device": report["device"],
      "ar_accuracy": batch["ar_accuracy"],
      "accuracy_1.0": batch["threshold_1.0_no_cache"]["accuracy"],
      "tokens_per_forward_1.0": batch["threshold_1.0_no_cache"]["tokens_per_row_forward"],
      "speedup_vs_ar_1.0": batch["threshold_1.0_no_cache"]["speedup_vs_ar"],
      "accuracy_0.9": batch["threshold_0.9_no_cache"]["accuracy"],
      "tokens_per_forward_0.9": batch["threshold_0.9_no_cache"]["tokens_per_row_forward"],
      "speedup_vs_ar_0.9": batch["threshold_0.9_no_cache"]["speedup_vs_ar"]}
