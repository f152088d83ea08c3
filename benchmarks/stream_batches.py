"""Fixed batches against streamed rows: many prompts decoded B rows at a time.

    python benchmarks/stream_batches.py                           # the bundled adapted model
    python benchmarks/stream_batches.py --batch_size 8 --dual_cache --rounds 3
    python benchmarks/stream_batches.py --engine ar               # the AR base, generate_ar

Decodes held-out problems of the demo task two ways, in one process, alternating round by
round (a shared machine drifts): in fixed batches of ``--batch_size`` consecutive prompts (one
``generate`` / ``generate_ar`` call each: a batch lasts as long as its slowest row) and
streamed (``max_batch_size=B`` over all prompts: a row that ends takes the next prompt).
Prints one JSON line per round (forwards, tokens/s, host round trips of each way, the ratio
of tokens/s, and how many prompts got other tokens streamed: 0 unless float rounding flips a
near-tie, since a streamed prompt's K/V come from other forwards than the batch's prefill) and
a summary line with the median ratio. Compilation happens in a warm-up call before the timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
  from fdllm_jax import demo
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--engine", default="dllm", choices=("dllm", "ar"),
                 help="dllm: generate (the adapted model); ar: generate_ar (the AR base)")
  p.add_argument("--model", help="checkpoint directory (default: the bundled model of the "
                                 "engine)")
  p.add_argument("--num_problems", type=int, default=200)
  p.add_argument("--seed", type=int, default=0, help="seed of the test split's problems")
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--threshold", type=float, default=0.9)
  p.add_argument("--sub_block_size", type=int, default=8)
  p.add_argument("--max_new_tokens", type=int, default=128)
  p.add_argument("--dual_cache", action="store_true")
  p.add_argument("--rounds", type=int, default=2)
  args = p.parse_args(argv)
  for name in ("num_problems", "batch_size", "rounds"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be >= 1; got {getattr(args, name)}")
  if args.engine == "ar" and args.dual_cache:
    p.error("--dual_cache applies to --engine dllm")
  args.model = args.model or (demo.FAST_DLLM_DIR if args.engine == "dllm" else demo.AR_BASE_DIR)
  return args


def fixed_batches(generate, prompts, batch_size: int) -> dict:
  """One ``generate`` call per batch of consecutive prompts."""
  tokens, forwards, seconds, syncs = [], 0, 0.0, 0
  for start in range(0, len(prompts), batch_size):
    out = generate(prompts[start:start + batch_size])
    tokens += out.tokens
    forwards, seconds, syncs = (forwards + out.num_forwards, seconds + out.seconds,
                                syncs + out.host_syncs)
  return {"tokens": tokens, "forwards": forwards, "seconds": seconds, "host_syncs": syncs}


def streamed(generate, prompts, batch_size: int) -> dict:
  """One ``generate`` call over every prompt, ``batch_size`` rows at a time."""
  out = generate(prompts, max_batch_size=batch_size)
  return {"tokens": out.tokens, "forwards": out.num_forwards, "seconds": out.seconds,
          "host_syncs": out.host_syncs}


def main(argv=None) -> dict:
  args = parse_args(argv)
  from fdllm_jax import load_model, load_tokenizer
  from fdllm_jax.demo import task
  from fdllm_jax.generate import DecodeConfig, generate, generate_ar

  model = load_model(args.model)
  tokenizer = load_tokenizer(args.model)
  stop_id = tokenizer.hf.convert_tokens_to_ids("<|im_end|>")
  config = DecodeConfig(block_size=model.config.bd_size or 32, sub_block_size=args.sub_block_size,
                        threshold=args.threshold, max_new_tokens=args.max_new_tokens,
                        mask_id=tokenizer.mask_id, stop_ids=(stop_id,),
                        use_dual_cache=args.dual_cache)
  problems = task.generate("test", args.num_problems, args.seed)
  prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p.prompt}])
             for p in problems]
  if args.engine == "dllm":
    run = lambda batch, **kw: generate(model, batch, config, **kw)  # noqa: E731
  else:
    run = lambda batch, **kw: generate_ar(  # noqa: E731
        model, batch, max_new_tokens=args.max_new_tokens, stop_ids=(stop_id,), **kw)
  warm = prompts[:2 * args.batch_size]
  run(warm[:args.batch_size])
  run(warm, max_batch_size=args.batch_size)

  rounds = []
  for index in range(args.rounds):
    fixed = fixed_batches(run, prompts, args.batch_size)
    stream = streamed(run, prompts, args.batch_size)
    num_tokens = sum(len(t) for t in fixed["tokens"])
    differing = sum(a != b for a, b in zip(stream["tokens"], fixed["tokens"]))
    row = {"round": index, "engine": args.engine, "batch_size": args.batch_size,
           "num_problems": len(prompts),
           "threshold": args.threshold if args.engine == "dllm" else None,
           "dual_cache": args.dual_cache, "tokens": num_tokens, "differing_prompts": differing}
    for name, result in (("fixed", fixed), ("streamed", stream)):
      row.update({f"{name}_forwards": result["forwards"],
                  f"{name}_tokens_per_s": num_tokens / result["seconds"],
                  f"{name}_host_syncs": result["host_syncs"]})
    row["speedup"] = row["streamed_tokens_per_s"] / row["fixed_tokens_per_s"]
    rounds.append(row)
    print(json.dumps(row), flush=True)
  accuracy = sum(task.is_correct(tokenizer.decode(ids), p.answer)
                 for ids, p in zip(fixed["tokens"], problems)) / len(problems)
  summary = {"accuracy": accuracy, "median_speedup": statistics.median(
      r["speedup"] for r in rounds), "forwards_ratio": rounds[0]["fixed_forwards"] /
      rounds[0]["streamed_forwards"]}
  print(json.dumps({"summary": summary}), flush=True)
  return {"rounds": rounds, "summary": summary}


if __name__ == "__main__":
  main()
