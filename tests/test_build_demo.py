"""scripts/build_demo.sh: which configs, work directory and export directory each recipe uses.

The interpreter is replaced by a stub that records its arguments, so these tests check the
script's wiring in a second; the recipe itself runs in tests/test_demo_scale_gpu.py (slow).
"""

import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "build_demo.sh")


def _run(tmp_path, **env_extra):
  """(result, one argument list per interpreter call) of build_demo.sh with a stub python."""
  calls = tmp_path / "calls.txt"
  stub = tmp_path / "python"
  stub.write_text(f'#!/bin/bash\necho "$*" >> {calls}\n')
  stub.chmod(0o755)
  env = {k: v for k, v in os.environ.items()
         if k not in ("QUICK", "WORK", "MODELS_OUT", "STAGE1_ARGS", "STAGE2_ARGS",
                      "EXPORT_MAX_MIB")}
  env.update(PYTHON=str(stub), SKIP_CHECK="1", **env_extra)
  result = subprocess.run(["bash", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
  lines = calls.read_text().splitlines() if calls.exists() else []
  return result, lines


def _call(lines, marker):
  (line,) = [l for l in lines if marker in l]
  return line


def test_default_recipe_builds_the_bundle(tmp_path):
  result, lines = _run(tmp_path, WORK=str(tmp_path / "work"))
  assert result.returncode == 0, result.stderr
  stage1, stage2 = _call(lines, "demo_ar.gin"), _call(lines, "demo_adapt.gin")
  assert "demo_quick" not in stage1 + stage2
  assert _call(lines, "demo.export").endswith("--out models/demo")


def test_quick_recipe_adds_the_overlays_and_leaves_the_bundle(tmp_path):
  result, lines = _run(tmp_path, QUICK="1",
                       STAGE2_ARGS="--gin_param TrainConfig.seed=2")
  assert result.returncode == 0, result.stderr
  stage1, stage2 = _call(lines, "demo_ar.gin"), _call(lines, "demo_adapt.gin")
  assert "--workdir workdirs/demo_quick/ar " in stage1
  assert stage1.endswith("--gin_file configs/demo_quick_ar.gin")
  # the overlay first, then the caller's arguments, which win over it
  assert stage2.endswith("--gin_file configs/demo_quick_adapt.gin --gin_param TrainConfig.seed=2")
  assert "TrainConfig.checkpoint = 'workdirs/demo_quick/ar/export'" in stage2
  assert _call(lines, "demo.export").endswith("--out workdirs/demo_quick/models")


@pytest.mark.parametrize("value", ["yes", "2"])
def test_unknown_quick_value_fails_before_any_work(tmp_path, value):
  result, lines = _run(tmp_path, QUICK=value, WORK=str(tmp_path / "work"))
  assert result.returncode == 2 and f"QUICK='{value}' is not 0 or 1" in result.stderr
  assert lines == []
