"""TPU attention: splash (training mask) and the window kernel (decoding) against the XLA path.

  python benchmarks/tpu_attention.py [--quick] [--out FILE.jsonl]   # on a TPU VM
  python benchmarks/tpu_attention.py --cpu-smoke                    # tiny, interpret mode

Prints one JSON line per measurement; every ratio is measured side by side in this process.
``--cpu-smoke`` only shows that the script runs: interpret-mode timings mean nothing.

1. ``ceilings``: a bf16 8192^3 matmul (TFLOP/s) and a large copy (GB/s, read + write), here.
2. ``check``: splash forward/gradients and the window kernel against the xla reference on
   small random inputs (||out - ref|| / ||ref||); a failure prints CHECK FAILED, exit status 1.
3. ``train``: the x_t ++ x_0 training mask (block 32) at 2L = 2k/4k/8k (rows = 16k / 2L),
   Qwen2.5-1.5B heads (Hq 12, Hkv 2, D 128), bf16; forward and forward+backward; splash with
   the chosen tiles, splash with fixed tiles (the data to re-fit ``fdllm_jax.splash``'s
   block-size cost model), and xla. Useful FLOPs only: fwd = 4 * D * Hq * rows * (visible
   (q, k) pairs), fwd+bwd = 3.5 x fwd.
4. ``decode``: a W = 32 window over caches of 1k..32k slots, batch 1 and 8, every row full and
   ragged (row b holds (b + 1) / B of the cache); window kernel vs xla. Bytes = the K/V entries
   a row really holds, read once: the xla path reads the whole cache, so its GB/s on ragged
   rows is what it would need to match the kernel.

Timing: N calls chained in one jitted program (each output feeds the next call's queries) and
timed with a host clock after two warm-up runs; the median of ``reps`` runs divided by N.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fdllm_jax import attention, masks, splash  # noqa: E402

FAILED = []
OUT = None


def emit(record):
  line = json.dumps(record)
  print(line, flush=True)
  if OUT:
    with open(OUT, "a") as f:
      f.write(line + "\n")


def guarded(fn):
  @functools.wraps(fn)
  def run(*a, **kw):
    try:
      return fn(*a, **kw)
    except Exception as e:  # noqa: BLE001 - report, go on with the next section
      traceback.print_exc()
      emit({"section": fn.__name__, "error": f"{type(e).__name__}: {e}"[:2000]})
  return run


def timed(step, x0, *operands, n, reps):
  """Seconds per call of ``step(x, *operands) -> x`` (same shape), N chained calls per program.

  Operands are arguments of the program (not constants XLA could fold).
  """
  @jax.jit
  def chain(x, *ops):
    for _ in range(n):
      x = step(x, *ops)
    return x
  for _ in range(2):
    jax.block_until_ready(chain(x0, *operands))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(chain(x0, *operands))
    times.append((time.perf_counter() - t0) / n)
  return statistics.median(times)


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@guarded
def ceilings(args):
  n = 512 if args.cpu_smoke else 8192
  a = jnp.ones((n, n), jnp.bfloat16)
  t = timed(lambda x, a: (x @ a).astype(jnp.bfloat16) * 1e-3, a, a, n=args.n, reps=args.reps)
  emit({"section": "ceilings", "name": "matmul_bf16", "tflops": 2 * n ** 3 / t / 1e12})
  big = jnp.ones((16 if args.cpu_smoke else 1024, 1024, 256), jnp.float32)
  t = timed(lambda x: x * 1.0001, big, n=args.n, reps=args.reps)
  emit({"section": "ceilings", "name": "copy", "gbps": 2 * big.nbytes / t / 1e9})


@guarded
def check(args):
  rng = np.random.default_rng(0)
  mask = masks.Training(32, 256)
  q = jnp.asarray(rng.standard_normal((2, 512, 4, 128)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((2, 512, 2, 128)), jnp.float32)
  ct = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

  def vg(fn, q, k, ct):
    out, vjp = jax.vjp(fn, q, k, k)
    return (out,) + vjp(ct)
  ours = lambda q, k, v: splash.splash_attention(q, k, v, mask=mask)
  ref = lambda q, k, v: attention.xla_attention(q, k, v, mask=mask)
  got = jax.jit(functools.partial(vg, ours))(q, k, ct)
  want = jax.jit(functools.partial(vg, ref))(q, k, ct)
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    err = rel(g, w)
    emit({"section": "check", "name": f"splash_training_{name}", "rel_err": err})
    if not err <= 1e-5:
      FAILED.append(f"splash {name}")
  lengths = jnp.asarray([1, 300, 1024], jnp.int32)
  qd = jnp.asarray(rng.standard_normal((3, 32, 12, 128)), jnp.float32)
  kd = jnp.asarray(rng.standard_normal((3, 1024, 2, 128)), jnp.float32)
  got = splash.window_attention(qd, kd, kd, mask=masks.Full(), q_offset_B=lengths - 1,
                                kv_lengths_B=lengths)
  want = attention.xla_attention(qd, kd, kd, mask=masks.Full(), kv_lengths_B=lengths)
  err = rel(got, want)
  emit({"section": "check", "name": "window_ragged", "rel_err": err})
  if not err <= 1e-5:
    FAILED.append("window")
  if FAILED:
    print("CHECK FAILED:", FAILED, flush=True)


def _visible_pairs(mask, length):
  """Visible (q, k) pairs of the training mask, counted per B x B block (exact)."""
  vis = splash.tile_visibility(mask, length, length, mask.block_size, mask.block_size)
  return int(vis.sum()) * mask.block_size ** 2


@guarded
def train(args):
  tokens = 2048 if args.cpu_smoke else 16384
  lengths = [512] if args.cpu_smoke else ([4096] if args.quick else [2048, 4096, 8192])
  hq, hkv, d = (4, 2, 128) if args.cpu_smoke else (12, 2, 128)
  rng = np.random.default_rng(0)
  for two_l in lengths:
    rows = max(1, tokens // two_l)
    mask = masks.Training(32, two_l // 2)
    q = jnp.asarray(rng.standard_normal((rows, two_l, hq, d)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((rows, two_l, hkv, d)), jnp.bfloat16)
    flops_fwd = 4 * d * hq * rows * _visible_pairs(mask, two_l)
    variants = {"xla": None, "splash_chosen": splash.choose_block_sizes(mask, two_l, two_l, d)}
    if not args.quick and not args.cpu_smoke:
      for bq, bkv in ((128, 128), (256, 256), (512, 512), (512, 1024)):
        variants[f"splash_{bq}x{bkv}"] = splash.SplashBlocks(bq, bkv, min(bkv, 512))
    base = {}
    for name, blocks in variants.items():
      if blocks is None:
        fn = lambda q, k, v: attention.xla_attention(q, k, v, mask=mask)
      else:
        fn = functools.partial(splash.splash_attention, mask=mask, blocks=blocks)
      fwd = lambda x, k, fn=fn: fn(x, k, k)
      bwd = lambda x, k, fn=fn: jax.grad(
          lambda q: jnp.sum(fn(q, k, k).astype(jnp.float32)))(x).astype(x.dtype)
      for mode, step, flops in (("fwd", fwd, flops_fwd), ("fwd+bwd", bwd, 3.5 * flops_fwd)):
        t = timed(step, q, k, n=args.n, reps=args.reps)
        base.setdefault(mode, {})[name] = t
        record = {"section": "train", "2L": two_l, "rows": rows, "impl": name, "mode": mode,
                  "ms": t * 1e3, "tflops": flops / t / 1e12,
                  "speedup_vs_xla": base[mode]["xla"] / t if "xla" in base[mode] else None}
        if blocks is not None:
          kernel = splash.splash_kernel(mask, two_l, two_l, hq, hkv, blocks, d)
          tp = -(-two_l // blocks.block_q) * blocks.block_q
          sp = -(-two_l // blocks.block_kv) * blocks.block_kv
          stats = splash.skip_stats(kernel, tp, sp)
          record.update(blocks=[blocks.block_q, blocks.block_kv],
                        skipped=round(stats.skipped_fraction, 4))
        emit(record)


@guarded
def decode(args):
  caches = [512] if args.cpu_smoke else ([16384] if args.quick else
                                               [1024, 4096, 16384, 32768])
  hq, hkv, d, w = (4, 2, 128, 32) if args.cpu_smoke else (12, 2, 128, 32)
  rng = np.random.default_rng(0)
  for smax in caches:
    for batch in ((1, 2) if args.cpu_smoke else (1, 8)):
      k = jnp.asarray(rng.standard_normal((batch, smax, hkv, d)), jnp.bfloat16)
      q = jnp.asarray(rng.standard_normal((batch, w, hq, d)), jnp.bfloat16)
      for fill in ("full", "ragged"):
        frac = np.ones(batch) if fill == "full" else (np.arange(batch) + 1) / batch
        lengths = jnp.asarray(np.maximum(w, (frac * smax).astype(np.int32) // 32 * 32),
                              jnp.int32)
        offsets = lengths - w
        held_bytes = 2 * int(lengths.sum()) * hkv * d * 2
        times = {}
        for impl in ("xla", "pallas"):
          step = lambda x, k, offsets, lengths, impl=impl: splash.window_attention(
              x, k, k, mask=masks.Full(), q_offset_B=offsets, kv_lengths_B=lengths,
              window_impl=impl)
          times[impl] = timed(step, q, k, offsets, lengths, n=args.n, reps=args.reps)
          emit({"section": "decode", "Smax": smax, "batch": batch, "fill": fill, "impl": impl,
                "us": times[impl] * 1e6, "gbps_of_held_kv": held_bytes / times[impl] / 1e9,
                "speedup_vs_xla": times["xla"] / times[impl]})


def main(argv=None):
  global OUT
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="one length / cache size")
  parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, interpret mode")
  parser.add_argument("--n", type=int, default=None, help="chained calls per program")
  parser.add_argument("--reps", type=int, default=None)
  parser.add_argument("--out", default=None, help="append the JSON lines to this file too")
  args = parser.parse_args(argv)
  OUT = args.out
  args.n = args.n or (1 if args.cpu_smoke else 10)
  args.reps = args.reps or (1 if args.cpu_smoke else 5)
  if jax.default_backend() != "tpu" and not args.cpu_smoke:
    print("no TPU backend: run with --cpu-smoke (interpret mode) or on a TPU VM",
          file=sys.stderr)
    return 2
  emit({"section": "device", "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind), "count": jax.device_count(),
        "jax": jax.__version__})
  for section in (ceilings, check, train, decode):
    section(args)
  return 1 if FAILED else 0


if __name__ == "__main__":
  sys.exit(main())
