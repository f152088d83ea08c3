"""Decode-window attention on a GPU: launch-configuration sweep of the Pallas window kernel.

  python benchmarks/gpu_decode_sweep.py [--out FILE.jsonl] [--time-budget 380]   # on a GPU
  python benchmarks/gpu_decode_sweep.py --cpu-smoke                              # tiny, CPU

Sections, in this order (one failing configuration or measurement is reported as a JSON line
with an ``error`` and the run goes on):

1. ``ceilings``: bf16 matmul TFLOP/s and copy GB/s, measured once with
   ``gpu_attention.Bench`` (or given with ``--ceilings TFLOPS,GBPS``).
2. ``baseline``: for each shape, in order of importance (W32 B8, W32 B1, W8 B8, W1 B8, W8 B1,
   W1 B1; Qwen2.5-1.5B heads Hq=12, Hkv=2, D=128, bf16; a 16384-key cache, every row full):
   xla, cudnn, the Pallas kernel with its default plan, the Mosaic GPU (wgmma) kernel with its
   default plan at 2 and 3 K/V stages and, at 2 stages, with P V from shared memory (the form
   its interpreter tests check; ``pallas_kernels.mosaic_window``; skipped with
   ``--cpu-smoke``), and the Triton (jax-triton) kernel with its default plan.
3. ``ar_step`` (``--ar-budget`` seconds, default 90): why a 1-token forward (the AR step)
   measured slower than a 32-token window: the model (Qwen2.5-1.5B shapes, ``--ar-layers``
   layers, random bf16 weights, batch 1, cache ``--ar-cache``) timed for 1 and 32 tokens with
   each attention implementation, next to its parts: the LM head (+ embedding and final
   norm), the layers' dense part (projections and MLP, no attention) and the attention call
   alone, at the same shapes; plus ``route()``'s path and the window plan a 1-token query gets.
4. ``sweep``: Pallas launch configurations per shape, by coordinate descent from the default:
   ``tiles`` (every valid tile_r x tile_k; default warps for the tile, 2 stages, auto splits),
   then ``launch`` (num_warps x num_stages at the best tiles), then ``splits`` (auto x0.5 and
   x2 at the best so far); a second round (``refine``) repeats tiles / launch / splits around
   the new best while time is left. Between the rounds, ``breakdown``: the best plan through
   the Triton kernel, and the best plan's split kernel alone (``window_partials``: query
   packing + kernel, no combine), to see what the combine step costs. Each shape gets a share
   of the remaining time (weights favour W32 B8), unused time rolls over.
5. A summary table per shape: best configuration, us, GB/s, % of the bandwidth ceiling, % of
   the roofline, speedups vs xla, cudnn and the default plan; the ar_step table.

Correctness: every timed program also returns its first call's output, compared with
``window_attention_reference`` on the same inputs (||out - ref|| / ||ref|| <= 1e-2, bf16); a
configuration that fails is reported (``ok: false``) and never chosen as the best.

Counting (as ``gpu_attention.py``): bytes = the K and V cache read once,
2 * B * S * Hkv * D * 2; FLOPs = 4 * D * Hq * W * B * S. ``pct_bw`` = GB/s over the copy
ceiling (which counts read + write, so 100% reads at the card's copy rate); ``pct_roofline``
= max(bytes / copy GB/s, FLOPs / matmul TFLOP/s) / time; ``bound`` says which term is larger.

Device time (``--device-time``): the same program run once more under ``jax.profiler``; the
GPU stream events of the trace give ``kernel_us`` (sum of kernel durations per call: what
the GPU spends, without the host's launch gaps), ``span_us`` (first kernel start to last
kernel end, per call), ``kernels_per_call`` and the largest kernels by name; ``pct_bw_kernel``
is the bandwidth over ``kernel_us``. The host-timed ``us`` is what a caller waits for; at
batch 1 it includes launch gaps that the kernels do not. Not valid under XLA command buffers
(CUDA graphs): the trace does not show the kernels inside a graph.

Timing: one jitted program per configuration: a first call, then a ``fori_loop`` whose body
calls the operation once per cache copy (chained: each call's output is the next call's
query; the copies, rotated, exceed L2), so one dispatch and one sync are amortised over
16-32 calls; the median (and min) of ``--reps`` runs divided by the number of calls. All
ratios are measured side by side in this process.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import signal
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import gpu_attention as ga  # noqa: E402  (emit, ceilings, timing, environment)

emit = ga.emit
RECORDS = ga.RECORDS

GPU_SHAPES = [(32, 8), (32, 1), (8, 8), (1, 8), (8, 1), (1, 1)]   # (window, batch)
SHAPE_WEIGHTS = {(32, 8): 3.0, (32, 1): 2.0, (8, 8): 1.5}          # others 1.0
GPU_GRID = dict(tile_r=(16, 32, 64, 128, 256), tile_k=(32, 64, 128), num_warps=(4, 8),
                num_stages=(2, 3, 4))
SMOKE_GRID = dict(tile_r=(16, 32), tile_k=(16, 32), num_warps=(4, 8), num_stages=(2,))
CHECK_TOL = 1e-2          # bf16
MAX_SMEM = 227 * 1024     # H100 / H200 dynamic shared memory per block


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=None, help="also append the JSON lines to this file")
  p.add_argument("--time-budget", type=float, default=None,
                 help="seconds for the whole run (default 380; 100 with --cpu-smoke); "
                 "checked between measurements, the summary is always printed")
  p.add_argument("--ceilings", default=None, help="'TFLOPS,GBPS' instead of measuring")
  p.add_argument("--cpu-smoke", action="store_true",
                 help="tiny shapes on CPU with the Pallas interpreter (tests the script)")
  p.add_argument("--sections", default="baseline,ar_step,sweep")
  p.add_argument("--device-time", action="store_true",
                 help="also run each timed program once under the JAX profiler and report the "
                 "GPU's own kernel time per call (needs CUPTI)")
  p.add_argument("--shapes", default=None,
                 help="'WxB,...' (default: 32x8,32x1,8x8,1x8,8x1,1x1)")
  p.add_argument("--cache", type=int, default=None, help="keys per row (default 16384)")
  p.add_argument("--reps", type=int, default=None, help="timed runs per program (default 10)")
  p.add_argument("--ar-budget", type=float, default=90.0, help="seconds for ar_step")
  p.add_argument("--ar-layers", type=int, default=None, help="model layers (default 8)")
  p.add_argument("--ar-cache", type=int, default=None, help="cache length (default 512)")
  p.add_argument("--ar-iters", type=int, default=None, help="forwards per timed loop")
  args = p.parse_args(argv)
  if args.time_budget is None:
    args.time_budget = 100.0 if args.cpu_smoke else 380.0
  return args


def main(argv=None):
  args = parse_args(argv)
  if args.cpu_smoke:
    os.environ["JAX_PLATFORMS"] = "cpu"
  else:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  ga.OUT_FILE = args.out

  import jax

  ga._import_attention_modules()  # noqa: SLF001  (works without fdllm_jax/__init__'s deps)
  sweep = Sweep(args)
  emit(sweep.bench.environment())
  if not args.cpu_smoke and jax.default_backend() != "gpu":
    emit({"section": "setup", "error": f"no GPU backend (got {jax.default_backend()}); "
          "use --cpu-smoke on CPU"})
    return 2
  signal.signal(signal.SIGTERM, _interrupt)   # e.g. an outer `timeout`: summary first
  try:
    sweep.run()
  except (Exception, KeyboardInterrupt, Interrupted) as e:  # noqa: BLE001  (summary anyway)
    traceback.print_exc()
    emit({"section": "setup", "error": f"run stopped: {type(e).__name__}: {e}"[:2000]})
  sweep.summary()
  return 1 if sweep.failed_checks else 0


class Interrupted(BaseException):
  """SIGTERM: a BaseException, so the per-measurement handlers let it through."""


def _interrupt(signum, frame):
  raise Interrupted(f"signal {signum}")


def _mosaic_op(q, k, v, lengths, *, plan, num_stages, p_from_registers=True):
  from pallas_kernels import mosaic_window as mw
  return mw.mosaic_window_attention(q, k, v, lengths, plan=plan, num_stages=num_stages,
                                    p_from_registers=p_from_registers)


class Shape:
  """One (window, batch) at a cache length: inputs, reference output, measurements."""

  def __init__(self, window, batch, smax, heads):
    self.window, self.batch, self.smax = window, batch, smax
    self.hq, self.hkv, self.d = heads["hq"], heads["hkv"], heads["d"]
    self.name = f"W{window}_B{batch}_S{smax}"
    self.q = self.ref = None
    self.results = {}     # config key -> record (pallas configurations)
    self.baselines = {}   # xla / cudnn / default -> seconds
    self.default_key = None

  @property
  def rows(self):
    return self.window * (self.hq // self.hkv)

  @property
  def kv_bytes(self):
    return 2 * self.batch * self.smax * self.hkv * self.d * 2   # bf16

  @property
  def flops(self):
    return 4 * self.d * self.hq * self.window * self.batch * self.smax

  def best(self):
    ok = [r for r in self.results.values() if r.get("ok") and "us" in r]
    return min(ok, key=lambda r: r["us"]) if ok else None


class Sweep:

  def __init__(self, args):
    import jax
    import jax.numpy as jnp
    self.jax, self.jnp = jax, jnp
    self.args = args
    self.smoke = args.cpu_smoke
    bench_args = argparse.Namespace(cpu_smoke=self.smoke, quick=False, reps=args.reps,
                                    ceilings=args.ceilings, time_budget=args.time_budget)
    self.bench = ga.Bench(bench_args, ["pallas", "triton", "xla", "cudnn"])
    self.start = self.bench.start
    self.deadline = self.start + args.time_budget
    self.failed_checks = []
    self.skipped = []
    self.triton_error = None
    self.ar = []
    self._caches = {}
    if self.smoke:
      self.heads = dict(hq=4, hkv=2, d=32)
      self.smax = args.cache or 128
      default_shapes = [(8, 2), (1, 1)]
      self.grid = SMOKE_GRID
    else:
      self.heads = dict(hq=12, hkv=2, d=128)
      self.smax = args.cache or 16384
      default_shapes = GPU_SHAPES
      self.grid = GPU_GRID
    if args.shapes:
      default_shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    self.shapes = [Shape(w, b, self.smax, self.heads) for w, b in default_shapes]

  # -- budget -----------------------------------------------------------------------------------

  def left(self, deadline=None):
    return (deadline or self.deadline) - time.time()

  def out_of_time(self, what, deadline=None):
    if self.left(deadline) > 0:
      return False
    self.skipped.append(what)
    emit({"section": "budget", "skipped": what, "elapsed_s": round(time.time() - self.start, 1)})
    return True

  # -- driver -----------------------------------------------------------------------------------

  def run(self):
    sections = set(self.args.sections.split(","))
    self.bench.ceilings()
    self._probe_triton()
    if "baseline" in sections or "sweep" in sections:
      for shape in self.shapes:
        self.baseline(shape)
    if "ar_step" in sections:
      ar_deadline = min(self.deadline, time.time() + self.args.ar_budget)
      try:
        self.ar_step(ar_deadline)
      except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        emit({"section": "ar_step", "error": f"{type(e).__name__}: {e}"[:2000]})
    if "sweep" in sections:
      self.sweep_round("coarse")    # (each shape's breakdown right after its coarse descent)
      self.sweep_round("refine")

  def _probe_triton(self):
    if self.smoke:
      self.triton_error = "not run with --cpu-smoke (jax-triton needs a GPU)"
      return
    try:
      from pallas_kernels import triton_window as tw
      tw.import_jax_triton()
    except Exception as e:  # noqa: BLE001
      self.triton_error = f"{type(e).__name__}: {e}"[:500]
      emit({"section": "setup", "name": "triton", "error": self.triton_error})

  # -- inputs -----------------------------------------------------------------------------------

  def cache_sets(self, batch, smax, hkv, d):
    """Distinct K/V caches (rotated so the set exceeds L2), shared by every window size."""
    key = (batch, smax, hkv, d)
    if key not in self._caches:
      jax, jnp = self.jax, self.jnp
      one = 2 * batch * smax * hkv * d * 2
      n_sets = 1 if self.smoke else max(1, min(8, math.ceil(256e6 / one)))
      keys = jax.random.split(jax.random.PRNGKey(batch * 7 + smax), 2 * n_sets)
      ks = tuple(jax.random.normal(keys[i], (batch, smax, hkv, d)).astype(jnp.bfloat16)
                 for i in range(n_sets))
      vs = tuple(jax.random.normal(keys[n_sets + i], (batch, smax, hkv, d)).astype(jnp.bfloat16)
                 for i in range(n_sets))
      lengths = jnp.full((batch,), smax, jnp.int32)
      self._caches[key] = (ks, vs, lengths)
    return self._caches[key]

  def prepare(self, shape):
    if shape.q is not None:
      return
    jax, jnp = self.jax, self.jnp
    from pallas_kernels import window_kernel as wk
    ks, vs, lengths = self.cache_sets(shape.batch, shape.smax, shape.hkv, shape.d)
    key = jax.random.PRNGKey(shape.window * 1000 + shape.batch)
    shape.q = jax.random.normal(
        key, (shape.batch, shape.window, shape.hq, shape.d)).astype(jnp.bfloat16)
    shape.ref = jax.jit(wk.window_attention_reference)(shape.q, ks[0], vs[0], lengths)
    jax.block_until_ready(shape.ref)

  def calls_per_program(self, shape, n_sets):
    """Loop iterations so one program runs ~2 ms (16-32 calls) on a GPU; 1 on CPU."""
    if self.smoke:
      return 1
    est = shape.kv_bytes / 1e12 + 5e-6
    calls = min(32, max(16, math.ceil(2e-3 / est)))
    return max(1, calls // n_sets)

  # -- one measurement --------------------------------------------------------------------------

  def measure(self, shape, name, op, meta, stage, check=True):
    """Times ``op(q, k, v, lengths)`` on ``shape``; returns the record (also emitted) or None.

    Every failure (compile error, runtime error, wrong result) becomes a JSON line."""
    jax = self.jax
    rec = {"section": "sweep" if stage not in ("baseline", "ar_attention") else stage,
           "stage": stage, "shape": shape.name, "window": shape.window, "batch": shape.batch,
           "cache": shape.smax, "hq": shape.hq, "hkv": shape.hkv, "d": shape.d, "name": name}
    rec.update(meta)
    try:
      self.prepare(shape)
      ks, vs, lengths = self.cache_sets(shape.batch, shape.smax, shape.hkv, shape.d)
      n_sets = len(ks)
      iters = self.calls_per_program(shape, n_sets)
      calls = 1 + iters * n_sets

      @jax.jit
      def prog(q, ks, vs, lengths):
        first = op(q, ks[0], vs[0], lengths)

        def body(_, q):
          for i in range(n_sets):   # unrolled over the copies: static operands, no slicing
            q = op(q, ks[i], vs[i], lengths)
          return q

        last = jax.lax.fori_loop(0, iters, body, first)
        return first, last[0, 0, 0, 0]

      t0 = time.perf_counter()
      first, _ = jax.block_until_ready(prog(shape.q, ks, vs, lengths))
      rec["compile_s"] = round(time.perf_counter() - t0, 2)
      if check:
        rel, finite = _rel_err(first, shape.ref)
        rec.update(rel_err=rel, finite=finite, ok=bool(finite and rel <= CHECK_TOL))
      else:
        rec["ok"] = True
      sec, best = self.bench.time_program(prog, (shape.q, ks, vs, lengths), calls)
      rec.update(self.metrics(shape, sec, best), calls=calls, cache_sets=n_sets)
      if self.args.device_time and not self.smoke:
        rec.update(self.device_time(shape, prog, (shape.q, ks, vs, lengths), calls))
      if not rec["ok"]:
        self.failed_checks.append(f"{shape.name} {name}")
        print(f"CHECK FAILED: {shape.name} {name} rel_err={rec.get('rel_err')}", flush=True)
    except Exception as e:  # noqa: BLE001  (report and continue with the next configuration)
      traceback.print_exc(limit=3)
      rec["error"] = f"{type(e).__name__}: {e}"[:1500]
      rec["ok"] = False
    self.add_ratios(shape, rec)
    rec["elapsed_s"] = round(time.time() - self.start, 1)
    emit(rec)
    return rec

  def device_time(self, shape, prog, args, calls):
    """GPU-side time per call of ``prog`` from one profiled run (see the module docstring)."""
    try:
      events = profile_gpu_events(self.jax, prog, args)
    except Exception as e:  # noqa: BLE001  (no CUPTI, no trace: the host timing stands)
      return {"device_time_error": f"{type(e).__name__}: {e}"[:500]}
    kernels = [e for e in events if "memcpy" not in e[2].lower()
               and "memset" not in e[2].lower()]
    if not kernels:
      return {"device_time_error": f"no GPU kernel events in the trace ({len(events)} events)"}
    busy = sum(d for _, d, _ in kernels) / 1e3 / calls
    span = (max(t + d for t, d, _ in kernels) - min(t for t, _, _ in kernels)) / 1e3 / calls
    by_name = {}
    for _, d, name in kernels:
      by_name[name] = by_name.get(name, 0.0) + d / 1e3 / calls
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:4]
    rec = {"kernel_us": busy, "span_us": span, "kernels_per_call": len(kernels) / calls,
           "top_kernels_us": {n[:80]: round(us, 2) for n, us in top}}
    if self.bench.peak_gbps:
      rec["pct_bw_kernel"] = 100 * shape.kv_bytes / (busy * 1e-6) / 1e9 / self.bench.peak_gbps
    return rec

  def metrics(self, shape, sec, best):
    peak_t, peak_g = self.bench.peak_tflops, self.bench.peak_gbps
    m = {"us": sec * 1e6, "us_min": best * 1e6, "gbps": shape.kv_bytes / sec / 1e9,
         "tflops": shape.flops / sec / 1e12}
    if peak_g:
      m["pct_bw"] = 100 * m["gbps"] / peak_g
    if peak_t:
      m["pct_peak_tflops"] = 100 * m["tflops"] / peak_t
    if peak_g and peak_t:
      t_mem = shape.kv_bytes / (peak_g * 1e9)
      t_cmp = shape.flops / (peak_t * 1e12)
      m.update(roofline_us=max(t_mem, t_cmp) * 1e6, pct_roofline=100 * max(t_mem, t_cmp) / sec,
               bound="memory" if t_mem >= t_cmp else "compute")
    return m

  def add_ratios(self, shape, rec):
    if "us" not in rec:
      return
    for base, sec in shape.baselines.items():
      rec[f"speedup_vs_{base}"] = sec * 1e6 / rec["us"]

  # -- operations -------------------------------------------------------------------------------

  def pallas_op(self, plan, num_warps, num_stages):
    from pallas_kernels import window_kernel as wk
    interpret = self.smoke
    return lambda q, k, v, n: wk.window_attention(q, k, v, n, plan=plan, num_warps=num_warps,
                                                  num_stages=num_stages, interpret=interpret)

  def plan(self, shape, tile_r=None, tile_k=None, split_mult=1.0):
    from pallas_kernels import window_kernel as wk
    args = (shape.batch, shape.window, shape.hq, shape.hkv, shape.d, shape.smax)
    auto = wk.decode_plan(*args, tile_k=tile_k, tile_r=tile_r)
    if split_mult == 1.0:
      return auto
    return wk.decode_plan(*args, tile_k=tile_k, tile_r=tile_r,
                          num_splits=max(1, round(auto.num_splits * split_mult)))

  @staticmethod
  def config_key(plan, num_warps, num_stages):
    return (plan.tile_r, plan.tile_k, plan.num_splits, num_warps, num_stages)

  def run_pallas(self, shape, stage, tile_r, tile_k, num_warps, num_stages, split_mult=1.0):
    """Measures one Pallas configuration unless already measured; returns its record."""
    from pallas_kernels import window_kernel as wk
    try:
      plan = self.plan(shape, tile_r, tile_k, split_mult)
    except Exception as e:  # noqa: BLE001
      rec = {"section": "sweep", "stage": stage, "shape": shape.name, "tile_r": tile_r,
             "tile_k": tile_k, "error": f"plan: {type(e).__name__}: {e}"[:500]}
      emit(rec)
      return None
    num_warps = num_warps or wk.default_num_warps(plan)
    num_stages = num_stages or wk.default_num_stages(plan)
    key = self.config_key(plan, num_warps, num_stages)
    if key in shape.results:
      return shape.results[key]
    smem = num_stages * 2 * plan.tile_k * plan.head_dim_pad * 2
    if not self.smoke and smem > MAX_SMEM:
      rec = {"section": "sweep", "stage": stage, "shape": shape.name, "skipped":
             f"K/V stages need ~{smem // 1024} KiB shared memory", "config": list(key)}
      shape.results[key] = rec
      emit(rec)
      return rec
    name = (f"pallas[r{plan.tile_r},k{plan.tile_k},n{plan.num_splits},w{num_warps},"
            f"s{num_stages}]")
    meta = {"impl": "pallas", "tile_r": plan.tile_r, "tile_k": plan.tile_k,
            "splits": plan.num_splits, "split_mult": split_mult, "num_warps": num_warps,
            "num_stages": num_stages, "rows_pad": plan.rows_pad, "programs": plan.num_programs}
    rec = self.measure(shape, name, self.pallas_op(plan, num_warps, num_stages), meta, stage)
    shape.results[key] = rec
    return rec

  # -- baselines --------------------------------------------------------------------------------

  def baseline(self, shape):
    from fdllm_jax import attention as attn
    from fdllm_jax import masks
    from pallas_kernels import triton_window as tw
    from pallas_kernels import window_kernel as wk
    ops = {
        "xla": lambda q, k, v, n: attn.xla_attention(q, k, v, mask=masks.Full(), kv_lengths_B=n),
        "cudnn": lambda q, k, v, n: attn.cudnn_attention(q, k, v, mask=masks.Full(),
                                                         kv_lengths_B=n),
    }
    for impl in ("xla", "cudnn"):
      if self.out_of_time(f"baseline {impl} {shape.name}"):
        return
      rec = self.measure(shape, impl, ops[impl], {"impl": impl}, "baseline")
      if "us" in rec:
        shape.baselines[impl] = rec["us"] / 1e6
    if self.out_of_time(f"baseline pallas default {shape.name}"):
      return
    plan = self.plan(shape)
    rec = self.run_pallas(shape, "baseline", None, None, None, None)
    shape.default_key = self.config_key(plan, wk.default_num_warps(plan),
                                        wk.default_num_stages(plan))
    if rec and "us" in rec:
      rec["default"] = True
      shape.baselines["default"] = rec["us"] / 1e6
    self.baseline_mosaic(shape)
    if self.triton_error:
      emit({"section": "baseline", "shape": shape.name, "name": "triton",
            "skipped": self.triton_error[:300]})
      return
    if self.out_of_time(f"baseline triton default {shape.name}"):
      return
    op = lambda q, k, v, n: tw.triton_window_attention(q, k, v, n)  # noqa: E731
    self.measure(shape, "triton", op, {"impl": "triton", "tile_r": plan.tile_r,
                                      "tile_k": plan.tile_k, "splits": plan.num_splits,
                                      "num_warps": wk.default_num_warps(plan),
                                      "num_stages": wk.default_num_stages(plan)}, "baseline")

  def baseline_mosaic(self, shape):
    """The Mosaic GPU (wgmma) split kernel, its default plan with 2 and 3 K/V stages, then with
    P V from shared memory at 2."""
    from pallas_kernels import mosaic_window as mw
    if self.smoke:
      emit({"section": "baseline", "shape": shape.name, "name": "mosaic",
            "skipped": "not run with --cpu-smoke (compiled for Hopper; "
                       "tests/test_mosaic_window.py interprets it)"})
      return
    plan = mw.mosaic_plan(shape.batch, shape.window, shape.hq, shape.hkv, shape.d, shape.smax)
    for stages, registers in ((2, True), (3, True), (2, False)):
      name = f"mosaic[{stages} stages{'' if registers else ', smem P'}]"
      if self.out_of_time(f"baseline {name} {shape.name}"):
        return
      op = functools.partial(_mosaic_op, plan=plan, num_stages=stages,
                             p_from_registers=registers)
      self.measure(shape, name, op,
                   {"impl": "mosaic", "tile_r": plan.tile_r, "tile_k": plan.tile_k,
                    "splits": plan.num_splits, "num_stages": stages,
                    "p_from_registers": registers,
                    "programs": plan.num_programs}, "baseline")

  # -- the sweep --------------------------------------------------------------------------------

  def valid_tile_r(self, shape):
    return valid_tile_r(shape.rows, self.grid["tile_r"])

  def sweep_round(self, round_name):
    todo = list(self.shapes)
    for i, shape in enumerate(todo):
      weights = [SHAPE_WEIGHTS.get((s.window, s.batch), 1.0) for s in todo[i:]]
      share = self.left() * weights[0] / sum(weights)
      shape_deadline = time.time() + max(0.0, share)
      if self.out_of_time(f"sweep {round_name} {shape.name}"):
        return
      emit({"section": "sweep", "stage": f"{round_name}_start", "shape": shape.name,
            "share_s": round(share, 1)})
      try:
        self.descend(shape, round_name, shape_deadline)
        if round_name == "coarse":   # two more programs, on the global budget
          self.breakdown(shape)
      except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        emit({"section": "sweep", "stage": round_name, "shape": shape.name,
              "error": f"{type(e).__name__}: {e}"[:1500]})

  def descend(self, shape, round_name, deadline):
    """Coordinate descent: tiles, then warps x stages, then splits, each at the best so far."""
    from pallas_kernels import window_kernel as wk

    def best_cfg():
      b = shape.best()
      if b is None or b.get("impl") != "pallas":
        plan = self.plan(shape)
        return dict(tile_r=plan.tile_r, tile_k=plan.tile_k, num_warps=None, num_stages=2,
                    split_mult=1.0)
      return dict(tile_r=b["tile_r"], tile_k=b["tile_k"], num_warps=b["num_warps"],
                  num_stages=b["num_stages"], split_mult=b.get("split_mult", 1.0))

    def run(stage, **cfg):
      if self.out_of_time(f"{shape.name} {stage} {cfg}", deadline):
        return False
      self.run_pallas(shape, f"{round_name}_{stage}", cfg["tile_r"], cfg["tile_k"],
                      cfg["num_warps"], cfg["num_stages"], cfg["split_mult"])
      return True

    start = best_cfg()
    default = self.plan(shape)
    # 1. tiles (coarse: default warps for each tile and 2 stages; refine: the best's launch),
    # nearest the default first, so a shape cut short by its time share has the likeliest.
    tiles = [(r, k) for r in self.valid_tile_r(shape) for k in self.grid["tile_k"]]
    tiles.sort(key=lambda rk: (abs(math.log2(rk[0] / default.tile_r))
                               + abs(math.log2(rk[1] / default.tile_k)), -rk[0], -rk[1]))
    for tile_r, tile_k in tiles:
      cfg = dict(start, tile_r=tile_r, tile_k=tile_k)
      if round_name == "coarse":
        cfg.update(num_warps=None, num_stages=2, split_mult=1.0)
      if not run("tiles", **cfg):
        return
    # 2. warps x stages at the best tiles.
    best = best_cfg()
    warps = list(self.grid["num_warps"])
    if best["tile_r"] >= 128 and not self.smoke:
      warps.append(16)   # one warpgroup per 64 rows at tile_r >= 256 / more loads in flight
    for num_warps in warps:
      for num_stages in self.grid["num_stages"]:
        if not run("launch", **dict(best, num_warps=num_warps, num_stages=num_stages)):
          return
    # 3. splits around the automatic count at the best.
    best = best_cfg()
    if best["num_warps"] is None:
      best["num_warps"] = wk.default_num_warps(self.plan(shape, best["tile_r"], best["tile_k"]))
    for mult in (0.5, 2.0) if round_name == "coarse" else (0.25, 0.5, 1.0, 2.0, 4.0):
      if not run("splits", **dict(best, split_mult=mult)):
        return

  def breakdown(self, shape):
    """For the best plan: the Triton kernel, and the split kernel without the combine step."""
    from pallas_kernels import triton_window as tw
    from pallas_kernels import window_kernel as wk
    best = shape.best()
    if best is None or best.get("impl") != "pallas":
      return
    plan = self.plan(shape, best["tile_r"], best["tile_k"], best.get("split_mult", 1.0))
    warps, stages = best["num_warps"], best["num_stages"]
    meta = {"tile_r": plan.tile_r, "tile_k": plan.tile_k, "splits": plan.num_splits,
            "num_warps": warps, "num_stages": stages, "of": best["name"]}
    interpret = self.smoke

    def partials(q, k, v, n):
      o_part, _ = wk.window_partials(q, k, v, n, plan=plan, num_warps=warps,
                                     num_stages=stages, interpret=interpret)
      return q + (o_part[0, 0, 0, 0, 0] * 1e-6).astype(q.dtype)   # keeps the chain

    if not self.out_of_time(f"breakdown partials {shape.name}"):
      self.measure(shape, "pallas_partials[best]", partials, dict(meta, impl="pallas_partials"),
                   "breakdown", check=False)
    if not self.triton_error and not self.out_of_time(f"breakdown triton {shape.name}"):
      op = lambda q, k, v, n: tw.triton_window_attention(  # noqa: E731
          q, k, v, n, plan=plan, num_warps=warps, num_stages=stages)
      self.measure(shape, "triton[best]", op, dict(meta, impl="triton"), "breakdown")

  # -- ar_step ----------------------------------------------------------------------------------

  def ar_step(self, deadline):
    """1-token vs 32-token forwards of the model, and their parts (see the module docstring)."""
    jax, jnp = self.jax, self.jnp
    from flax import nnx

    import decode_speed as ds
    from fdllm_jax import attention as attn
    from fdllm_jax import masks
    from fdllm_jax.config import ModelConfig
    from fdllm_jax.model import Transformer
    from pallas_kernels import window_kernel as wk

    fields = dict(ds.PRESETS["tiny" if self.smoke else "qwen1.5b"])
    fields.pop("dtype")
    layers = self.args.ar_layers or (2 if self.smoke else 8)
    fields["num_hidden_layers"] = layers
    cache_len = self.args.ar_cache or (64 if self.smoke else 512)
    iters = self.args.ar_iters or (2 if self.smoke else 20)
    start = cache_len - 32           # every key of the cache visible: kv_lengths = cache_len
    dtype = jnp.bfloat16
    config = ModelConfig(rope_theta=1e6, max_position_embeddings=32768, **fields)
    hq, hkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    impls = ["pallas", "xla"] + ([] if self.triton_error else ["triton"])
    common = {"section": "ar_step", "layers": layers, "cache": cache_len, "batch": 1,
              "hidden": config.hidden_size, "hq": hq, "hkv": hkv, "d": d}

    # Which path a 1-token (and a 32-token) query takes, and its window plan.
    for n in (1, 32):
      q = jax.ShapeDtypeStruct((1, n, hq, d), dtype)
      k = jax.ShapeDtypeStruct((1, cache_len, hkv, d), dtype)
      routes = {impl: attn.route(impl, masks.Full(), q, k,
                                 kv_lengths_B=jnp.full((1,), cache_len)).path
                for impl in ("pallas", "triton", "xla", "cudnn")}
      plan = wk.decode_plan(1, n, hq, hkv, d, cache_len)
      emit(dict(common, name="route", tokens=n, default_impl=attn.default_implementation(),
                default_impl_on_gpu="pallas", routes=routes, plan_rows=plan.rows,
                plan_rows_pad=plan.rows_pad, plan_tile_r=plan.tile_r, plan_tile_k=plan.tile_k,
                plan_splits=plan.num_splits, plan_programs=plan.num_programs,
                plan_num_warps=wk.default_num_warps(plan),
                padded_row_fraction=1 - plan.rows / plan.rows_pad))

    t0 = time.perf_counter()
    model = Transformer(config, dtype=dtype, rngs=nnx.Rngs(0))
    jax.block_until_ready(nnx.state(model))
    emit(dict(common, name="init", seconds=round(time.perf_counter() - t0, 2),
              params=sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))))
    graphdef, params = nnx.split(model)
    heads = {1: 1, 32: 9}   # LM-head positions, as decode_speed (AR step: 1; window: 9)

    def record(name, tokens, sec, t_compile, **extra):
      rec = dict(common, name=name, tokens=tokens, ms=sec * 1e3,
                 compile_s=round(t_compile, 2), **extra,
                 elapsed_s=round(time.time() - self.start, 1))
      self.ar.append(rec)
      emit(rec)
      return rec

    def guarded(what, fn):
      if self.out_of_time(f"ar_step {what}", deadline):
        return None
      try:
        return fn()
      except Exception as e:  # noqa: BLE001
        traceback.print_exc(limit=3)
        emit(dict(common, name=what, error=f"{type(e).__name__}: {e}"[:1500]))
        return None

    def forward(impl, n):
      t0 = time.perf_counter()
      timer = ds.forward_timer(model, config, dtype, batch=1, cache_len=cache_len, start=start,
                               num_tokens=n, head_positions=heads[n], iters=iters,
                               attention_impl=impl)
      t_compile = time.perf_counter() - t0
      sec = timer()
      return record("forward", n, sec, t_compile, impl=impl, iters=iters,
                    per_layer_incl_head_ms=sec * 1e3 / layers)

    def loop_timer(body_fn, init):
      """Seconds per iteration of a jitted fori_loop of ``iters`` calls (best of 3)."""
      @jax.jit
      def loop(params, x):
        m = nnx.merge(graphdef, params)
        return jax.lax.fori_loop(0, iters, lambda i, x: body_fn(m, i, x), x)
      t0 = time.perf_counter()
      jax.block_until_ready(loop(params, init))
      t_compile = time.perf_counter() - t0
      best = float("inf")
      for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(loop(params, init))
        best = min(best, (time.perf_counter() - t0) / iters)
      return best, t_compile

    def head(n):
      h = heads[n]

      def body(m, i, acc):   # embedding, final norm, LM head on h positions, reduced as
        x = m.embed_tokens(jnp.full((1, n), 7, jnp.int32) + i)   # decode_speed's loop does
        logits = m.logits(m.norm(x)[:, :h])
        return acc + jnp.max(logits[:, :, :8]).astype(jnp.float32)
      sec, t_compile = loop_timer(body, jnp.float32(0))
      return record("head", n, sec, t_compile, head_positions=h)

    def dense(n):
      def body(m, i, x):     # each layer without attention: norms, q and o projections, MLP
        for layer in m.layers:
          a = layer.self_attn
          x = x + a.o_proj(a.q_proj(layer.input_layernorm(x)))
          x = x + layer.mlp(layer.post_attention_layernorm(x))
        return x
      x0 = jnp.full((1, n, config.hidden_size), 0.01, dtype)
      sec, t_compile = loop_timer(body, x0)
      return record("dense_no_attention", n, sec, t_compile,
                    per_layer_ms=sec * 1e3 / layers)

    def attention_alone(impl, n):
      shape = Shape(n, 1, cache_len, dict(hq=hq, hkv=hkv, d=d))
      shape.name = f"ar_W{n}_B1_S{cache_len}"
      from pallas_kernels import triton_window as tw
      interpret = self.smoke
      ops = {
          "xla": lambda q, k, v, l: attn.xla_attention(q, k, v, mask=masks.Full(),
                                                       kv_lengths_B=l),
          "cudnn": lambda q, k, v, l: attn.cudnn_attention(q, k, v, mask=masks.Full(),
                                                           kv_lengths_B=l),
          "pallas": lambda q, k, v, l: wk.window_attention(q, k, v, l, interpret=interpret),
          "triton": lambda q, k, v, l: tw.triton_window_attention(q, k, v, l),
      }
      rec = self.measure(shape, impl, ops[impl], {"impl": impl}, "ar_attention")
      if "us" in rec:
        self.ar.append(dict(common, name="attention", tokens=n, impl=impl,
                            ms=rec["us"] / 1e3, per_model_ms=rec["us"] / 1e3 * layers))
      return rec

    order = [("forward", i, n) for i in impls[:2] for n in (1, 32)]
    order += [("dense", None, 1), ("dense", None, 32), ("head", None, 1), ("head", None, 32)]
    order += [("attention", i, n) for i in ("pallas", "xla") for n in (1, 32)]
    order += [("forward", i, n) for i in impls[2:] for n in (1, 32)]
    order += [("attention", i, n) for i in impls[2:] + ["cudnn"] for n in (1, 32)]
    fns = {"forward": forward, "dense": lambda _, n: dense(n), "head": lambda _, n: head(n),
           "attention": attention_alone}
    for what, impl, n in order:
      guarded(f"{what} {impl or ''} T={n}".replace("  ", " "),
              lambda what=what, impl=impl, n=n: fns[what](impl, n))
    del model, params

  # -- reporting --------------------------------------------------------------------------------

  def summary(self):
    nan = float("nan")
    print("\n==== gpu_decode_sweep summary (per call; side by side in this process) ====",
          flush=True)
    for rec in RECORDS:
      if rec.get("section") == "env":
        print(ga.environment_line(rec))
    print(f"ceilings: {self.bench.peak_tflops or nan:.0f} TFLOP/s bf16 matmul, "
          f"{self.bench.peak_gbps or nan:.0f} GB/s copy (read+write)")
    cols = ("config", "us", "GB/s", "%bw", "%roof", "x_xla", "x_cudnn", "x_default", "rel_err",
            "dev_us", "%bw_dev")
    print(f"{'shape':18s} {cols[0]:36s} " + " ".join(f"{c:>8s}" for c in cols[1:]))

    def line(shape_name, rec):
      label = ("DEFAULT " if rec.get("default") else "") + rec["name"]
      print(f"{shape_name:18s} {label[:36]:36s} {rec['us']:8.1f} {rec['gbps']:8.0f} "
            f"{rec.get('pct_bw', nan):8.1f} {rec.get('pct_roofline', nan):8.1f} "
            f"{rec.get('speedup_vs_xla', nan):8.2f} {rec.get('speedup_vs_cudnn', nan):8.2f} "
            f"{rec.get('speedup_vs_default', nan):8.2f} {rec.get('rel_err', nan):8.1e} "
            f"{rec.get('kernel_us', nan):8.1f} {rec.get('pct_bw_kernel', nan):8.1f}")

    for shape in self.shapes:
      recs = [r for r in RECORDS if r.get("shape") == shape.name and "us" in r]
      best = shape.best()
      # Ratios recomputed against the final baselines (early records may predate some).
      for r in recs:
        self.add_ratios(shape, r)
      for r in recs:
        if r.get("stage") == "baseline":
          line(shape.name, r)
      for r in recs:
        if r.get("stage") == "breakdown":
          line(shape.name, r)
      ranked = sorted((r for r in shape.results.values() if r.get("ok") and "us" in r),
                      key=lambda r: r["us"])
      for i, r in enumerate(ranked[1:3]):   # the runners-up (the default is shown above)
        if not r.get("default"):
          line(shape.name, dict(r, name=f"#{i + 2} {r['name']}"))
      if best is not None:
        line(shape.name, dict(best, name="BEST " + best["name"]))
        roof = best.get("roofline_us")
        print(f"{'':18s} best: {len(shape.results)} pallas configs tried; roofline bound "
              f"{roof or nan:.1f} us ({best.get('bound', '?')})")
      print()
    if self.ar:
      print("ar_step (batch 1): ms per forward / part, T = tokens in the step")
      for rec in self.ar:
        extra = ""
        if rec["name"] == "attention":
          extra = f" (x{rec['layers']} layers = {rec['per_model_ms']:.3f} ms)"
        elif "per_layer_ms" in rec:
          extra = f" ({rec['per_layer_ms']:.3f} ms/layer)"
        print(f"  {rec['name']:20s} {str(rec.get('impl', '')):7s} T={rec['tokens']:2d} "
              f"{rec['ms']:8.3f} ms{extra}")
      self._ar_verdict()
    for rec in RECORDS:
      if "error" in rec:
        print(f"ERROR {rec.get('section')} {rec.get('shape', '')} {rec.get('name', '')}: "
              f"{str(rec['error'])[:300]}")
    if self.skipped:
      print(f"SKIPPED (time budget): {len(self.skipped)} measurements, first: {self.skipped[0]}")
    print(f"checks failed: {self.failed_checks or 'none'}; "
          f"elapsed {time.time() - self.start:.0f} s", flush=True)

  def _ar_verdict(self):
    """Where the 1-token step's extra time goes, from the parts measured."""
    get = {}
    for rec in self.ar:
      get[(rec["name"], rec.get("impl"), rec["tokens"])] = rec["ms"]
    for impl in ("pallas", "xla", "triton"):
      f1, f32 = get.get(("forward", impl, 1)), get.get(("forward", impl, 32))
      if f1 is None or f32 is None:
        continue
      parts = []
      for name, key in (("dense", ("dense_no_attention", None)), ("head", ("head", None)),
                        ("attention", ("attention", impl))):
        a, b = get.get(key + (1,)), get.get(key + (32,))
        if a is not None and b is not None:
          mult = self.ar[0]["layers"] if name == "attention" else 1
          parts.append(f"{name} {(a - b) * mult:+.3f}")
      print(f"  {impl}: forward T=1 - T=32 = {f1 - f32:+.3f} ms; parts (T=1 - T=32): "
            + (", ".join(parts) or "n/a"))


def profile_gpu_events(jax, prog, args):
  """(start_ns, duration_ns, name) of every GPU stream event of one run of ``prog(*args)``,
  read back from the JAX profiler's trace (XSpace) of that run."""
  import glob
  import shutil
  import tempfile
  from jax.profiler import ProfileData
  log_dir = tempfile.mkdtemp(prefix="decode_sweep_profile_")
  try:
    jax.profiler.start_trace(log_dir)
    try:
      jax.block_until_ready(prog(*args))
    finally:
      jax.profiler.stop_trace()
    files = sorted(glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"), recursive=True))
    if not files:
      raise RuntimeError(f"the profiler wrote no trace under {log_dir}")
    events = []
    for plane in ProfileData.from_file(files[-1]).planes:
      if not plane.name.startswith("/device:GPU"):
        continue
      for line in plane.lines:
        if line.name.startswith("Stream"):   # CUPTI activity per stream; not "XLA Ops" etc.
          events += [(e.start_ns, e.duration_ns, e.name) for e in line.events]
    return events
  finally:
    shutil.rmtree(log_dir, ignore_errors=True)


def valid_tile_r(rows, candidates):
  """Row tiles worth trying for ``rows`` packed query rows: none above all rows padded to a
  power of two (e.g. 192 rows: up to 256, one row tile; 6 rows: 16 only)."""
  cover = max(16, 1 << (int(rows) - 1).bit_length())
  return [t for t in candidates if t <= cover]


def _rel_err(out, ref):
  import numpy as np
  out = np.asarray(out, np.float64)
  ref = np.asarray(ref, np.float64)
  finite = bool(np.all(np.isfinite(out)))
  rel = float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)) if finite else None
  return rel, finite


if __name__ == "__main__":
  sys.exit(main())
