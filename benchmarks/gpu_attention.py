"""Attention kernels on a GPU: device ceilings, correctness checks, then timings.

  python benchmarks/gpu_attention.py [--quick] [--out FILE.jsonl]   # on a GPU
  python benchmarks/gpu_attention.py --cpu-smoke                    # tiny, Pallas interpreter

Sections (each guarded: one failing implementation still lets the others report):

1. ``ceilings``: a bf16 8192^3 matmul (TFLOP/s, 2*M*N*K flops) and a large elementwise copy
   (GB/s, bytes read + bytes written), measured here, on this card.
2. ``check``: every implementation against its reference on small shapes with fresh random
   inputs (block kernel forward and gradients for each mask, outputs NaN-poisoned; decode
   windows over ragged lengths 1..Smax with NaN in the cache beyond each length; the mosaic
   kernels' training-mask output and gradients (not in the CPU smoke run); cudnn and the
   ``fdllm_jax.attention`` routes against the xla reference). Prints ||out-ref||/||ref||;
   a failed check prints CHECK FAILED and makes the exit status 1 (after all sections ran).
3. ``train``: the training mask (x_t ++ x_0, block 32) at 2L = 2k/4k/8k/16k tokens
   (B = 16k / 2L rows), Qwen2.5-1.5B heads (Hq=12, Hkv=2, D=128), bf16; forward and
   forward+backward; pallas and mosaic (``pallas_kernels.mosaic_block``, forward and backward
   on wgmma; then ``mosaic[pallas bwd]``, its forward with pallas' backward kernels; not in the
   CPU smoke run) vs xla vs cudnn (cudnn gets the mask as a dense boolean array: it cannot
   skip tiles). Pallas tiling variants at 8k (not with --quick).
4. ``decode``: a W=32 window over caches of 1k/4k/16k/32k keys (all rows full), batch 1 and 8;
   pallas, triton (jax-triton), mosaic (the wgmma kernel, ``pallas_kernels.mosaic_window``;
   bf16 only, not in the CPU smoke run; then ``mosaic[smem P]``, its form with P V from shared
   memory, which the interpreter tests check), xla, cudnn; pallas split-count variants at 16k.

Counting. Training: useful FLOPs only, fwd = 4 * D * Hq * B * V with V the number of (query,
key) pairs the mask shows (dense count); fwd+bwd = 3.5 * fwd (the backward's five matmuls,
QK^T recomputed, against the forward's two). Decode: FLOPs = 4 * D * Hq * W * sum(len);
bytes = the K and V cache entries read once, 2 * sum(len) * Hkv * D * 2 bytes. The copy
ceiling counts read + write, so a decode at 100% of it reads at the card's copy rate.

Timing. JAX exposes no CUDA events for its own stream, so each measurement jits N calls of the
operation unrolled in one program (chained: each call's output feeds the next call's q, so XLA
can neither merge nor drop them; decode calls rotate over enough cache copies to exceed L2) and
times ``jax.block_until_ready`` of the whole program with a host clock: one dispatch and one
sync amortised over N device-side calls. After two warm-up runs (compilation), the median of
``reps`` runs divided by N is reported. Ratios (``speedup_vs_xla``, ``speedup_vs_cudnn``) are
measured side by side in this process. One JSON line per measurement, a table at the end.

If jax-triton's import or first call fails and a fallback wheel directory exists
(``--triton-alt-wheels``, default ``.whl/alt``), the triton check and decode timings are rerun
in a subprocess with that wheel installed to /tmp/site_alt.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

RECORDS = []
FAILED_CHECKS = []
OUT_FILE = None


def emit(record):
  RECORDS.append(record)
  line = json.dumps(record, sort_keys=False)
  print(line, flush=True)
  if OUT_FILE:
    with open(OUT_FILE, "a") as f:
      f.write(line + "\n")


def environment_line(rec) -> str:
  """The summary's first line, from an ``env`` record."""
  return (f"device {rec.get('device')} jax {rec.get('jax')} triton {rec.get('triton')} "
          f"jax_triton {str(rec.get('jax_triton'))[:80]}")


def guarded(section, name):
  """Decorator: run, and on error print the traceback and emit an error record."""
  def wrap(fn):
    def run(*a, **kw):
      try:
        return fn(*a, **kw)
      except Exception as e:  # noqa: BLE001  (report and continue with the next section)
        traceback.print_exc()
        emit({"section": section, "name": name, "error": f"{type(e).__name__}: {e}"[:2000]})
        if section == "check":   # a check that cannot run has not passed
          FAILED_CHECKS.append(name)
        return None
    return run
  return wrap


# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
  p.add_argument("--cpu-smoke", action="store_true",
                 help="tiny shapes on CPU with the Pallas interpreter (tests the script)")
  p.add_argument("--sections", default="ceilings,check,train,decode")
  p.add_argument("--impls", default="pallas,triton,mosaic,xla,cudnn")
  p.add_argument("--reps", type=int, default=None)
  p.add_argument("--out", default=None, help="also append the JSON lines to this file")
  p.add_argument("--ceilings", default=None, help="'TFLOPS,GBPS' instead of measuring")
  p.add_argument("--triton-alt-wheels", default=os.path.join(REPO, ".whl", "alt"))
  p.add_argument("--no-triton-fallback", action="store_true")
  p.add_argument("--time-budget", type=float, default=200.0,
                 help="seconds (from start) after which remaining timings are skipped; checks "
                 "and the target shapes' baselines run first")
  return p.parse_args(argv)


def _import_attention_modules():
  """fdllm_jax.masks / fdllm_jax.attention, even where the package's __init__ (model, tokenizer,
  checkpoints...) cannot import: the GPU image lacks some of those dependencies, and this
  benchmark needs neither. Falls back to a bare package object that only holds its path."""
  try:
    import fdllm_jax.attention  # noqa: F401
  except ImportError as e:
    import types
    for name in [m for m in sys.modules if m == "fdllm_jax" or m.startswith("fdllm_jax.")]:
      del sys.modules[name]
    package = types.ModuleType("fdllm_jax")
    package.__path__ = [os.path.join(REPO, "fdllm_jax")]
    sys.modules["fdllm_jax"] = package
    import fdllm_jax.attention  # noqa: F401,F811
    emit({"section": "setup", "note": f"fdllm_jax/__init__ did not import ({e}); using "
          "fdllm_jax.attention and fdllm_jax.masks alone"})


def main(argv=None):
  global OUT_FILE
  args = parse_args(argv)
  if args.cpu_smoke:
    os.environ["JAX_PLATFORMS"] = "cpu"
  else:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  OUT_FILE = args.out

  import jax

  _import_attention_modules()
  sections = set(args.sections.split(","))
  impls = [i for i in args.impls.split(",") if i]
  bench = Bench(args, impls)
  emit(bench.environment())
  if not args.cpu_smoke and jax.default_backend() != "gpu":
    emit({"section": "setup", "error": f"no GPU backend (got {jax.default_backend()}); "
          "use --cpu-smoke on CPU"})
    return 2
  if "ceilings" in sections:
    bench.ceilings()
  if "check" in sections:
    bench.checks()
  # Order of importance: the target shapes, then the other sizes, then variants.
  train_sizes = bench.train_config()[0]
  caches = bench.decode_config()[0]
  if "train" in sections:
    bench.train(train_sizes[:1])
  if "decode" in sections:
    bench.decode(caches[:1])
  bench.triton_fallback()
  if "train" in sections:
    bench.train(train_sizes[1:])
  if "decode" in sections:
    bench.decode(caches[1:])
  if not args.quick and not args.cpu_smoke:
    if "train" in sections:
      bench.train(train_sizes[:1], variants=True)
    if "decode" in sections:
      bench.decode(caches[:1], variants=True)
  bench.summary()
  if FAILED_CHECKS:
    print(f"CHECK FAILED: {FAILED_CHECKS}", flush=True)
    return 1
  return 0


class Bench:

  def __init__(self, args, impls):
    import jax
    import jax.numpy as jnp
    self.jax, self.jnp = jax, jnp
    self.args = args
    self.impls = impls
    self.smoke = args.cpu_smoke
    self.interpret = self.smoke
    self.reps = args.reps or (2 if self.smoke else (5 if args.quick else 10))
    self.peak_tflops = self.peak_gbps = None
    if args.ceilings:
      self.peak_tflops, self.peak_gbps = (float(x) for x in args.ceilings.split(","))
    self.triton_error = None
    self.baselines = {}
    self.start = time.time()

  def out_of_time(self, what):
    if time.time() - self.start <= self.args.time_budget:
      return False
    emit({"section": "budget", "skipped": what,
          "elapsed_s": round(time.time() - self.start, 1)})
    return True

  # -- environment ------------------------------------------------------------------------------

  def environment(self):
    jax = self.jax
    info = {"section": "env", "jax": jax.__version__, "backend": jax.default_backend(),
            "device": jax.devices()[0].device_kind, "python": sys.version.split()[0]}
    try:
      import jaxlib
      info["jaxlib"] = jaxlib.__version__
    except Exception:  # noqa: BLE001
      pass
    for module in ("triton", "jax_triton"):
      try:
        if module == "jax_triton":
          from pallas_kernels import triton_window
          mod = triton_window.import_jax_triton()
        else:
          mod = __import__(module)
        info[module] = getattr(mod, "__version__", "?")
      except Exception as e:  # noqa: BLE001
        info[module] = f"unavailable: {type(e).__name__}: {str(e)[:200]}"
    return info

  # -- timing -----------------------------------------------------------------------------------

  def time_program(self, fn, args, inner):
    """Median seconds per inner call of a jitted program that runs ``inner`` calls."""
    jax = self.jax
    jax.block_until_ready(fn(*args))   # compile
    if not self.smoke:
      jax.block_until_ready(fn(*args))   # warm
    times = []
    for _ in range(self.reps):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times.append(time.perf_counter() - t0)
    return statistics.median(times) / inner, min(times) / inner

  # -- ceilings ---------------------------------------------------------------------------------

  def ceilings(self):
    if self.peak_tflops is None:
      self._matmul_ceiling()
      self._copy_ceiling()
    emit({"section": "ceilings", "tflops": self.peak_tflops, "gbps": self.peak_gbps})

  @guarded("ceilings", "matmul")
  def _matmul_ceiling(self):
    jax, jnp = self.jax, self.jnp
    n = 256 if self.smoke else 8192
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(jnp.bfloat16)
    inner = 2 if self.smoke else 10

    @jax.jit
    def prog(a, b):
      outs = []
      x = a
      for _ in range(inner):   # chained, so no product can be dropped or merged
        x = jnp.dot(x, b)      # bf16 out, f32 accumulation; grows ~sqrt(n) per step: no overflow
        outs.append(x[0, 0])
      return outs

    t, _ = self.time_program(prog, (a, b), inner)
    self.peak_tflops = 2 * n**3 / t / 1e12
    emit({"section": "ceilings", "name": "bf16_matmul", "n": n, "ms": t * 1e3,
          "tflops": self.peak_tflops})

  @guarded("ceilings", "copy")
  def _copy_ceiling(self):
    jax, jnp = self.jax, self.jnp
    n = (1 << 20) if self.smoke else (1 << 30)   # 2 GiB of bf16
    x = jnp.ones((n,), jnp.bfloat16)
    inner = 2 if self.smoke else 8

    @jax.jit
    def prog(x):
      outs = []
      for _ in range(inner):   # the barrier keeps XLA from fusing the adds into one pass
        x = jax.lax.optimization_barrier(x + jnp.bfloat16(1))
        outs.append(x[0])
      return outs

    t, _ = self.time_program(prog, (x,), inner)
    self.peak_gbps = 2 * n * 2 / t / 1e9
    emit({"section": "ceilings", "name": "copy", "bytes": 2 * n * 2, "ms": t * 1e3,
          "gbps": self.peak_gbps, "note": "bytes read + written"})

  # -- checks -----------------------------------------------------------------------------------

  def _check(self, name, out, ref, tol, extra=None):
    import numpy as np
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    finite = bool(np.all(np.isfinite(out)))
    rel = float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
    ok = finite and rel <= tol
    rec = {"section": "check", "name": name, "rel_err": rel, "max_abs_err":
           float(np.max(np.abs(out - ref))) if finite else None, "tol": tol, "finite": finite,
           "ok": ok}
    rec.update(extra or {})
    emit(rec)
    if not ok:
      FAILED_CHECKS.append(name)
      print(f"CHECK FAILED: {name} rel_err={rel} finite={finite}", flush=True)

  def checks(self):
    if "pallas" in self.impls:
      # (The smoke run only exercises this script; tests/test_block_kernel.py covers the rest.)
      for kind in ("training",) if self.smoke else ("causal", "block_causal", "training"):
        self._check_block(kind, "bfloat16")
      self._check_block("training", "float32")
    if "pallas" in self.impls:
      self._check_window("pallas")
    if "triton" in self.impls:
      self._check_window("triton")
    if "mosaic" in self.impls:
      self._check_window("mosaic")
      self._check_window("mosaic_smem_p")   # P V from shared memory: the interpreted form
      self._check_block("training", "bfloat16", impl="mosaic")
    if "cudnn" in self.impls:
      self._check_cudnn()
    self._check_routes()

  def _block_shapes(self):
    if self.smoke:
      return dict(batch=1, hq=4, hkv=2, d=32, t=48)
    return dict(batch=2, hq=12, hkv=2, d=128, t=192)   # 192: not a multiple of the tiles

  def _block_check_tolerance(self, dtype):
    # bf16 operands: 1e-2. float32 on a GPU: Pallas-Triton dots run in TF32 (~1e-3).
    if dtype == "bfloat16":
      return 1e-2
    return 1e-5 if self.smoke else 5e-3

  def _check_block(self, kind, dtype_name, impl="pallas"):
    @guarded("check", f"{'' if impl == 'pallas' else impl + '_'}block_attention_{kind}_"
                      f"{dtype_name}")
    def run():
      jax, jnp = self.jax, self.jnp
      from pallas_kernels import block_kernel as bk
      from pallas_kernels import mosaic_block as mb
      if impl == "mosaic" and self.smoke:   # (tests/test_mosaic_block.py interprets it)
        emit({"section": "check", "name": f"mosaic_block_{kind}", "skipped": "no GPU"})
        return
      s = self._block_shapes()
      dtype = jnp.dtype(dtype_name)
      t = s["t"]
      block_size = 8 if self.smoke else 32
      keys = jax.random.split(jax.random.PRNGKey(hash(kind) % 1000), 4)
      q = jax.random.normal(keys[0], (s["batch"], t, s["hq"], s["d"])).astype(dtype)
      k = jax.random.normal(keys[1], (s["batch"], t, s["hkv"], s["d"])).astype(dtype)
      v = jax.random.normal(keys[2], (s["batch"], t, s["hkv"], s["d"])).astype(dtype)
      cot = jax.random.normal(keys[3], q.shape).astype(dtype)
      f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
      if impl == "mosaic":   # forward and backward on wgmma
        op = functools.partial(mb.mosaic_block_attention, kind=kind, block_size=block_size)
      else:
        op = functools.partial(bk.block_attention, kind=kind, block_size=block_size,
                               interpret=self.interpret, poison_outputs=True)
      kernel = jax.jit(lambda q, k, v, c: jax.vjp(op, q, k, v)[1](c) + (op(q, k, v),))
      reference = jax.jit(lambda q, k, v, c: jax.vjp(
          lambda *a: bk.block_attention_reference(*a, kind=kind, block_size=block_size),
          q, k, v)[1](c) + (bk.block_attention_reference(q, k, v, kind=kind,
                                                         block_size=block_size),))
      got = kernel(q, k, v, cot)
      ref = reference(f32(q), f32(k), f32(v), f32(cot))
      tol = self._block_check_tolerance(dtype_name)
      for name, g, r in zip(("dq", "dk", "dv", "out"), got, ref):
        self._check(f"{impl}_block_{kind}_{dtype_name}_{name}", g, r, tol,
                    {"shape": f"B{s['batch']} T{t} Hq{s['hq']} Hkv{s['hkv']} D{s['d']}"})
    run()

  def _window_inputs(self, seed, batch, window, hq, hkv, d, smax, lengths, dtype):
    jax, jnp = self.jax, self.jnp
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(keys[0], (batch, window, hq, d)).astype(dtype)
    k = jax.random.normal(keys[1], (batch, smax, hkv, d)).astype(dtype)
    v = jax.random.normal(keys[2], (batch, smax, hkv, d)).astype(dtype)
    lengths = jnp.asarray(lengths, jnp.int32)
    return q, k, v, lengths

  def _check_window(self, impl):
    @guarded("check", f"window_{impl}")
    def run():
      jax, jnp = self.jax, self.jnp
      from pallas_kernels import mosaic_window as mw
      from pallas_kernels import triton_window as tw
      from pallas_kernels import window_kernel as wk
      if self.smoke and impl != "pallas":   # (the Mosaic kernel: tests/test_mosaic_window.py)
        emit({"section": "check", "name": f"window_{impl}", "skipped": "no GPU"})
        return
      if self.smoke:
        shape = dict(batch=3, window=8, hq=4, hkv=2, d=32, smax=100, lengths=[1, 100, 37])
      else:
        shape = dict(batch=3, window=32, hq=12, hkv=2, d=128, smax=1000,
                     lengths=[1, 1000, 333])
      # The Mosaic kernel takes 16-bit inputs only (wgmma; attention() routes float32 to xla).
      mosaic = impl.startswith("mosaic")
      for dtype in (jnp.bfloat16,) if mosaic else (jnp.bfloat16, jnp.float32):
        q, k, v, lengths = self._window_inputs(1, dtype=dtype, **shape)
        beyond = (jnp.arange(shape["smax"])[None, :] >= lengths[:, None])[:, :, None, None]
        k_dirty = jnp.where(beyond, jnp.nan, k).astype(dtype)
        v_dirty = jnp.where(beyond, jnp.nan, v).astype(dtype)
        if impl == "pallas":
          fn = jax.jit(lambda *a: wk.window_attention(*a, interpret=self.interpret,
                                                      poison_outputs=True))
        elif mosaic:
          fn = jax.jit(functools.partial(mw.mosaic_window_attention,
                                         p_from_registers=impl == "mosaic"))
        else:
          fn = jax.jit(tw.triton_window_attention)
        try:
          out = fn(q, k_dirty, v_dirty, lengths)
        except Exception as e:
          if impl == "triton":
            self.triton_error = f"{type(e).__name__}: {e}"
          raise
        ref = wk.window_attention_reference(q.astype(jnp.float32), k.astype(jnp.float32),
                                            v.astype(jnp.float32), lengths)
        # float32 on a GPU: Pallas dots run in TF32 (~1e-3), the Triton kernel asks for IEEE.
        tol = 1e-2 if dtype == jnp.bfloat16 else (
            1e-5 if self.smoke else (5e-3 if impl == "pallas" else 1e-4))
        self._check(f"{impl}_window_{jnp.dtype(dtype).name}", out, ref, tol,
                    {"lengths": shape["lengths"], "smax": shape["smax"]})
    run()

  def _check_cudnn(self):
    jax, jnp = self.jax, self.jnp
    from fdllm_jax import attention as attn
    from fdllm_jax import masks
    s = self._block_shapes()
    t = s["t"]
    block_size = 8 if self.smoke else 32
    keys = jax.random.split(jax.random.PRNGKey(7), 3)
    q = jax.random.normal(keys[0], (s["batch"], t, s["hq"], s["d"])).astype(jnp.bfloat16)
    k = jax.random.normal(keys[1], (s["batch"], t, s["hkv"], s["d"])).astype(jnp.bfloat16)
    v = jax.random.normal(keys[2], (s["batch"], t, s["hkv"], s["d"])).astype(jnp.bfloat16)
    for mask in (masks.Causal(), masks.Training(block_size, t // 2)):
      name = f"cudnn_{type(mask).__name__}"

      @guarded("check", name)
      def run():
        out = jax.jit(lambda q, k, v: attn.cudnn_attention(q, k, v, mask=mask))(q, k, v)
        ref = attn.xla_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                 v.astype(jnp.float32), mask=mask)
        self._check(name, out, ref, 1e-2)
      run()

  def _check_routes(self):
    jax, jnp = self.jax, self.jnp
    from fdllm_jax import attention as attn
    from fdllm_jax import masks
    s = self._block_shapes()
    t = s["t"]
    block_size = 8 if self.smoke else 32
    q, k, v, _ = self._window_inputs(
        3, s["batch"], t, s["hq"], s["hkv"], s["d"], t, [t] * s["batch"], jnp.bfloat16)
    window_q = q[:, :min(32, t)]
    lengths = jnp.asarray([max(1, t // (i + 1)) for i in range(s["batch"])], jnp.int32)
    for impl in self.impls:
      if impl == "triton" and (self.smoke or self.triton_error):
        continue
      for mask, qq, kw in ((masks.Training(block_size, t // 2), q, {}),
                           (masks.Full(), window_q, {"kv_lengths_B": lengths})):
        name = f"attention_{impl}_{type(mask).__name__}"

        @guarded("check", name)
        def run():
          chosen = attn.route(impl, mask, qq, k, **kw)
          out = jax.jit(lambda q, k, v: attn.attention(
              q, k, v, mask=mask, implementation=impl, interpret=self.interpret, **kw))(qq, k, v)
          ref = attn.xla_attention(qq.astype(jnp.float32), k.astype(jnp.float32),
                                   v.astype(jnp.float32), mask=mask, **kw)
          self._check(name, out, ref, 1e-2, {"path": chosen.path, "fallback": chosen.fallback})
        run()

  # -- training shapes --------------------------------------------------------------------------

  def train_config(self):
    if self.smoke:
      return [64], dict(hq=4, hkv=2, d=32), 8, 128  # batch 2: one shared-stream row
    # The target shape first, so a run cut short by the time budget still has it.
    sizes = [8192, 2048] if self.args.quick else [8192, 2048, 4096, 16384]
    return sizes, dict(hq=12, hkv=2, d=128), 32, 16384

  def train(self, sizes, variants=False):
    """Baselines (xla, cudnn) first, then pallas; ``variants``: pallas tiling variants only."""
    _, heads, block_size, tokens = self.train_config()
    for t in sizes:
      batch = max(1, tokens // t)
      for mode in ("fwd", "fwd+bwd"):
        if variants:
          if "pallas" not in self.impls:
            continue
          from pallas_kernels import block_kernel as bk
          # pallas[q128w8]: the defaults before the H200 run of session 1 (for comparison)
          todo = [("pallas[q128w8]", bk.Tiling(128, 64, 64, 64, 64, 64, 8, 8, 2)),
                  ("pallas[bwd32]", bk.Tiling(dq_q=64, dq_k=32, dkv_q=32, dkv_k=64,
                                              bwd_warps=4)),
                  ("pallas[s3]", bk.Tiling(num_stages=3))]
        else:
          todo = [(i, None) for i in ("xla", "cudnn", "pallas", "mosaic") if i in self.impls]
          if "mosaic" in self.impls and mode == "fwd+bwd":   # timed last
            todo.append(("mosaic[pallas bwd]", None))
        for name, tiling in todo:
          if name.startswith("mosaic") and self.smoke:
            continue
          if self.out_of_time(f"train {name} {mode} T={t}"):
            continue
          rec = self._time_train(name, tiling, t, batch, heads, block_size, mode, self.jnp.bfloat16)
          self._emit_with_ratios(("train", t, batch, mode), name, rec)
          if name == "pallas" and rec:
            self._train_shared(rec, t, batch, heads, block_size, mode)

  def _train_shared(self, two_rows, t, batch, heads, block_size, mode):
    """The shared clean stream (TrainConfig.share_clean_stream): the ``batch`` rows of
    x_t ++ x_0 (2L) hold batch / 2 samples' two views; x_t^A ++ x_t^B ++ x_0 (3L) needs one row
    per sample. Compared per sample with the two-row pallas record just measured."""
    rows = batch // 2
    if rows < 1 or self.out_of_time(f"train pallas[shared] {mode} T={t}"):
      return
    rec = self._time_train("pallas[shared]", None, 3 * (t // 2), rows, heads, block_size, mode,
                           self.jnp.bfloat16)
    if rec:
      rec["ms_per_sample"] = rec["ms"] / rows
      rec["speedup_vs_pallas_two_rows"] = (two_rows["ms"] / (batch / 2)) / rec["ms_per_sample"]
      emit(rec)

  def _train_flops(self, t, batch, hq, d, block_size, noisy_streams=1):
    import numpy as np
    from fdllm_jax import masks
    length = t // (noisy_streams + 1)
    # Visible pairs of the training mask, in closed form: a noisy query of block j sees its
    # block and j clean blocks, a clean query j + 1 clean blocks (B keys each).
    n = length // block_size
    visible = block_size * block_size * (noisy_streams * (n + n * (n - 1) // 2)
                                          + n * (n + 1) // 2)
    if t <= 1024:  # cross-check the closed form against the dense mask
      mask = masks.Training(block_size, length, noisy_streams)
      dense = int(np.asarray(masks.dense(mask, t, t)).sum())
      assert dense == visible, (dense, visible)
    return 4 * d * hq * batch * visible

  def _time_train(self, name, tiling, t, batch, heads, block_size, mode, dtype):
    @guarded("train", f"{name}_{mode}_T{t}")
    def run():
      jax = self.jax
      from fdllm_jax import attention as attn
      from fdllm_jax import masks
      from pallas_kernels import block_kernel as bk
      hq, hkv, d = heads["hq"], heads["hkv"], heads["d"]
      kind = "training_shared" if name == "pallas[shared]" else "training"
      noisy_streams = bk.TRAINING_KINDS[kind]
      mask = masks.Training(block_size, t // (noisy_streams + 1), noisy_streams)
      impl = name.split("[")[0]
      if impl == "pallas":
        op = lambda q, k, v: bk.block_attention(  # noqa: E731
            q, k, v, kind=kind, block_size=block_size, interpret=self.interpret,
            tiling=tiling)
      elif impl == "mosaic":
        from pallas_kernels import mosaic_block as mb
        backward = "pallas" if name == "mosaic[pallas bwd]" else "mosaic"
        op = lambda q, k, v: mb.mosaic_block_attention(  # noqa: E731
            q, k, v, kind=kind, block_size=block_size, backward=backward)
      elif impl == "xla":
        op = lambda q, k, v: attn.xla_attention(q, k, v, mask=mask)  # noqa: E731
      else:
        op = lambda q, k, v: attn.cudnn_attention(q, k, v, mask=mask)  # noqa: E731
      keys = jax.random.split(jax.random.PRNGKey(t), 4)
      q = jax.random.normal(keys[0], (batch, t, hq, d)).astype(dtype)
      k = jax.random.normal(keys[1], (batch, t, hkv, d)).astype(dtype)
      v = jax.random.normal(keys[2], (batch, t, hkv, d)).astype(dtype)
      cot = jax.random.normal(keys[3], q.shape).astype(dtype)
      inner = 2 if self.smoke else 4

      @jax.jit
      def prog(q, k, v, cot):
        outs = []
        for _ in range(inner):     # chained: the next call's q is this call's result
          if mode == "fwd":
            q = op(q, k, v)
            outs.append(q[0, 0, 0, 0])
          else:
            out, vjp = jax.vjp(op, q, k, v)
            dq, dk, dv = vjp(cot)
            q = dq
            outs += [out[0, 0, 0, 0], dk[0, 0, 0, 0], dv[0, 0, 0, 0]]
        return outs

      sec, best = self.time_program(prog, (q, k, v, cot), inner)
      flops = self._train_flops(t, batch, hq, d, block_size, noisy_streams) * (
          1 if mode == "fwd" else 3.5)
      rec = {"section": "train", "impl": name, "mode": mode, "tokens": t, "batch": batch,
             "hq": hq, "hkv": hkv, "d": d, "block": block_size, "ms": sec * 1e3,
             "ms_min": best * 1e3, "tflops": flops / sec / 1e12}
      if tiling is not None:
        rec["tiling"] = str(tiling)
      if self.peak_tflops:
        rec["pct_peak_tflops"] = 100 * rec["tflops"] / self.peak_tflops
      return rec
    return run()

  # -- decode shapes ----------------------------------------------------------------------------

  def decode_config(self):
    if self.smoke:
      return [128], [2], dict(window=8, hq=4, hkv=2, d=32)
    caches = [16384] if self.args.quick else [16384, 1024, 4096, 32768]
    return caches, [1, 8], dict(window=32, hq=12, hkv=2, d=128)

  def decode(self, caches, variants=False):
    """Baselines (xla, cudnn) first, then pallas and triton; ``variants``: pallas launch
    parameter variants only."""
    from pallas_kernels import window_kernel as wk
    _, batches, shape = self.decode_config()
    for smax in caches:
      for batch in batches:
        if variants:
          if "pallas" not in self.impls:
            continue
          args = (batch, shape["window"], shape["hq"], shape["hkv"], shape["d"], smax)
          base = wk.decode_plan(*args)
          todo = []
          for splits in sorted({max(1, base.num_splits // 2), base.num_splits * 2}):
            plan = wk.decode_plan(*args, num_splits=splits)
            if plan.num_splits != base.num_splits:
              todo.append((f"pallas[splits={plan.num_splits}]", {"plan": plan}))
          todo += [("pallas[k128]", {"plan": wk.decode_plan(*args, tile_k=128)}),
                   ("pallas[w4]", {"num_warps": 4}), ("pallas[s3]", {"num_stages": 3})]
        else:
          todo = [(i, {}) for i in ("xla", "cudnn", "pallas", "triton", "mosaic")
                  if i in self.impls]
          if "mosaic" in self.impls:   # the form the interpreter checks, timed last
            todo.append(("mosaic[smem P]", {"p_from_registers": False}))
        for name, opts in todo:
          if name.split("[")[0] in ("triton", "mosaic") and self.smoke:
            continue
          if self.out_of_time(f"decode {name} S={smax} B={batch}"):
            continue
          rec = self._time_decode(name, opts, smax, batch, shape, self.jnp.bfloat16)
          self._emit_with_ratios(("decode", smax, batch), name, rec)

  def _time_decode(self, name, opts, smax, batch, shape, dtype):
    @guarded("decode", f"{name}_S{smax}_B{batch}")
    def run():
      jax, jnp = self.jax, self.jnp
      from fdllm_jax import attention as attn
      from fdllm_jax import masks
      from pallas_kernels import mosaic_window as mw
      from pallas_kernels import triton_window as tw
      from pallas_kernels import window_kernel as wk
      w, hq, hkv, d = shape["window"], shape["hq"], shape["hkv"], shape["d"]
      impl = name.split("[")[0]
      if impl == "triton" and self.triton_error:
        raise RuntimeError(f"skipped: triton failed its check ({self.triton_error[:200]})")
      ops = {
          "pallas": lambda q, k, v, n: wk.window_attention(q, k, v, n, **opts,
                                                           interpret=self.interpret),
          "triton": lambda q, k, v, n: tw.triton_window_attention(q, k, v, n),
          "mosaic": lambda q, k, v, n: mw.mosaic_window_attention(q, k, v, n, **opts),
          "xla": lambda q, k, v, n: attn.xla_attention(q, k, v, mask=masks.Full(),
                                                       kv_lengths_B=n),
          "cudnn": lambda q, k, v, n: attn.cudnn_attention(q, k, v, mask=masks.Full(),
                                                           kv_lengths_B=n),
      }
      op = ops[impl]
      kv_bytes_one = 2 * batch * smax * hkv * d * jnp.dtype(dtype).itemsize
      # Distinct caches, rotated, so that small caches are not served from L2 (~50-60 MB).
      n_sets = 1 if self.smoke else max(1, min(8, math.ceil(256e6 / kv_bytes_one)))
      inner = 2 if self.smoke else 8
      keys = jax.random.split(jax.random.PRNGKey(smax + batch), 2 * n_sets + 1)
      q = jax.random.normal(keys[0], (batch, w, hq, d)).astype(dtype)
      ks = [jax.random.normal(keys[1 + i], (batch, smax, hkv, d)).astype(dtype)
            for i in range(n_sets)]
      vs = [jax.random.normal(keys[1 + n_sets + i], (batch, smax, hkv, d)).astype(dtype)
            for i in range(n_sets)]
      lengths = jnp.full((batch,), smax, jnp.int32)

      @jax.jit
      def prog(q, ks, vs, lengths):
        outs = []
        for i in range(inner):
          q = op(q, ks[i % n_sets], vs[i % n_sets], lengths)
          outs.append(q[0, 0, 0, 0])
        return outs

      sec, best = self.time_program(prog, (q, ks, vs, lengths), inner)
      flops = 4 * d * hq * w * batch * smax
      rec = {"section": "decode", "impl": name, "cache": smax, "batch": batch, "window": w,
             "hq": hq, "hkv": hkv, "d": d, "ms": sec * 1e3, "ms_min": best * 1e3,
             "us": sec * 1e6, "gbps": kv_bytes_one / sec / 1e9, "tflops": flops / sec / 1e12,
             "cache_sets": n_sets}
      if impl in ("pallas", "triton"):
        p = opts.get("plan") or wk.decode_plan(batch, w, hq, hkv, d, smax)
        rec.update(splits=p.num_splits, tile_r=p.tile_r, tile_k=p.tile_k,
                   programs=p.num_programs,
                   num_warps=opts.get("num_warps") or wk.default_num_warps(p),
                   num_stages=opts.get("num_stages") or wk.default_num_stages(p))
      if impl == "mosaic":
        p = mw.mosaic_plan(batch, w, hq, hkv, d, smax)
        rec.update(splits=p.num_splits, tile_r=p.tile_r, tile_k=p.tile_k,
                   programs=p.num_programs, num_stages=mw.DEFAULT_NUM_STAGES,
                   p_from_registers=opts.get("p_from_registers", True))
      if self.peak_gbps:
        rec["pct_peak_gbps"] = 100 * rec["gbps"] / self.peak_gbps
      if self.peak_tflops:
        rec["pct_peak_tflops"] = 100 * rec["tflops"] / self.peak_tflops
      return rec
    return run()

  # -- reporting --------------------------------------------------------------------------------

  def _emit_with_ratios(self, key, name, rec):
    """Emits ``rec`` with its speedups over the baselines already measured at ``key``."""
    if not rec:
      return
    baselines = self.baselines.setdefault(key, {})
    if name in ("xla", "cudnn"):
      baselines[name] = rec["ms"]
    for b, ms in baselines.items():
      rec[f"speedup_vs_{b}"] = ms / rec["ms"]
    emit(rec)

  def triton_fallback(self):
    """Reruns triton's check and decode timings with the fallback jax-triton wheel."""
    if not self.triton_error or self.smoke or self.args.no_triton_fallback:
      return
    wheels = sorted(glob.glob(os.path.join(self.args.triton_alt_wheels, "*.whl")))
    if not wheels:
      emit({"section": "triton_fallback", "skipped": f"no wheels in "
            f"{self.args.triton_alt_wheels}", "triton_error": self.triton_error[:500]})
      return
    remaining = self.args.time_budget - (time.time() - self.start)
    if remaining < 45:
      emit({"section": "triton_fallback", "skipped": "time budget",
            "triton_error": self.triton_error[:500]})
      return
    site = "/tmp/site_alt"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--no-compile", "--no-cache-dir", "--upgrade", "--target", site, *wheels],
                   check=False)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [site, REPO, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, os.path.abspath(__file__), "--sections", "check,decode",
           "--impls", "triton,xla", "--no-triton-fallback", "--quick",
           "--time-budget", str(int(min(60, remaining - 30)))]
    if self.peak_tflops and self.peak_gbps:
      cmd += ["--ceilings", f"{self.peak_tflops},{self.peak_gbps}"]
    emit({"section": "triton_fallback", "wheels": [os.path.basename(w) for w in wheels],
          "triton_error": self.triton_error[:500]})
    try:
      proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                            timeout=min(100, remaining))
    except subprocess.TimeoutExpired as e:
      emit({"section": "triton_fallback", "error": f"timed out: {e}"})
      return
    sys.stdout.write(proc.stdout[-20000:])
    sys.stderr.write(proc.stderr[-5000:])
    for line in proc.stdout.splitlines():
      if line.startswith("{"):
        try:
          rec = json.loads(line)
        except json.JSONDecodeError:
          continue
        rec["via"] = "triton_fallback"
        RECORDS.append(rec)

  def summary(self):
    nan = float("nan")
    print("\n==== summary (per call; speedups measured side by side in this process) ====",
          flush=True)
    for rec in RECORDS:
      if rec.get("section") == "env":
        print(environment_line(rec))
      if rec.get("section") == "ceilings" and "name" in rec:
        print(f"ceiling {rec['name']}: " + (f"{rec['tflops']:.0f} TFLOP/s"
              if "tflops" in rec else f"{rec.get('gbps', 0):.0f} GB/s (read+write)"))
    for rec in RECORDS:
      if rec.get("section") == "train" and "ms" in rec:
        print(f"train {rec['mode']:7s} T={rec['tokens']:6d} B={rec['batch']:2d} "
              f"{rec['impl']:14s} {rec['ms']:9.3f} ms {rec['tflops']:7.1f} TFLOP/s "
              f"{rec.get('pct_peak_tflops', nan):5.1f}% "
              f"x_xla={rec.get('speedup_vs_xla', nan):5.2f} "
              f"x_cudnn={rec.get('speedup_vs_cudnn', nan):5.2f}"
              + (f" per sample x_two_rows={rec['speedup_vs_pallas_two_rows']:5.2f}"
                 if "speedup_vs_pallas_two_rows" in rec else ""))
    for rec in RECORDS:
      if rec.get("section") == "decode" and "ms" in rec:
        print(f"decode S={rec['cache']:6d} B={rec['batch']} {rec['impl']:18s} "
              f"{rec['us']:9.1f} us {rec['gbps']:7.0f} GB/s "
              f"{rec.get('pct_peak_gbps', nan):5.1f}% "
              f"x_xla={rec.get('speedup_vs_xla', nan):5.2f} "
              f"x_cudnn={rec.get('speedup_vs_cudnn', nan):5.2f}"
              + (" (fallback wheel)" if rec.get("via") else ""))
    for rec in RECORDS:
      if "error" in rec:
        print(f"ERROR {rec.get('section')} {rec.get('name')}: {rec['error'][:300]}")
      if rec.get("section") == "budget":
        print(f"SKIPPED (time budget): {rec['skipped']}")
    print(f"checks failed: {FAILED_CHECKS or 'none'}; "
          f"elapsed {time.time() - self.start:.0f} s", flush=True)


if __name__ == "__main__":
  sys.exit(main())
