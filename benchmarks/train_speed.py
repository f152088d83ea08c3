"""Training throughput and model FLOPs utilisation of a gin config, objectives side by side.

    python benchmarks/train_speed.py --gin_file configs/tiny_cpu.gin
    python benchmarks/train_speed.py --gin_file configs/demo_adapt.gin --model_config \
        models/demo/fast_dllm/config.json --objectives block_diffusion,block_diffusion_shared
    python benchmarks/train_speed.py --gin_file configs/fast_dllm_v2_1.5b.gin \\
        --model qwen2.5-1.5b --gin_param 'TrainConfig.mesh_shape = (-1, 1, 1)' \\
        --gin_param 'TrainConfig.global_batch_size = 4' \\
        --gin_param 'TrainConfig.grad_accum_steps = 1'

Runs the real jitted train step of ``fdllm_jax.training.trainer`` (sharding, optimizer, remat,
dtypes from the gin config) on random token batches with random initial weights, so neither
data nor a checkpoint download is needed. The model is the config's ``model_config`` for
``init="scratch"``, else ``--model`` (public Qwen2.5 shapes) or ``--model_config`` (a
config.json). Each objective in ``--objectives`` is timed in this process; one JSON line is
printed per measurement, then one with the ratios between them. ``--rounds N`` times the list
N times in alternation (A, B, A, B, ...) so that a slow spell of a shared machine hits both;
the ratios then use each objective's median step time. ``block_diffusion_shared`` is
block diffusion with ``TrainConfig.share_clean_stream`` (x_t^A ++ x_t^B ++ x_0, one row of 3L
per sample): the same loss from less work. ``--attention_impls xla,xla_blocks`` times every
objective with each attention implementation in turn (records named ``objective@impl``):

    python benchmarks/train_speed.py --gin_file configs/demo_adapt.gin --model_config \
        models/demo/fast_dllm/config.json --objectives block_diffusion_shared \
        --attention_impls xla_blocks,xla --rounds 3

Model FLOPs per optimizer step (the MFU numerator; remat's extra forward is not counted):

    P      = non-embedding matmul parameters (q, k, v, o, gate, up, down of every layer)
    flops  = 6 * P * S_trunk + 12 * n_layers * n_heads * head_dim * T * S_trunk   (trunk)
           + 6 * hidden * vocab * S_head                                          (LM head)

with, for N sequences of L tokens per step,
    block_diffusion: S_trunk = 2 views x N x 2L tokens, T = 2L, S_head = 2N x L (x_t half only)
    ..._shared:      S_trunk = N x 3L tokens,           T = 3L, S_head = 2N x L
    autoregressive:  S_trunk = N x L,                    T = L,  S_head = N x L
and attention counted dense (every query against all T keys, as the ``xla`` reference
computes; the block kernels and ``xla_blocks`` skip what the mask hides).
MFU = flops / step_time / (devices x peak FLOP/s); the peak is looked up from the device kind
for the compute dtype (bf16, or TF32 for float32 on GPUs) or given with ``--peak_tflops``;
it is null where unknown (CPU). ``tokens_per_s`` counts input tokens (N x L per step), the
unit of the paper's token budgets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Public Qwen2.5 shapes (config.json of the Instruct checkpoints).
PRESETS = {
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         head_dim=64, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         head_dim=128, tie_word_embeddings=True),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       head_dim=128, tie_word_embeddings=False),
}

# Dense peak FLOP/s per device: (bfloat16, float32 matmuls as executed by default).
PEAK_FLOPS = (
    ("H200", 989e12, 494e12),
    ("H100", 989e12, 494e12),  # SXM; float32 matmuls run as TF32 on GPUs by default
    ("A100", 312e12, 156e12),
    ("L4", 121e12, 60e12),
    ("TPU v5 lite", 197e12, 197e12),
    ("TPU v5", 459e12, 459e12),
    ("TPU v4", 275e12, 275e12),
)


OBJECTIVES = ("block_diffusion", "block_diffusion_shared", "autoregressive")


def model_flops_per_step(model_config, objective: str, num_rows: int, seq_len: int) -> float:
  c = model_config
  d, h, kv, hd = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
  matmul_params = c.num_hidden_layers * (d * h * hd + 2 * d * kv * hd + h * hd * d
                                         + 3 * d * c.intermediate_size)
  if objective == "block_diffusion":
    trunk_tokens = 2 * num_rows * 2 * seq_len
    attn_len, head_tokens = 2 * seq_len, 2 * num_rows * seq_len
  elif objective == "block_diffusion_shared":
    trunk_tokens = num_rows * 3 * seq_len
    attn_len, head_tokens = 3 * seq_len, 2 * num_rows * seq_len
  else:
    trunk_tokens, attn_len, head_tokens = num_rows * seq_len, seq_len, num_rows * seq_len
  return (6 * matmul_params * trunk_tokens
          + 12 * c.num_hidden_layers * h * hd * attn_len * trunk_tokens
          + 6 * d * c.vocab_size * head_tokens)


def peak_flops(device, compute_dtype: str):
  kind = getattr(device, "device_kind", "")
  for name, bf16, f32 in PEAK_FLOPS:
    if name.lower() in kind.lower():
      return bf16 if compute_dtype == "bfloat16" else f32
  return None


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gin_file", action="append", required=True)
  parser.add_argument("--gin_param", action="append", default=[])
  parser.add_argument("--model", choices=sorted(PRESETS), default=None,
                      help="model shapes when the config initialises from a checkpoint")
  parser.add_argument("--model_config", default=None, help="an HF config.json instead")
  parser.add_argument("--num_layers", type=int, default=None,
                      help="override num_hidden_layers (smoke tests, per-layer scaling)")
  parser.add_argument("--objectives", default="block_diffusion,autoregressive")
  parser.add_argument("--attention_impls", default=None,
                      help="comma-separated attention implementations to time each objective "
                           "with (default: the config's attention_impl)")
  parser.add_argument("--steps", type=int, default=5, help="timed steps per objective")
  parser.add_argument("--rounds", type=int, default=1,
                      help="time the objectives this many times, alternating; ratios of medians")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps (compile) first")
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="per-device peak for the MFU (default: looked up)")
  args = parser.parse_args(argv)
  objectives = args.objectives.split(",")
  for objective in objectives:
    if objective not in OBJECTIVES:
      parser.error(f"--objectives: {objective!r} is unknown; use names from {OBJECTIVES}")
  if len(set(objectives)) != len(objectives):
    parser.error(f"--objectives {args.objectives!r} names one twice; use --rounds to repeat")
  if args.rounds < 1:
    parser.error(f"--rounds must be >= 1, got {args.rounds}")
  from fdllm_jax.attention import IMPLEMENTATIONS, default_implementation
  impls = args.attention_impls.split(",") if args.attention_impls else [None]
  for impl in impls:
    if impl is not None and impl not in IMPLEMENTATIONS:
      parser.error(f"--attention_impls: {impl!r} is unknown; use names from {IMPLEMENTATIONS}")
  if len(set(impls)) != len(impls):
    parser.error(f"--attention_impls {args.attention_impls!r} names one twice")
  runs_list = [(objective, impl) for objective in objectives for impl in impls]
  run_name = lambda objective, impl: objective if impl is None else f"{objective}@{impl}"

  import dataclasses
  import statistics

  import gin
  import jax
  import numpy as np

  from fdllm_jax import sharding
  from fdllm_jax.config import ModelConfig
  from fdllm_jax.training import trainer as trainer_lib

  gin.parse_config_files_and_bindings(args.gin_file, args.gin_param)
  base = trainer_lib.TrainConfig()
  if args.model_config:
    model_config = ModelConfig.from_json_file(args.model_config)
  elif args.model:
    model_config = ModelConfig(**PRESETS[args.model])
  elif base.init == "scratch":
    fields = dict(base.model)
    if "vocab_size" not in fields:
      from fdllm_jax.tokenizer import load_tokenizer
      fields["vocab_size"] = trainer_lib._round_up(load_tokenizer(base.tokenizer).vocab_size,
                                                   base.vocab_multiple)
    model_config = ModelConfig(**fields)
  else:
    parser.error("the config initialises from a checkpoint: pass --model or --model_config")
  if args.num_layers:
    model_config = dataclasses.replace(model_config, num_hidden_layers=args.num_layers)
  mesh = sharding.make_mesh(base.mesh_shape)
  devices = jax.devices()
  peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(devices[0],
                                                                     base.compute_dtype)
  rng = np.random.default_rng(0)
  shape = (base.global_batch_size, base.seq_len)
  ids = rng.integers(0, model_config.vocab_size - 1, shape).astype(np.int32)
  labels = ids.copy()
  labels[:, : base.seq_len // 4] = -100  # a prompt quarter without loss
  runs = {run_name(*run): [] for run in runs_list}
  for objective, impl in runs_list * args.rounds:
    config = dataclasses.replace(
        base, objective=objective.removesuffix("_shared"), export=False,
        share_clean_stream=objective == "block_diffusion_shared",
        attention_impl=impl if impl is not None else base.attention_impl)
    program = trainer_lib.TrainProgram(config, model_config, mesh,
                                       mask_id=model_config.vocab_size - 1)
    rows = sharding.process_rows(program.batch_sharding, shape)
    batch = [sharding.global_array(x[rows], rows, program.batch_sharding, shape)
             for x in (ids, labels)]
    state = program.init_state()
    params, opt_state = state["params"], state["opt_state"]
    compile_start = time.perf_counter()
    for step in range(args.warmup):
      params, opt_state, metrics = program.train_step(params, opt_state, *batch, np.int32(step))
    jax.block_until_ready(metrics)
    warmup_s = time.perf_counter() - compile_start
    start = time.perf_counter()
    for step in range(args.steps):
      params, opt_state, metrics = program.train_step(params, opt_state, *batch,
                                                      np.int32(args.warmup + step))
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / args.steps
    flops = model_flops_per_step(model_config, objective, *shape)
    record = {
        "benchmark": "train_speed", "objective": objective, "device": devices[0].device_kind,
        "num_devices": len(devices), "mesh": dict(mesh.shape), "params": model_config.num_params,
        "global_batch_size": shape[0], "seq_len": shape[1],
        "grad_accum_steps": config.grad_accum_steps, "compute_dtype": config.compute_dtype,
        "remat": config.remat, "attention_impl": config.attention_impl or default_implementation(),
        "step_s": step_s, "tokens_per_s": shape[0] * shape[1] / step_s,
        "model_tflops_per_step": flops / 1e12,
        "model_tflops_per_s_per_device": flops / step_s / len(devices) / 1e12,
        "mfu": flops / step_s / (len(devices) * peak) if peak else None,
        "warmup_s": warmup_s, "loss": float(metrics["loss"]),
    }
    runs[run_name(objective, impl)].append(record)
    print(json.dumps(record), flush=True)
    del params, opt_state, state, batch
  median_step_s = {name: statistics.median(r["step_s"] for r in records)
                   for name, records in runs.items()}
  first, *others = runs
  for other in others:
    # tokens per step are the same for every run, so tokens/s is the inverse ratio
    print(json.dumps({"benchmark": "train_speed", "ratio": f"{first}/{other}",
                      "rounds": args.rounds,
                      "tokens_per_s": median_step_s[other] / median_step_s[first],
                      "step_s": median_step_s[first] / median_step_s[other],
                      "model_flops_per_step": runs[first][0]["model_tflops_per_step"] /
                      runs[other][0]["model_tflops_per_step"]}), flush=True)


if __name__ == "__main__":
  main()
