"""Peak host memory of ``load_model`` on a random ~0.5B-parameter checkpoint.

Writes a checkpoint with Qwen2.5-0.5B shapes (random values, one tensor in memory at a time),
then loads it in a fresh subprocess and reports that process's peak RSS as a ratio to the
checkpoint's size on disk. One JSON line per measurement.

  python benchmarks/load_memory.py [--dtype bfloat16|float32] [--dir /tmp/fdllm_load_bench]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                  num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  head_dim=64, tie_word_embeddings=True, rope_theta=1e6)


def write_random_checkpoint(directory: str, dtype: str, shard_bytes: int) -> int:
  """Writes config.json + sharded safetensors; returns the bytes of tensor files."""
  import ml_dtypes
  from flax import nnx

  from fdllm_jax import checkpoints
  from fdllm_jax.config import ModelConfig

  config = ModelConfig(**QWEN25_05B)
  np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)
  abstract = checkpoints.abstract_model(config, np_dtype)
  entries = []
  for i, (path, leaf) in enumerate(nnx.to_flat_state(nnx.split(abstract)[1])):
    name, transpose = checkpoints.path_to_hf(tuple(path))
    shape = tuple(leaf.get_value().shape)
    shape = tuple(reversed(shape)) if transpose else shape
    fetch = (lambda s=shape, seed=i:
             np.random.default_rng(seed).standard_normal(s, np.float32).astype(np_dtype) * 0.02)
    entries.append(checkpoints.TensorEntry(name, shape, np_dtype, fetch))
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config.to_hf_dict(), f)
  shards = checkpoints._split_shards(entries, shard_bytes)
  weight_map = {}
  for k, shard in enumerate(shards):
    file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    checkpoints.write_safetensors(os.path.join(directory, file), shard)
    weight_map.update({e.name: file for e in shard})
  with open(os.path.join(directory, checkpoints.SAFETENSORS_INDEX), "w") as f:
    json.dump({"weight_map": weight_map}, f)
  return sum(os.path.getsize(os.path.join(directory, f)) for f in set(weight_map.values()))


_CHILD = r"""
import json, resource, sys, time
import jax, numpy as np
import fdllm_jax
jax.numpy.zeros(1).block_until_ready()          # runtime up before the baseline reading
def rss_mib():
  with open("/proc/self/status") as f:
    return {l.split(":")[0]: int(l.split()[1]) / 1024 for l in f if l.startswith(("VmRSS", "VmHWM"))}
base = rss_mib()["VmRSS"]
start = time.perf_counter()
model = fdllm_jax.load_model(sys.argv[1], dtype=sys.argv[2])
jax.block_until_ready(jax.tree.leaves(__import__("flax").nnx.state(model)))
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"baseline_rss_mib": base, "peak_rss_mib": peak, "load_seconds": seconds,
                  "params": model.config.num_params}))
"""


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--dir", default="/tmp/fdllm_load_bench")
  parser.add_argument("--shard_mib", type=int, default=400)
  parser.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
  args = parser.parse_args()
  directory = os.path.join(args.dir, args.dtype)
  disk_bytes = write_random_checkpoint(directory, args.dtype, args.shard_mib << 20)
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  out = subprocess.run([sys.executable, "-c", _CHILD, directory, args.dtype], env=env,
                       check=True, capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  child = json.loads(out.stdout.strip().splitlines()[-1])
  disk_mib = disk_bytes / 2**20
  print(json.dumps({
      "benchmark": "load_memory", "dtype": args.dtype, "params": child["params"],
      "checkpoint_mib": round(disk_mib, 1),
      "baseline_rss_mib": round(child["baseline_rss_mib"], 1),
      "peak_rss_mib": round(child["peak_rss_mib"], 1),
      "peak_rss_over_checkpoint": round(child["peak_rss_mib"] / disk_mib, 3),
      "peak_minus_baseline_over_checkpoint":
          round((child["peak_rss_mib"] - child["baseline_rss_mib"]) / disk_mib, 3),
      "load_seconds": round(child["load_seconds"], 2),
  }))
  if not args.keep:
    import shutil
    shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
  main()
