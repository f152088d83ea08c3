"""benchmarks/gpu_decode_sweep.py: the --cpu-smoke run works; the GPU grid's tiles lower."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import window_kernel as wk

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import gpu_decode_sweep as sweep  # noqa: E402


def test_cpu_smoke_run_reports_every_section(tmp_path):
  out_file = tmp_path / "sweep.jsonl"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", "gpu_decode_sweep.py"), "--cpu-smoke",
       "--shapes", "8x2", "--ar-layers", "1", "--out", str(out_file)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
  records = [json.loads(line) for line in out_file.read_text().splitlines()]
  printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  assert records == printed
  assert not [r for r in records if "error" in r]
  assert not [r for r in records if r["section"] == "budget"]   # the smoke fits its budget
  timed = [r for r in records if "us" in r]
  assert all(r["us"] > 0 and r["gbps"] > 0 and r["ok"] for r in timed)
  assert all(r["pct_bw"] > 0 and r["pct_roofline"] > 0 for r in timed)
  base = {r["impl"] for r in records if r["section"] == "baseline" and "us" in r}
  assert base == {"xla", "cudnn", "pallas"}
  assert [r for r in records if r.get("name") == "mosaic" and "cpu-smoke" in r["skipped"]]
  # Every pallas measurement was checked against the reference and has all three ratios.
  pallas = [r for r in timed if r["impl"] == "pallas" and r["section"] != "ar_attention"]
  assert all(r["rel_err"] <= 1e-2 for r in pallas)
  assert all(r["speedup_vs_xla"] > 0 and r["speedup_vs_cudnn"] > 0 and
             r["speedup_vs_default"] > 0 for r in pallas if r["stage"] != "baseline")
  stages = {r["stage"] for r in pallas}
  assert {"baseline", "coarse_tiles", "coarse_launch", "coarse_splits"} <= stages
  assert len({(r["tile_r"], r["tile_k"], r["splits"], r["num_warps"]) for r in pallas}) >= 4
  assert {r["impl"] for r in timed if r["stage"] == "breakdown"} == {"pallas_partials"}
  ar = [r for r in records if r["section"] == "ar_step"]
  routes = {r["tokens"]: r for r in ar if r["name"] == "route"}
  assert routes[1]["routes"]["pallas"] == "window" and routes[1]["plan_rows_pad"] == 16
  measured = {(r["name"], r.get("impl"), r["tokens"]) for r in ar if "ms" in r}
  for n in (1, 32):
    assert {("forward", "pallas", n), ("forward", "xla", n), ("dense_no_attention", None, n),
            ("head", None, n)} <= measured
  attention = {(r["impl"], r["window"]) for r in records if r["section"] == "ar_attention"}
  assert attention == {(i, n) for i in ("pallas", "xla", "cudnn") for n in (1, 32)}
  assert "gpu_decode_sweep summary" in proc.stdout and "BEST pallas" in proc.stdout


def test_valid_row_tiles():
  assert sweep.valid_tile_r(192, sweep.GPU_GRID["tile_r"]) == [16, 32, 64, 128, 256]
  assert sweep.valid_tile_r(48, sweep.GPU_GRID["tile_r"]) == [16, 32, 64]
  assert sweep.valid_tile_r(6, sweep.GPU_GRID["tile_r"]) == [16]


@pytest.mark.parametrize("window,batch", [(32, 8), (1, 1)])
def test_gpu_grid_tiles_lower_to_triton(window, batch):
  """Every (tile_r, tile_k) the GPU sweep tries at Qwen2.5-1.5B heads lowers to one Triton
  kernel (Pallas -> Triton lowering, from this CPU), 16 warps included."""
  from tests.test_block_kernel import lower_for_gpu
  smax = 16384
  q = jnp.zeros((batch, window, 12, 128), jnp.bfloat16)
  k = jnp.zeros((batch, smax, 2, 128), jnp.bfloat16)
  lengths = jnp.full((batch,), smax, jnp.int32)
  for tile_r in sweep.valid_tile_r(window * 6, sweep.GPU_GRID["tile_r"]):
    for tile_k in sweep.GPU_GRID["tile_k"]:
      plan = wk.decode_plan(batch, window, 12, 2, 128, smax, tile_r=tile_r, tile_k=tile_k)
      text = lower_for_gpu(
          lambda q, k, v, plan=plan: wk.window_attention(q, k, v, lengths, plan=plan,
                                                         num_warps=16, num_stages=4), q, k, k)
      assert text.count("xla.gpu.triton") == 1, (tile_r, tile_k)
  jax.clear_caches()


def test_device_time_sums_kernels_and_skips_copies(monkeypatch):
  """kernel_us / span_us per call from the trace's GPU events (synthetic events here)."""
  events = [(1000, 4000, "window_attention"), (6000, 2000, "loop_fusion"),
            (9000, 500, "MemcpyD2H"), (10000, 4000, "window_attention")]
  monkeypatch.setattr(sweep, "profile_gpu_events", lambda jax, prog, args: events)
  obj = sweep.Sweep.__new__(sweep.Sweep)
  obj.jax = jax
  obj.bench = type("B", (), {"peak_gbps": 1000.0})()
  shape = sweep.Shape(8, 1, 1024, dict(hq=4, hkv=2, d=64))
  rec = obj.device_time(shape, None, None, calls=2)
  assert rec["kernel_us"] == pytest.approx(5.0)          # (4 + 2 + 4) us over 2 calls
  assert rec["span_us"] == pytest.approx(6.5)            # 1 us to 14 us, over 2 calls
  assert rec["kernels_per_call"] == 1.5
  assert rec["top_kernels_us"] == {"window_attention": 4.0, "loop_fusion": 1.0}
  assert rec["pct_bw_kernel"] == pytest.approx(100 * shape.kv_bytes / 5e-6 / 1e9 / 1000.0)
  monkeypatch.setattr(sweep, "profile_gpu_events", lambda jax, prog, args: [])
  assert "device_time_error" in obj.device_time(shape, None, None, calls=2)


def test_profile_gpu_events_reads_a_trace(tmp_path, monkeypatch):
  """On this CPU the trace has no GPU plane: an empty list, not an error; the trace's
  temporary directory is removed."""
  import tempfile
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  prog = jax.jit(lambda x: x * 2)
  assert sweep.profile_gpu_events(jax, prog, (jnp.ones(4),)) == []
  assert not list(tmp_path.iterdir())
