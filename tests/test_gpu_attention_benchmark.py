"""benchmarks/gpu_attention.py: the --cpu-smoke run (tiny shapes, Pallas interpreter) works."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # ~40 s on 2 cores (Pallas interpreter); run before a GPU session
def test_cpu_smoke_run_reports_every_section(tmp_path):
  out_file = tmp_path / "bench.jsonl"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", "gpu_attention.py"), "--cpu-smoke",
       "--out", str(out_file)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
  records = [json.loads(line) for line in out_file.read_text().splitlines()]
  printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  assert records == printed
  assert not [r for r in records if "error" in r]
  checks = [r for r in records if r["section"] == "check" and "ok" in r]
  assert checks and all(r["ok"] for r in checks)
  assert {r["name"] for r in checks} >= {"pallas_window_float32", "cudnn_Training",
                                         "attention_pallas_Training", "attention_pallas_Full",
                                         "attention_mosaic_Full"}   # (D=32: the xla fallback)
  skipped = {r["name"] for r in records if r["section"] == "check" and "skipped" in r}
  assert {"window_triton", "window_mosaic", "window_mosaic_smem_p",
          "mosaic_block_training"} <= skipped   # GPU only
  train = {(r["impl"], r["mode"]) for r in records if r["section"] == "train"}
  assert train == {(i, m) for i in ("pallas", "xla", "cudnn", "pallas[shared]")
                   for m in ("fwd", "fwd+bwd")}
  shared = [r for r in records if r.get("impl") == "pallas[shared]"]
  assert all(r["speedup_vs_pallas_two_rows"] > 0 and r["tokens"] == 96 for r in shared)
  decode = [r for r in records if r["section"] == "decode"]
  assert {r["impl"] for r in decode} == {"pallas", "xla", "cudnn"}
  for r in decode + [r for r in records if r["section"] == "train" and r not in shared]:
    assert r["ms"] > 0 and r["tflops"] > 0 and r["speedup_vs_xla"] > 0
    if r["impl"] == "pallas":   # baselines are measured first: both ratios present
      assert r["speedup_vs_cudnn"] > 0
  assert all(r["gbps"] > 0 for r in decode)
  ceilings = [r for r in records if r["section"] == "ceilings" and "name" not in r]
  assert ceilings[0]["tflops"] > 0 and ceilings[0]["gbps"] > 0
  assert "summary" in proc.stdout
