"""A small byte-level BPE tokenizer for the demo task, trained with ``tokenizers``.

Same family as Qwen2.5's: byte-level pre-tokenization (any text encodes, nothing is unknown).
By default every digit (and the space before a number) is its own pre-token, so numbers are
sequences of single-digit tokens as in Qwen2.5; ``--numbers whole`` keeps a number one
pre-token, so BPE turns each frequent number into one token (the bundled demo's choice). The
ChatML tokens, ``<|endoftext|>`` and ``|<MASK>|`` are special tokens with the first ids.
Saved as ``tokenizer.json`` (plus ``tokenizer_config.json`` and ``special_tokens_map.json``
through transformers), loadable by ``fdllm_jax.load_tokenizer`` and
``transformers.AutoTokenizer``.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Iterator, Sequence

from fdllm_jax.tokenizer import (CHATML_TEMPLATE, END_OF_TEXT, IM_END, IM_START, MASK_TOKEN,
                                 save_hf_tokenizer)

SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END, MASK_TOKEN)
DEFAULT_VOCAB_SIZE = 512


def chat_texts(rows: Iterable[dict]) -> Iterator[str]:
  """ChatML renderings of chat rows, as the model will see them."""
  for row in rows:
    yield "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in row["messages"])


NUMBER_SPLITS = {"digits": r" ?\d", "whole": r" ?\d+"}


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE,
                    numbers: str = "digits"):
  """A ``tokenizers.Tokenizer`` (byte-level BPE) trained on ``texts``.

  ``numbers="digits"`` splits every digit into its own pre-token (as Qwen2.5 does);
  ``"whole"`` keeps each number one pre-token, so BPE merges the frequent ones into one token.
  """
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

  if vocab_size < 256 + len(SPECIAL_TOKENS):
    raise ValueError(f"vocab_size must hold the 256 byte tokens and {len(SPECIAL_TOKENS)} "
                     f"special tokens (>= {256 + len(SPECIAL_TOKENS)}); got {vocab_size}")
  if numbers not in NUMBER_SPLITS:
    raise ValueError(f"numbers must be one of {sorted(NUMBER_SPLITS)}; got {numbers!r}")
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(NUMBER_SPLITS[numbers]), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
  ])
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tokenizer.train_from_iterator(texts, trainer=trainer)
  return tokenizer


def save_tokenizer(tokenizer, directory: str) -> None:
  """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json to ``directory``."""
  from transformers import PreTrainedTokenizerFast

  os.makedirs(directory, exist_ok=True)
  hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=IM_END,
                               pad_token=END_OF_TEXT, unk_token=None,
                               additional_special_tokens=[IM_START, MASK_TOKEN])
  hf.chat_template = CHATML_TEMPLATE
  hf.model_max_length = 4096
  save_hf_tokenizer(hf, directory)


def main(argv: Sequence[str] | None = None) -> None:
  import argparse
  parser = argparse.ArgumentParser(description="Trains the demo tokenizer on a chat jsonl file.")
  parser.add_argument("--data", required=True, help="chat jsonl (the train split)")
  parser.add_argument("--out_dir", required=True)
  parser.add_argument("--vocab_size", type=int, default=DEFAULT_VOCAB_SIZE)
  parser.add_argument("--numbers", choices=sorted(NUMBER_SPLITS), default="digits",
                      help="digits: one token per digit; whole: BPE merges whole numbers")
  args = parser.parse_args(argv)
  with open(args.data) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  tokenizer = train_tokenizer(chat_texts(rows), args.vocab_size, args.numbers)
  save_tokenizer(tokenizer, args.out_dir)
  print(f"trained a {tokenizer.get_vocab_size()}-token BPE tokenizer on {len(rows)} rows; "
        f"saved to {args.out_dir}")


if __name__ == "__main__":
  main()
