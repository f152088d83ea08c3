"""What the demo's wrong answers get wrong: each one's first line that leaves the solution.

    python benchmarks/demo_errors.py                          # the bundled adapted model, 0.9
    python benchmarks/demo_errors.py --model workdirs/x/export --threshold 0.95 --dual_cache
    python benchmarks/demo_errors.py --ar models/demo/ar_base   # an AR base, generate_ar

Decodes held-out problems of the demo task (greedy; ``generate`` with block 32 and sub-block 8
by default, or ``generate_ar`` with ``--ar``) and compares every wrong answer line by line with
the task's templated solution (``fdllm_jax/demo/task.py``: one line per operation, then an
optional "Each friend gets ..." line, then "The answer is \\boxed{N}."). The first line that
differs decides the kind of error:

- ``extra_step``: a step line where the solution has its final lines (the model goes on, most
  often by repeating the step before);
- ``missing_step``: a final line where the solution has a step;
- ``arithmetic``: the words right, and the line's ``a op b = c`` computed wrongly;
- ``wrong_number``: the words right, a number wrong but its ``a op b = c`` right (an operand
  misread from the question or the line before);
- ``wording``: any other difference (a name, a verb, a garbled line);
- ``unfinished``: the generated text is a prefix of the solution (no answer before the stop
  or the token limit).

Reports, as JSON on stdout (and in ``--out``): accuracy, tokens per forward of a row (as in
``demo_speed_accuracy.py``), the count of each kind, and the first ``--examples`` wrong answers
of each kind with the line that differs.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KINDS = ("extra_step", "missing_step", "arithmetic", "wrong_number", "wording", "unfinished")
FINAL_PREFIXES = ("The answer", "Each friend")  # the lines after the last operation's
_EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
_NUMBER = re.compile(r"\d+")


def parse_args(argv=None):
  from fdllm_jax import demo
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default=demo.FAST_DLLM_DIR, help="adapted checkpoint directory")
  p.add_argument("--ar", default=None,
                 help="an AR checkpoint directory: decode it with generate_ar instead of --model")
  p.add_argument("--threshold", type=float, default=0.9)
  p.add_argument("--num_problems", type=int, default=200)
  p.add_argument("--seed", type=int, default=0, help="seed of the test split's problems")
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--sub_block_size", type=int, default=8)
  p.add_argument("--dual_cache", action="store_true")
  p.add_argument("--examples", type=int, default=3, help="wrong answers shown per kind")
  p.add_argument("--out", default=None, help="also write the JSON report here")
  args = p.parse_args(argv)
  for name in ("num_problems", "batch_size", "sub_block_size"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be at least 1; got {getattr(args, name)}")
  if args.examples < 0:
    p.error(f"--examples must be >= 0; got {args.examples}")
  return args


def is_final_line(line: str) -> bool:
  return line.startswith(FINAL_PREFIXES)


def _equation_holds(line: str) -> bool:
  """Every ``a op b = c`` of ``line`` is right (integer division must be exact)."""
  for a, op, b, c in _EQUATION.findall(line):
    a, b, c = int(a), int(b), int(c)
    value = {"+": a + b, "-": a - b, "*": a * b,
             "/": a // b if b and a % b == 0 else None}[op]
    if value != c:
      return False
  return True


def classify(generated: str, solution: str) -> tuple[str, int] | None:
  """The kind of error (one of ``KINDS``) of a generated answer and the index of its first line
  that differs from ``solution``; None when every line matches."""
  got = generated.strip().split("\n")
  want = solution.strip().split("\n")
  for i, want_line in enumerate(want):
    if i >= len(got):
      return "unfinished", i
    line = got[i].strip()
    if line == want_line:
      continue
    if i == len(got) - 1 and want_line.startswith(line):
      return "unfinished", i  # stopped inside the line
    if is_final_line(want_line) and not is_final_line(line):
      return "extra_step", i
    if is_final_line(line) and not is_final_line(want_line):
      return "missing_step", i
    if _NUMBER.sub("#", line) == _NUMBER.sub("#", want_line):
      return ("wrong_number" if _equation_holds(line) else "arithmetic"), i
    return "wording", i
  return None if len(got) == len(want) else ("extra_step", len(want))


def summarize(records, num_examples: int) -> dict:
  """``records``: (kind, index of the first line that differs, generated, solution) per wrong
  answer."""
  counts = collections.Counter(kind for kind, *_ in records)
  examples = collections.defaultdict(list)
  for kind, line, generated, solution in records:
    if len(examples[kind]) < num_examples:
      got = generated.strip().split("\n")
      examples[kind].append({"line": line, "generated": got[line] if line < len(got) else None,
                             "expected": solution.split("\n")[line]
                             if line < len(solution.split("\n")) else None,
                             "answer": generated})
  return {"errors": {kind: counts[kind] for kind in KINDS},
          "examples": {kind: examples[kind] for kind in KINDS if examples[kind]}}


def main(argv=None) -> dict:
  args = parse_args(argv)
  from fdllm_jax import load_model, load_tokenizer
  from fdllm_jax.demo import task
  from fdllm_jax.generate import DecodeConfig, generate, generate_ar

  path = args.ar or args.model
  model = load_model(path)
  tokenizer = load_tokenizer(path)
  stop_id = tokenizer.hf.convert_tokens_to_ids("<|im_end|>")
  config = DecodeConfig(block_size=model.config.bd_size or 32, sub_block_size=args.sub_block_size,
                        threshold=args.threshold, max_new_tokens=256, mask_id=tokenizer.mask_id,
                        stop_ids=(stop_id,), use_dual_cache=args.dual_cache)
  problems, prompts = task.held_out_prompts(tokenizer, args.num_problems, args.seed)
  records, correct, tokens, row_forwards = [], 0, 0, 0
  for start in range(0, len(prompts), args.batch_size):
    batch = prompts[start:start + args.batch_size]
    if args.ar:
      out = generate_ar(model, batch, max_new_tokens=256, stop_ids=(stop_id,))
    else:
      out = generate(model, batch, config)
    tokens += out.num_tokens
    # as in demo_speed_accuracy.py: a row's forwards are its last step (the batch shares them)
    row_forwards += sum(max(steps) if steps else 0 for steps in out.step_of_token)
    for row, ids in enumerate(out.tokens):
      problem = problems[start + row]
      text = tokenizer.decode(ids, skip_special_tokens=True)
      if task.is_correct(text, problem.answer):
        correct += 1
        continue
      found = classify(text, problem.solution)
      if found is None:  # matching lines end in the right \boxed{}: is_correct disagrees
        raise RuntimeError(f"answer {text!r} matches the solution but was scored wrong")
      records.append((*found, text, problem.solution))
  report = {"model": os.path.relpath(path), "engine": "generate_ar" if args.ar else "generate",
            "threshold": None if args.ar else args.threshold,
            "dual_cache": None if args.ar else args.dual_cache,
            "num_problems": len(problems), "accuracy": correct / len(problems),
            "tokens_per_row_forward": tokens / max(row_forwards, 1),
            "wrong": len(records), **summarize(records, args.examples)}
  print(json.dumps(report, indent=2), flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=2)
  return report


if __name__ == "__main__":
  main()
