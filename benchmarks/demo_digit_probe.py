"""Where the demo's adaptation loses accuracy: teacher-forced next-token accuracy per token kind.

    python benchmarks/demo_digit_probe.py                                 # both bundled models
    python benchmarks/demo_digit_probe.py --model workdirs/demo/adapt/export --num_problems 60

For held-out problems of the demo task, every answer token is predicted from the reference text
before it (teacher forcing), in the two settings a model meets:

- ``causal``: the plain causal mask, the AR base's own setting (one forward per problem);
- ``block``: the block-causal mask with the answer's prefix clean and the rest of the current
  block MASK, the situation of left-to-right decoding at threshold 1.0 (the token-shifted
  logit at i-1 predicts token i, as in ``generate``);
- ``prefix``: the block-causal mask over the text before i only (no MASK token anywhere): what
  bidirectional attention among the block's clean tokens alone costs;
- ``infill``: the block-causal mask with only token i MASK, the rest of the text clean (the
  whole block visible, the answer's later copies included);
- ``ahead``: as ``block`` but MASK from i-1 on, so token i is predicted at a MASK position
  without the token before it: the situation of a token that threshold decoding commits in the
  same forward as its left neighbour. Only tokens whose left neighbour is an answer token of
  the same block;
- ``sub_block``: as ``block`` but MASK from the start of i's sub-block (``--sub_block_size``,
  8): the first forward of a sub-block, where threshold decoding fixes most of its tokens at
  once (``benchmarks/demo_commit_order.py``).

Tokens are counted by kind: ``digit`` (a token of an answer's numbers, the arithmetic: one
digit, or a whole number with the bundled tokenizer), ``block_start`` (the first token of a
block, predicted from the previous block), ``line_start`` (the first token of a line: after a
newline, where the answer goes on with a step or ends) and ``other``. Each wrong prediction
records the probability the model gave the right token; ``confident`` counts the wrong
predictions whose top probability exceeds ``--threshold`` (0.9): those that threshold decoding
would commit at once. Session 3 used this to show that the adapted model
keeps about the in-block arithmetic its AR base already had under the block-causal mask
(docs/demo_history.md, "Sessions 2 to 4").

Writes the report as JSON to stdout (and to ``--out`` when given).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

SETTINGS = ("causal", "block", "prefix", "infill", "ahead", "sub_block")


def parse_args(argv=None):
  from fdllm_jax import demo
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", action="append",
                 help="checkpoint directory; may be repeated (default: both bundled models)")
  p.add_argument("--num_problems", type=int, default=30)
  p.add_argument("--seed", type=int, default=0, help="seed of the test split's problems")
  p.add_argument("--block_size", type=int, default=32)
  p.add_argument("--sub_block_size", type=int, default=8, help="of the sub_block setting")
  p.add_argument("--examples", type=int, default=5, help="wrong predictions kept per setting")
  p.add_argument("--threshold", type=float, default=0.9,
                 help="a wrong prediction above this top probability counts as confident")
  p.add_argument("--out", default=None, help="also write the JSON report here")
  args = p.parse_args(argv)
  args.model = args.model or [demo.AR_BASE_DIR, demo.FAST_DLLM_DIR]
  if args.num_problems < 1:
    p.error(f"--num_problems must be at least 1; got {args.num_problems}")
  if args.block_size < 1:
    p.error(f"--block_size must be at least 1; got {args.block_size}")
  if args.sub_block_size < 1 or args.block_size % args.sub_block_size:
    p.error(f"--sub_block_size must divide the block size {args.block_size}; got "
            f"{args.sub_block_size}")
  if not 0.0 <= args.threshold <= 1.0:
    p.error(f"--threshold must be in [0, 1]; got {args.threshold}")
  return args


def token_kind(piece: str, position: int, block_size: int, previous_piece: str = "") -> str:
  if position % block_size == 0:
    return "block_start"
  if previous_piece.endswith("\n"):
    return "line_start"
  return "digit" if piece.strip().isdigit() else "other"


def block_inputs(ids: np.ndarray, labels: np.ndarray, targets: np.ndarray, block_size: int,
                 mask_id: int) -> np.ndarray:
  """One row per target position i: [i, end of i's block) MASK, except prompt tokens.

  The prompt is what comes before the first label; everything after it is hidden, the newline
  after the answer's ``<|im_end|>`` too: the decoder has MASK there, and that unlabelled
  newline would show where the answer ends (docs/demo_history.md, "Session 27"). Later blocks
  keep their tokens: under the block-causal mask they cannot reach the block of i.
  """
  rows = np.repeat(ids[None], len(targets), axis=0)
  answer_start = int(np.flatnonzero(labels != -100)[0])
  for row, i in enumerate(targets):
    start, end = max(i, answer_start), (i // block_size + 1) * block_size
    rows[row, start:end] = mask_id
  return rows


def ahead_targets(labels: np.ndarray, targets: np.ndarray, block_size: int) -> np.ndarray:
  """The targets i whose left neighbour i-1 is an answer token of the same block."""
  targets = np.asarray(targets)
  keep = (targets % block_size != 0) & (labels[targets - 1] != -100)
  return targets[keep]


def prefix_allowed(targets: np.ndarray, seq_len: int, block_size: int) -> np.ndarray:
  """bool [rows, seq_len, seq_len]: block-causal, and no key at or after row r's target."""
  idx = np.arange(seq_len)
  block_causal = idx[None, :] // block_size <= idx[:, None] // block_size
  before_target = idx[None, None, :] < np.asarray(targets)[:, None, None]
  return block_causal[None] & before_target


def infill_inputs(ids: np.ndarray, targets: np.ndarray, mask_id: int) -> np.ndarray:
  """One row per target position i: only token i replaced by MASK."""
  rows = np.repeat(ids[None], len(targets), axis=0)
  rows[np.arange(len(targets)), targets] = mask_id
  return rows


def _explicit_mask_logits():
  from flax import nnx
  from fdllm_jax import masks

  @nnx.jit
  def logits(model, ids, allowed):
    return model(ids, mask=masks.Explicit(allowed))[0].astype(np.float32)
  return logits


def probe_model(path: str, problems, *, block_size: int, num_examples: int,
                threshold: float = 0.9, sub_block_size: int = 8) -> dict:
  """The report of one checkpoint: per setting and kind, wrong / total, and a few examples."""
  from fdllm_jax import compute_logits, load_model, load_tokenizer
  from fdllm_jax.training.data import encode_chat, pad_to_block
  tokenizer, model = load_tokenizer(path), load_model(path)
  explicit_logits = _explicit_mask_logits()
  counts = {s: collections.Counter() for s in SETTINGS}
  wrong = {s: collections.Counter() for s in SETTINGS}
  confident = {s: collections.Counter() for s in SETTINGS}
  examples = {s: [] for s in SETTINGS}
  for problem in problems:
    ids, labels = encode_chat(tokenizer, problem.to_chat()["messages"])
    ids, labels = pad_to_block(np.asarray(ids), np.asarray(labels), block_size,
                               tokenizer.mask_id)
    targets = np.asarray([i for i in np.flatnonzero(labels != -100) if i > 0])
    causal = np.asarray(compute_logits(model, ids[None], attention="causal"))[0]
    block = np.asarray(compute_logits(
        model, block_inputs(ids, labels, targets, block_size, tokenizer.mask_id),
        attention="block_causal", block_size=block_size))
    prefix = np.asarray(explicit_logits(
        model, np.repeat(ids[None], len(targets), axis=0).astype(np.int32),
        prefix_allowed(targets, len(ids), block_size)))
    infill = np.asarray(compute_logits(model, infill_inputs(ids, targets, tokenizer.mask_id),
                                       attention="block_causal", block_size=block_size))
    ahead = ahead_targets(labels, targets, block_size)
    ahead_logits = {} if not len(ahead) else dict(zip(ahead.tolist(), np.asarray(compute_logits(
        model, block_inputs(ids, labels, ahead - 1, block_size, tokenizer.mask_id),
        attention="block_causal", block_size=block_size))[np.arange(len(ahead)), ahead - 1]))
    sub_block = np.asarray(compute_logits(
        model, block_inputs(ids, labels, targets // sub_block_size * sub_block_size, block_size,
                            tokenizer.mask_id),
        attention="block_causal", block_size=block_size))
    for row, i in enumerate(targets):
      piece = tokenizer.decode([int(ids[i])])
      kind = token_kind(piece, int(i), block_size, tokenizer.decode([int(ids[i - 1])]))
      settings = [("causal", causal[i - 1]), ("block", block[row, i - 1]),
                  ("prefix", prefix[row, i - 1]), ("infill", infill[row, i - 1]),
                  ("sub_block", sub_block[row, i - 1])]
      if int(i) in ahead_logits:
        settings.append(("ahead", ahead_logits[int(i)]))
      for setting, logits in settings:
        counts[setting][kind] += 1
        if int(np.argmax(logits)) == int(ids[i]):
          continue
        wrong[setting][kind] += 1
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        confident[setting][kind] += bool(probs.max() > threshold)
        if len(examples[setting]) < num_examples:
          examples[setting].append({
              "context": tokenizer.decode([int(t) for t in ids[max(0, i - 10):i]]),
              "want": piece, "got": tokenizer.decode([int(np.argmax(logits))]),
              "p_want": round(float(probs[ids[i]]), 3), "p_got": round(float(probs.max()), 3),
              "block_position": int(i % block_size)})
  return {"model": path, "num_problems": len(problems), "block_size": block_size,
          "threshold": threshold,
          **{s: {"wrong": dict(wrong[s]), "confident": dict(confident[s]),
                 "total": dict(counts[s]), "examples": examples[s]} for s in SETTINGS}}


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  from fdllm_jax.demo import task
  problems = task.generate("test", args.num_problems, args.seed)
  reports = [probe_model(path, problems, block_size=args.block_size,
                         num_examples=args.examples, threshold=args.threshold,
                         sub_block_size=args.sub_block_size)
             for path in args.model]
  text = json.dumps(reports, indent=1)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
  return reports


if __name__ == "__main__":
  main()
