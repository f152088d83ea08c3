"""Generates the small sample dataset and its tiny tokenizer under ``sample_data/``.

    python -m fdllm_jax.training.make_sample_data [--out DIR] [--num_examples N]

Writes ``chat.jsonl`` (synthetic ChatML conversations: arithmetic, list reversal and sorting,
counting, capital cities, multi-turn greetings; some with a system prompt) and
``tokenizer/tokenizer.json``, a byte-level BPE of 512 ids trained on that text, holding the
specials ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` and the MASK token ``|<MASK>|``.
Everything is a deterministic function of ``--seed``; the committed files are its output.
They exist so tests and ``configs/tiny_cpu.gin`` can train without any download.
"""

from __future__ import annotations

import argparse
import json
import os
import random

from fdllm_jax.tokenizer import END_OF_TEXT, IM_END, IM_START, MASK_TOKEN

SAMPLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample_data")
CHAT_FILE = os.path.join(SAMPLE_DIR, "chat.jsonl")
TOKENIZER_DIR = os.path.join(SAMPLE_DIR, "tokenizer")
VOCAB_SIZE = 512
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END, MASK_TOKEN)

_WORDS = ("apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "rocket", "garden",
          "window", "silver", "forest", "candle", "bridge", "orange", "planet", "violin",
          "mountain", "pencil", "ocean")
_CAPITALS = (("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
             ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
             ("Norway", "Oslo"), ("India", "New Delhi"), ("Chile", "Santiago"),
             ("Greece", "Athens"))
_NAMES = ("Ada", "Bob", "Chen", "Dana", "Eli", "Fatima", "Goro", "Hana")


def _arithmetic(rng):
  a, b = rng.randint(0, 99), rng.randint(0, 99)
  if rng.random() < 0.5:
    return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
  a, b = max(a, b), min(a, b)
  return f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}."


def _reverse(rng):
  words = rng.sample(_WORDS, rng.randint(2, 5))
  return f"Reverse this list: {', '.join(words)}", ", ".join(reversed(words))


def _sort(rng):
  numbers = [rng.randint(0, 50) for _ in range(rng.randint(3, 6))]
  return (f"Sort these numbers: {' '.join(map(str, numbers))}",
          " ".join(map(str, sorted(numbers))))


def _count(rng):
  start, length = rng.randint(0, 30), rng.randint(3, 8)
  return (f"Count from {start} to {start + length - 1}.",
          ", ".join(str(i) for i in range(start, start + length)))


def _capital(rng):
  country, city = rng.choice(_CAPITALS)
  return f"What is the capital of {country}?", f"The capital of {country} is {city}."


_TASKS = (_arithmetic, _reverse, _sort, _count, _capital)


def make_example(rng: random.Random) -> dict:
  messages = []
  if rng.random() < 0.3:
    messages.append({"role": "system", "content": "You are a helpful assistant."})
  if rng.random() < 0.2:
    name = rng.choice(_NAMES)
    messages += [{"role": "user", "content": f"Hi, I am {name}."},
                 {"role": "assistant", "content": f"Hello {name}! How can I help you?"}]
  for _ in range(rng.choice((1, 1, 1, 2))):
    question, answer = rng.choice(_TASKS)(rng)
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
  return {"messages": messages}


def write_chat_jsonl(path: str, num_examples: int, seed: int) -> None:
  rng = random.Random(seed)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    for _ in range(num_examples):
      f.write(json.dumps(make_example(rng)) + "\n")


def train_tokenizer(chat_path: str, directory: str, vocab_size: int = VOCAB_SIZE) -> None:
  """A byte-level BPE over the ChatML renderings of ``chat_path`` (Qwen-like pre-tokenizer)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  def texts():
    with open(chat_path) as f:
      for line in f:
        yield "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n"
                      for m in json.loads(line)["messages"])

  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tokenizer.train_from_iterator(texts(), trainer=trainer)
  os.makedirs(directory, exist_ok=True)
  tokenizer.save(os.path.join(directory, "tokenizer.json"))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=SAMPLE_DIR)
  parser.add_argument("--num_examples", type=int, default=2000)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  chat = os.path.join(args.out, "chat.jsonl")
  write_chat_jsonl(chat, args.num_examples, args.seed)
  train_tokenizer(chat, os.path.join(args.out, "tokenizer"))
  print(f"wrote {chat} ({args.num_examples} conversations) and "
        f"{os.path.join(args.out, 'tokenizer', 'tokenizer.json')}")


if __name__ == "__main__":
  main()
