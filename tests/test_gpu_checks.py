"""scripts/gpu_checks.sh: its CPU smoke run drives all three parts and keeps their records."""

import json
import os
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCRIPT = os.path.join(_ROOT, "scripts", "gpu_checks.sh")


@pytest.mark.slow  # ~2 minutes on 2 cores; run it before a GPU session spends time on the script
def test_smoke_run_drives_every_part(tmp_path):
  env = {**os.environ, "PYTHON": sys.executable, "SMOKE": "1", "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(["bash", _SCRIPT, str(tmp_path)], env=env, cwd=_ROOT,
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
  records = {}
  for part in ("decode", "decode_sweep", "train"):
    lines = (tmp_path / f"{part}.jsonl").read_text().splitlines()
    records[part] = [json.loads(line) for line in lines]
    assert not [r for r in records[part] if "error" in r], part
    assert "summary" in (tmp_path / f"{part}.log").read_text()
    assert f"== {part}:" in result.stdout
  assert {r["impl"] for r in records["decode"] if r["section"] == "decode"} == {
      "pallas", "xla", "cudnn"}   # mosaic and triton: GPU only, reported as skipped
  skipped = {r["name"] for r in records["decode"] if "skipped" in r}
  assert {"window_mosaic", "window_mosaic_smem_p", "window_triton",
          "mosaic_block_training"} <= skipped
  assert [r for r in records["decode_sweep"] if r.get("name") == "mosaic" and "skipped" in r]
  assert {r["impl"] for r in records["train"] if r["section"] == "train"} >= {"pallas", "cudnn"}


def test_a_missing_output_directory_argument_is_refused():
  result = subprocess.run(["bash", _SCRIPT], cwd=_ROOT, capture_output=True, text=True,
                          timeout=60)
  assert result.returncode != 0 and "usage: bash scripts/gpu_checks.sh OUT_DIR" in result.stderr
