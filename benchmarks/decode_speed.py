"""Decoding speed of the engine on random models: one JSON line per measurement, one process.

    python benchmarks/decode_speed.py                       # CPU: presets tiny and 100m
    python benchmarks/decode_speed.py --preset qwen1.5b     # accelerator: Qwen2.5-1.5B shapes, bf16

For each preset, on the same random model and the same prompts:
  * ``forward``: device time of one model forward (a jitted loop of forwards, no host in the
    loop) for a 32-token window, an 8-token sub-block (DualCache) and a 1-token AR step, all
    against the same cache; their ratios; and the weight-bytes / bandwidth floor when the
    bandwidth is known (``--bandwidth_gbs``, or guessed from the device name).
  * ``generate``: tokens/s, forwards, tokens per forward, seconds per forward and the engine's
    overhead per forward (seconds per forward / the matching bare forward time) at thresholds
    1.0 and 0.9, with and without DualCache; host syncs per generated token.
  * ``generate_ar``: the same for the AR baseline, and the ratio generate / AR tokens/s.
Random weights are rarely confident, so threshold 0.9 gives about one token per forward here:
the figure to watch is the overhead per forward, not the speedup (that needs a trained model).
``ms_per_forward`` divides a whole call (prefill included, counted as one forward) by the
forwards, so the overhead figures include the prefill's share (small for long generations).

On an accelerator, ``--preset qwen1.5b`` compiles about eight executables of a 28-layer model
(three timing loops, AR prefill/decode, diffusion prefill/decode with and without DualCache).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PRESETS = {
    # ~0.3M parameters: engine overhead dominates.
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 tie_word_embeddings=True, dtype="float32"),
    # ~100M parameters (GQA 6:1 like Qwen2.5).
    "100m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2304, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=2, head_dim=64,
                 tie_word_embeddings=True, dtype="float32"),
    # Qwen2.5-1.5B shapes (1.54B parameters), bfloat16: for an accelerator.
    "qwen1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                     num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                     head_dim=128, tie_word_embeddings=True, dtype="bfloat16"),
}
# Peak HBM bandwidth (GB/s) by device-kind substring, for the weight-read floor.
BANDWIDTH_GBS = {"H200": 4800, "H100": 3350, "A100": 2039, "L40S": 864, "A10G": 600,
                 "TPU v5 lite": 819, "TPU v5": 2765, "TPU v4": 1200}


def emit(record):
  print(json.dumps(record), flush=True)


def build_model(preset: str, seed: int = 0, dtype_name: str | None = None):
  import jax.numpy as jnp
  from flax import nnx

  from fdllm_jax.config import ModelConfig
  from fdllm_jax.model import Transformer

  fields = dict(PRESETS[preset])
  preset_dtype = fields.pop("dtype")
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype_name or preset_dtype]
  config = ModelConfig(rope_theta=1e6, max_position_embeddings=32768, **fields)
  return Transformer(config, dtype=dtype, rngs=nnx.Rngs(seed)), config, dtype


def weight_bytes(model) -> int:
  import jax
  from flax import nnx
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def forward_timer(model, config, dtype, *, batch, cache_len, start, num_tokens, head_positions,
                  iters, attention_impl=None):
  """A function returning the seconds per forward of ``num_tokens`` tokens written at ``start``
  (Full mask, keys < start + 32) with the LM head on ``head_positions`` positions, as the
  engine does; measured as a jitted loop of ``iters`` forwards on the device (best of 3)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from fdllm_jax import masks
  from fdllm_jax.cache import KVCache

  graphdef, params = nnx.split(model)

  @functools.partial(jax.jit, donate_argnums=(1,))
  def loop(params, cache, tokens, start):
    model = nnx.merge(graphdef, params)

    def body(i, carry):
      cache, acc = carry
      # The same slots every time, as denoising steps do; start is traced, as in the engine.
      hidden, cache = model(tokens, mask=masks.Full(), cache=cache, write_start=start,
                            kv_lengths=jnp.full((batch,), start + 32, jnp.int32),
                            return_hidden=True, attention_impl=attention_impl)
      logits = model.logits(hidden[:, :head_positions])
      return cache, acc + jnp.max(logits[:, :, :8]).astype(jnp.float32)

    return jax.lax.fori_loop(0, iters, body, (cache, jnp.float32(0)))

  tokens = jnp.ones((batch, num_tokens), jnp.int32)
  state = {"cache": KVCache.init(config, batch, cache_len, dtype)}

  def measure():
    best = float("inf")
    for _ in range(3):
      t0 = time.perf_counter()
      state["cache"], acc = loop(params, state["cache"], tokens, jnp.int32(start))
      acc.block_until_ready()
      best = min(best, (time.perf_counter() - t0) / iters)
    return best

  measure()  # compile + warm up
  return measure


def run_preset(args, preset: str):
  import importlib

  import jax
  import numpy as np

  bucket = importlib.import_module("fdllm_jax.generate").bucket
  model, config, dtype = build_model(preset, dtype_name=args.dtype)
  device = jax.devices()[0]
  kind = getattr(device, "device_kind", str(device))
  wbytes = weight_bytes(model)
  bandwidth = args.bandwidth_gbs or next(
      (bw for name, bw in BANDWIDTH_GBS.items() if name.lower() in kind.lower()), None)
  batch, prompt_len, new = args.batch, args.prompt_len, args.max_new_tokens
  cache_len = bucket(prompt_len + new, 32)  # the engine's cache length
  start = prompt_len // 32 * 32
  common = dict(preset=preset, device=kind, backend=jax.default_backend(),
                params=config.num_params, dtype=str(np.dtype(dtype)), batch=batch,
                attention_impl=args.attention_impl or "default",
                prompt_len=prompt_len, max_new_tokens=new)

  # (tokens, LM-head positions) of a window step (its sub-block + the commit token), a
  # DualCache sub-block step and an AR step.
  shapes = {32: 9, 8: 8, 1: 1}
  timers = {n: forward_timer(model, config, dtype, batch=batch, cache_len=cache_len,
                             start=start, num_tokens=n, head_positions=h,
                             iters=args.forward_iters, attention_impl=args.attention_impl)
            for n, h in shapes.items()}
  forward = {n: timer() for n, timer in timers.items()}
  emit_forward(common, forward, wbytes, bandwidth, note="before generation")

  def emit_generate(record):  # printed as soon as measured: a killed run keeps what it had
    per_forward = record["ms_per_forward"] / 1e3
    if record["measure"] == "generate_ar":
      record["overhead_vs_ar_step"] = per_forward / forward[1]
    else:
      # Without DualCache every forward is a window step, so overhead_vs_window32 is the
      # engine's cost per forward; with it most forwards are sub-blocks (between the two).
      record["overhead_vs_window32"] = per_forward / forward[32]
      record["overhead_vs_sub_block8"] = per_forward / forward[8]
    emit(dict(common, **record))

  measure_generate(args, model, config, prompts_for(config, args), emit_generate)
  # Bare forwards timed again after generation: the best of both (noisy shared machines).
  forward = {n: min(forward[n], timer()) for n, timer in timers.items()}
  emit_forward(common, forward, wbytes, bandwidth, note="best of before and after generation")


def emit_forward(common, forward, wbytes, bandwidth, note):
  record = dict(common, measure="forward", note=note, window32_ms=forward[32] * 1e3,
                sub_block8_ms=forward[8] * 1e3, ar_step_ms=forward[1] * 1e3,
                window32_over_ar=forward[32] / forward[1],
                sub_block8_over_ar=forward[8] / forward[1], weight_bytes=wbytes)
  if bandwidth:
    floor = wbytes / (bandwidth * 1e9)
    record.update(bandwidth_gbs=bandwidth, weight_floor_ms=floor * 1e3,
                  window32_over_floor=forward[32] / floor, ar_step_over_floor=forward[1] / floor)
  emit(record)


def prompts_for(config, args):
  import numpy as np
  rng = np.random.RandomState(0)
  return [rng.randint(0, config.vocab_size - 1, args.prompt_len).tolist()
          for _ in range(args.batch)]


def measure_generate(args, model, config, prompts, on_record):
  import fdllm_jax

  new = args.max_new_tokens
  mask_id = config.vocab_size - 1

  def best_of(fn):
    first = fn()  # compiles (and warms up)
    best = min((fn() for _ in range(args.repeats)), key=lambda o: o.seconds)
    return best, first.compile_seconds

  ar, compile_s = best_of(
      lambda: fdllm_jax.generate_ar(model, prompts, max_new_tokens=new, stop_ids=(),
                                    attention_impl=args.attention_impl))
  ar_tps = ar.tokens_per_second
  on_record(dict(measure="generate_ar", tokens_per_s=ar_tps, tokens=ar.num_tokens,
                      forwards=ar.num_forwards,
                      ms_per_forward=ar.seconds / ar.num_forwards * 1e3,
                      host_syncs_per_token=ar.host_syncs / ar.num_tokens, compile_s=compile_s))
  for dual in (False, True):
    for threshold in (1.0, 0.9):
      config_d = fdllm_jax.DecodeConfig(threshold=threshold, max_new_tokens=new, mask_id=mask_id,
                                        stop_ids=(), use_dual_cache=dual)
      out, compile_s = best_of(lambda: fdllm_jax.generate(
          model, prompts, config_d, attention_impl=args.attention_impl))
      on_record(dict(measure="generate", threshold=threshold, dual_cache=dual,
                          tokens_per_s=out.tokens_per_second, tokens=out.num_tokens,
                          forwards=out.num_forwards, tokens_per_forward=out.tokens_per_forward,
                          tokens_per_row_forward=out.tokens_per_row_forward,
                          ms_per_forward=out.seconds / out.num_forwards * 1e3,
                          vs_ar_tokens_per_s=out.tokens_per_second / ar_tps,
                          host_syncs_per_token=out.host_syncs / out.num_tokens,
                          compile_s=compile_s))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", action="append", choices=sorted(PRESETS),
                 help="model preset; repeatable (default: tiny and 100m)")
  p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                 help="parameter dtype (default: the preset's)")
  p.add_argument("--attention_impl", default=None,
                 help="attention implementation (fdllm_jax.attention; default: its default)")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--prompt_len", type=int, default=100)
  p.add_argument("--max_new_tokens", type=int, default=128)
  p.add_argument("--repeats", type=int, default=2, help="timed repeats (best is kept)")
  p.add_argument("--forward_iters", type=int, default=20)
  p.add_argument("--bandwidth_gbs", type=float, default=None,
                 help="HBM bandwidth for the weight-read floor (default: from the device name)")
  args = p.parse_args(argv)
  for preset in args.preset or ["tiny", "100m"]:
    run_preset(args, preset)


if __name__ == "__main__":
  main()
