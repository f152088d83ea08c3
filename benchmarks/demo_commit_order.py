"""Where the demo's forwards go: how many each sub-block takes, and which tokens come last.

    python benchmarks/demo_commit_order.py                        # the bundled adapted model
    python benchmarks/demo_commit_order.py --model workdirs/x/export --threshold 0.95

Decodes held-out problems of the demo task with ``generate`` (greedy, block 32, sub-block 8 by
default) and reads, from ``step_of_token``, the forward that fixed each generated token. Inside a
sub-block every forward fixes at least one token (the most confident MASK), so the distinct
steps of a sub-block's tokens are the forwards it took; a token's rank is the position of its
step among them (1: fixed by the sub-block's first forward). The first token of each block is
left out: the previous block's commit forward predicts it (so is the first token after a prompt
that ends on a block boundary). Tokens after the stop id are not generated tokens: a forward
that fixed only such tokens is not counted.

Reports, as JSON on stdout (and in ``--out``): accuracy, tokens per row forward (as
``demo_speed_accuracy.py`` counts them), a histogram of forwards per sub-block,
the mean number of tokens the first forward of a sub-block fixes, and per token kind (a number,
an operator, ``=``, anything else) the share fixed by the 1st, 2nd, 3rd and a later forward. A
sub-block of 8 at 3 tokens per forward needs under 3 forwards; this shows which tokens keep
it from that.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RANKS = ("1", "2", "3", "4+")


def parse_args(argv=None):
  from fdllm_jax import demo
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default=demo.FAST_DLLM_DIR, help="adapted checkpoint directory")
  p.add_argument("--threshold", type=float, default=0.9)
  p.add_argument("--num_problems", type=int, default=200)
  p.add_argument("--seed", type=int, default=0, help="seed of the test split's problems")
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--sub_block_size", type=int, default=8)
  p.add_argument("--dual_cache", action="store_true")
  p.add_argument("--out", default=None, help="also write the JSON report here")
  args = p.parse_args(argv)
  for name in ("num_problems", "batch_size", "sub_block_size"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be at least 1; got {getattr(args, name)}")
  return args


def token_kind(piece: str) -> str:
  text = piece.strip()
  if text.isdigit():
    return "number"
  if text == "=":
    return "="
  return "operator" if text in ("+", "-", "*", "/") else "other"


def sub_block_ranks(steps, prompt_len: int, block_size: int, sub_block_size: int):
  """Per sub-block touched by the generated tokens: the rank (1-based) of each token's forward
  among the sub-block's forwards, as a list of (token index, rank); blocks' first tokens are
  left out. ``steps[j]`` is the forward that fixed generated token j (``step_of_token``)."""
  members = collections.defaultdict(list)
  for j, step in enumerate(steps):
    position = prompt_len + j
    if position % block_size:
      members[position // sub_block_size].append((j, step))
  ranked = []
  for _, tokens in sorted(members.items()):
    order = sorted({step for _, step in tokens})
    ranked.append([(j, order.index(step) + 1) for j, step in tokens])
  return ranked


def summarize(ranked_sub_blocks, kinds) -> dict:
  """``ranked_sub_blocks``: one list of (token key, rank) pairs per sub-block; ``kinds[key]``:
  that token's kind (``token_kind``)."""
  forwards = collections.Counter()
  first = []
  by_kind = collections.defaultdict(collections.Counter)
  for tokens in ranked_sub_blocks:
    forwards[max(rank for _, rank in tokens)] += 1
    first.append(sum(rank == 1 for _, rank in tokens))
    for key, rank in tokens:
      by_kind[kinds[key]][RANKS[min(rank, 4) - 1]] += 1
  total_sub_blocks = sum(forwards.values())
  return {
      "sub_blocks": total_sub_blocks,
      "forwards_per_sub_block": {str(k): forwards[k] for k in sorted(forwards)},
      "mean_forwards_per_sub_block": (sum(k * v for k, v in forwards.items()) /
                                      max(total_sub_blocks, 1)),
      "mean_fixed_by_first_forward": sum(first) / max(len(first), 1),
      "share_by_forward": {
          kind: {"tokens": sum(c.values()),
                 **{rank: c[rank] / sum(c.values()) for rank in RANKS}}
          for kind, c in sorted(by_kind.items())},
  }


def main(argv=None) -> dict:
  args = parse_args(argv)
  from fdllm_jax import load_model, load_tokenizer
  from fdllm_jax.demo import task
  from fdllm_jax.generate import DecodeConfig, generate

  model = load_model(args.model)
  tokenizer = load_tokenizer(args.model)
  stop_id = tokenizer.hf.convert_tokens_to_ids("<|im_end|>")
  block = model.config.bd_size or 32
  config = DecodeConfig(block_size=block, sub_block_size=args.sub_block_size,
                        threshold=args.threshold, max_new_tokens=256, mask_id=tokenizer.mask_id,
                        stop_ids=(stop_id,), use_dual_cache=args.dual_cache)
  problems, prompts = task.held_out_prompts(tokenizer, args.num_problems, args.seed)
  ranked, kinds, correct, tokens, row_forwards = [], {}, 0, 0, 0
  for start in range(0, len(prompts), args.batch_size):
    batch = prompts[start:start + args.batch_size]
    out = generate(model, batch, config)
    tokens += out.num_tokens
    # as in demo_speed_accuracy.py: a row's forwards are its last step (the batch shares them)
    row_forwards += sum(max(steps) if steps else 0 for steps in out.step_of_token)
    for row, (ids, steps) in enumerate(zip(out.tokens, out.step_of_token)):
      problem = start + row
      correct += task.is_correct(tokenizer.decode(ids), problems[problem].answer)
      for sub_block in sub_block_ranks(steps, len(batch[row]), block, args.sub_block_size):
        ranked.append([((problem, j), rank) for j, rank in sub_block])
        kinds.update({(problem, j): token_kind(tokenizer.decode([ids[j]]))
                      for j, _ in sub_block})
  report = {"model": os.path.relpath(args.model), "threshold": args.threshold,
            "num_problems": len(problems), "block_size": block,
            "sub_block_size": args.sub_block_size, "dual_cache": args.dual_cache,
            "accuracy": correct / len(problems), "tokens": tokens,
            "tokens_per_row_forward": tokens / max(row_forwards, 1),
            **summarize(ranked, kinds)}
  print(json.dumps(report, indent=2), flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=2)
  return report


if __name__ == "__main__":
  main()
