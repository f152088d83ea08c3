"""Procedurally generated multi-step arithmetic word problems, GSM8K-shaped, for the demo model.

A problem tells a short story about one person and one kind of item, two to four operations
long (multiply, add, subtract, double, buy packs, share equally), and asks a question. The
solution is templated, one line per operation, each line ending in the running total
("After buying 9 more, Mia has 24 + 9 = 33."), and the last line is ``The answer is \\boxed{N}.``

Design constraints (see the issue of the bundled demo model):

- small numbers (running totals in 2..99, amounts and factors single digits, quotients in the
  multiplication table) so a model of a few million parameters learns the arithmetic in
  minutes on a CPU;
- each result is computable left to right from the line's own operands;
- templated phrasing: most solution tokens are copies of the question or fixed text, which is
  what lets a block-diffusion model fix many tokens per forward.

Splits are disjoint by construction: a problem belongs to ``test`` when a hash of its question
text falls in the test fraction, otherwise to ``train``. Generation is deterministic for a seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
from typing import Iterator, Sequence

TEST_PERCENT = 10  # share of the problem space (by question hash) held out for testing
SPLITS = ("train", "test")
MAX_TOTAL = 99  # every running total stays in 2..MAX_TOTAL
MAX_AMOUNT = 9  # bought / found / given / lost amounts are single digits

NAMES = ("Mia", "Leo", "Ava", "Sam", "Zoe", "Max", "Ana", "Ben", "Eva", "Tom", "Lily", "Noah",
         "Emma", "Jack", "Ella", "Liam", "Ruby", "Owen", "Nora", "Finn")
# (items, container, containers)
ITEMS = (("apples", "bag", "bags"), ("pencils", "box", "boxes"), ("cookies", "jar", "jars"),
         ("marbles", "bag", "bags"), ("stickers", "sheet", "sheets"), ("eggs", "carton", "cartons"),
         ("books", "shelf", "shelves"), ("cards", "pack", "packs"), ("shells", "bucket", "buckets"),
         ("coins", "purse", "purses"), ("stamps", "page", "pages"), ("beads", "box", "boxes"))


@dataclasses.dataclass(frozen=True)
class Problem:
  question: str  # the user turn
  solution: str  # the assistant turn
  answer: int

  @property
  def prompt(self) -> str:
    """The user message as the model sees it.

    The reference's GSM8K suffix ("Please reason step by step, ...") is left out: for a model
    trained only on this task it is 18 constant tokens that cost compute and teach nothing.
    """
    return self.question

  def to_chat(self) -> dict:
    return {"messages": [{"role": "user", "content": self.prompt},
                         {"role": "assistant", "content": self.solution}],
            "answer": self.answer}


def _start(rng: random.Random, name: str, item: tuple) -> tuple[str, str, int]:
  items, container, containers = item
  if rng.random() < 0.5:
    a = rng.randint(5, 40)
    return f"{name} has {a} {items}.", f"{name} starts with {a}.", a
  a, b = rng.randint(2, 9), rng.randint(2, 9)
  return (f"{name} has {a} {containers} of {items}. Each {container} has {b} {items}.",
          f"{name} has {a} * {b} = {a * b}.", a * b)


def _operation(rng: random.Random, name: str, other: str, item: tuple,
               total: int) -> tuple[str, str, int] | None:
  """One story step applied to ``total``; None when the drawn kind does not fit the numbers."""
  items, container, containers = item
  kind = rng.choice(("buy", "find", "give", "lose", "packs", "double"))
  if kind in ("buy", "find") and total < MAX_TOTAL:
    c = rng.randint(1, min(MAX_AMOUNT, MAX_TOTAL - total))
    verb, past = ("buys", "buying") if kind == "buy" else ("finds", "finding")
    return (f"{name} {verb} {c} more {items}.",
            f"After {past} {c} more, {name} has {total} + {c} = {total + c}.", total + c)
  if kind in ("give", "lose") and total > 2:
    d = rng.randint(1, min(MAX_AMOUNT, total - 2))
    if kind == "give":
      return (f"{name} gives {d} {items} to {other}.",
              f"After giving {d} to {other}, {name} has {total} - {d} = {total - d}.",
              total - d)
    return (f"{name} loses {d} {items}.",
            f"After losing {d}, {name} has {total} - {d} = {total - d}.", total - d)
  if kind == "packs":
    b = rng.randint(2, 9)
    max_c = min(4, (MAX_TOTAL - total) // b)
    if max_c < 2:
      return None
    c = rng.randint(2, max_c)
    return (f"{name} buys {c} {containers} with {b} {items} in each.",
            f"{name} buys {c} * {b} = {c * b} more, so {name} has {total} + {c * b} = "
            f"{total + c * b}.", total + c * b)
  if kind == "double" and 2 * total <= MAX_TOTAL:
    return (f"Then the number of {items} {name} has doubles.",
            f"After doubling, {name} has {total} * 2 = {2 * total}.", 2 * total)
  return None


def _question(rng: random.Random, name: str, item: tuple, total: int) -> tuple[str, str, int]:
  items = item[0]
  divisors = [k for k in range(2, 10) if total % k == 0 and 2 <= total // k <= 9]
  if divisors and rng.random() < 0.3:
    k = rng.choice(divisors)
    return (f"{name} shares them equally among {k} friends. How many {items} does each friend "
            f"get?", f"Each friend gets {total} / {k} = {total // k}.", total // k)
  return f"How many {items} does {name} have now?", "", total


def random_problem(rng: random.Random) -> Problem:
  """Draws one problem (of either split) from ``rng``."""
  name, other = rng.sample(NAMES, 2)
  item = rng.choice(ITEMS)
  story, lines, total = [], [], 0
  text, line, total = _start(rng, name, item)
  story.append(text)
  lines.append(line)
  num_ops = rng.randint(1, 3)
  while len(lines) < num_ops + 1:
    step = _operation(rng, name, other, item, total)
    if step is not None:
      story.append(step[0])
      lines.append(step[1])
      total = step[2]
  text, line, answer = _question(rng, name, item, total)
  story.append(text)
  if line:
    lines.append(line)
  lines.append(f"The answer is \\boxed{{{answer}}}.")
  return Problem(question=" ".join(story), solution="\n".join(lines), answer=answer)


def split_of(question: str) -> str:
  """``test`` for TEST_PERCENT percent of question texts (by SHA-256), else ``train``."""
  digest = hashlib.sha256(question.encode("utf-8")).digest()
  return "test" if int.from_bytes(digest[:8], "big") % 100 < TEST_PERCENT else "train"


def iter_problems(split: str, seed: int) -> Iterator[Problem]:
  """Endless stream of distinct problems of ``split``, deterministic for ``seed``."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
  rng = random.Random(f"fdllm-demo-{seed}")
  seen: set[str] = set()
  while True:
    problem = random_problem(rng)
    if problem.question in seen or split_of(problem.question) != split:
      continue
    seen.add(problem.question)
    yield problem


def generate(split: str, num: int, seed: int = 0) -> list[Problem]:
  """``num`` distinct problems of ``split``, deterministic for ``seed``."""
  if num < 0:
    raise ValueError(f"num must be >= 0; got {num}")
  stream = iter_problems(split, seed)
  return [next(stream) for _ in range(num)]


def held_out_prompts(tokenizer, num: int, seed: int = 0) -> tuple[list[Problem], list[list[int]]]:
  """(problems, prompts): ``generate("test", num, seed)`` and each one's user turn as chat
  prompt ids of ``tokenizer`` (a ``fdllm_jax.Tokenizer``), ready for the decoders."""
  problems = generate("test", num, seed)
  return problems, [tokenizer.apply_chat_template([{"role": "user", "content": p.prompt}])
                    for p in problems]


def write_jsonl(path: str, problems: Sequence[Problem]) -> None:
  """Chat jsonl: one ``{"messages": [user, assistant], "answer": N}`` per line."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    for problem in problems:
      f.write(json.dumps(problem.to_chat()) + "\n")
  os.replace(path + ".tmp", path)


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


_BOXED = re.compile(r"\\boxed\{\s*(-?\d+)\s*\}")


def extract_answer(text: str) -> int | None:
  """The integer in the last ``\\boxed{...}`` of ``text``, or None."""
  found = _BOXED.findall(text)
  return int(found[-1]) if found else None


def is_correct(text: str, answer: int) -> bool:
  return extract_answer(text) == answer


def check_solution(problem: Problem) -> bool:
  """Re-evaluates every ``a op b = c`` of the solution and the boxed answer (for tests)."""
  ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
         "/": lambda a, b: a // b if b and a % b == 0 else None}
  for a, op, b, c in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", problem.solution):
    if ops[op](int(a), int(b)) != int(c):
      return False
  return extract_answer(problem.solution) == problem.answer


def main(argv: Sequence[str] | None = None) -> None:
  import argparse
  parser = argparse.ArgumentParser(description="Writes the demo task's chat jsonl splits.")
  parser.add_argument("--out_dir", required=True)
  parser.add_argument("--num_train", type=int, default=60000)
  parser.add_argument("--num_test", type=int, default=1000)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  for split, num in (("train", args.num_train), ("test", args.num_test)):
    path = os.path.join(args.out_dir, f"{split}.jsonl")
    write_jsonl(path, generate(split, num, args.seed))
    print(f"wrote {num} {split} problems to {path}")


if __name__ == "__main__":
  main()
