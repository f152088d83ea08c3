"""The training data pipeline on grain: jsonl -> ChatML ids + labels -> block padding -> packing.

Input: one or more jsonl files, one example per line, either a chat
``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...]}``
(the loss covers the assistant turns: their content and their ``<|im_end|>``; roles, headers
and the newline after ``<|im_end|>`` carry label -100) or plain text ``{"text": "..."}`` (every
token, plus a final ``<|endoftext|>``, carries a label: AR pretraining). Every line is checked
when the source is opened; a bad one is reported by file and line number.

Pipeline for one *row* of the global batch::

    JsonlSource -> shuffle(seed) -> repeat (reshuffled every epoch) -> [row::global_batch]
      -> encode (ChatML, labels) -> [end_at_last_label: drop what follows the last label]
      -> [pad_mask_token: MASK up to a multiple of B, label -100]
      -> PackIterDataset(seq_len): concatenate samples, cut windows of exactly seq_len tokens

Each row of the global batch is an independent packed stream over every ``global_batch``-th
example of the shuffled order. A process therefore builds only the rows its devices hold, and
any process count (or device count) produces the same global batch: a 2-process run sees
exactly the data of a 1-process run. ``BatchIterator.get_state()`` is small and JSON
serialisable (per row: grain's source index, plus the offset inside the sample being packed);
restoring it replays exactly the batches an uninterrupted run would see.

``end_at_last_label`` (block diffusion, not in the reference) ends a sample at its last label:
a chat sample then stops at its final ``<|im_end|>``, without the newline after it. That
newline carries no label, so the block-diffusion noise never masks it; a noisy block holding
an answer's end would see it in clear, one position after the (masked) ``<|im_end|>``, and
learn where the answer ends from it. The decoder never has it: after the current position it
sees only MASK. With the option the MASK padding starts right after ``<|im_end|>``, as in
decoding (docs/demo_history.md, "Session 27").
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Sequence

import grain
import numpy as np

from fdllm_jax.tokenizer import END_OF_TEXT, IM_END, IM_START, Tokenizer
from fdllm_jax.training.objective import IGNORE, check_block_shape

STATE_VERSION = 1


# ----------------------------------------------------------------------------- source

class JsonlSource:
  """Random access to the examples of jsonl files (byte offsets; lines parsed on access).

  Opening validates every line: JSON object, and either ``messages`` (non-empty list of
  ``{"role": str, "content": str}`` with at least one assistant turn) or ``text`` (non-empty
  string). Blank lines are skipped. Errors name the file and the 1-based line number.
  """

  def __init__(self, paths: str | Sequence[str]):
    self.paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not self.paths:
      raise ValueError("no data file given")
    files, offsets, lines = [], [], []
    for file_index, path in enumerate(self.paths):
      path = os.fspath(path)
      if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
      offset = 0
      with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
          if raw.strip():
            validate_example(_parse_line(raw, path, line_number), f"{path}:{line_number}")
            files.append(file_index)
            offsets.append(offset)
            lines.append(line_number)
          offset += len(raw)
    if not offsets:
      raise ValueError(f"data files {self.paths} hold no examples")
    self._file_index = np.asarray(files, np.int32)
    self._offsets = np.asarray(offsets, np.int64)
    self._lines = np.asarray(lines, np.int64)

  def __len__(self) -> int:
    return len(self._offsets)

  def __getitem__(self, index: int) -> dict[str, Any]:
    path = self.paths[int(self._file_index[index])]
    with open(path, "rb") as f:
      f.seek(int(self._offsets[index]))
      raw = f.readline()
    line_number = int(self._lines[index])
    return {"example": _parse_line(raw, path, line_number), "where": f"{path}:{line_number}"}

  def __repr__(self):
    return f"JsonlSource({self.paths}, {len(self)} examples)"


def _parse_line(raw: bytes, path: str, line_number: int):
  try:
    return json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}:{line_number}: not valid JSON ({e})") from None


def validate_example(example, where: str) -> None:
  """Raises ValueError (prefixed with ``where``) unless ``example`` is a chat or text record."""
  if not isinstance(example, dict):
    raise ValueError(f"{where}: each line must be a JSON object with 'messages' or 'text'; got "
                     f"{type(example).__name__}")
  if "messages" in example:
    messages = example["messages"]
    if not isinstance(messages, list) or not messages:
      raise ValueError(f"{where}: 'messages' must be a non-empty list")
    for i, message in enumerate(messages):
      if (not isinstance(message, dict) or not isinstance(message.get("role"), str)
          or not isinstance(message.get("content"), str)):
        raise ValueError(f"{where}: message {i} must be an object with string 'role' and "
                         f"'content'; got {message!r:.200}")
    if not any(m["role"] == "assistant" for m in messages):
      raise ValueError(f"{where}: the conversation has no 'assistant' message, so nothing would "
                       f"be learned from it")
  elif "text" in example:
    if not isinstance(example["text"], str) or not example["text"]:
      raise ValueError(f"{where}: 'text' must be a non-empty string")
  else:
    raise ValueError(f"{where}: each line needs a 'messages' list (chat) or a 'text' string; got "
                     f"keys {sorted(example)}")


# ----------------------------------------------------------------------------- encoding

def encode_chat(tokenizer: Tokenizer, messages: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
  """ChatML ids of ``messages`` and labels: assistant content + ``<|im_end|>``, else IGNORE.

  The ids are those of the whole rendering (``tokenizer.apply_chat_template(messages,
  add_generation_prompt=False)``); labels are assigned through the tokenizer's offsets.
  """
  text, spans, position = [], [], 0
  for message in messages:
    header = f"{IM_START}{message['role']}\n"
    body = f"{message['content']}{IM_END}"
    if message["role"] == "assistant":
      spans.append((position + len(header), position + len(header) + len(body)))
    piece = header + body + "\n"
    text.append(piece)
    position += len(piece)
  encoded = tokenizer.hf("".join(text), add_special_tokens=False, return_offsets_mapping=True)
  ids = np.asarray(encoded["input_ids"], np.int32)
  starts = np.asarray([start for start, _ in encoded["offset_mapping"]], np.int64)
  supervised = np.zeros(len(ids), bool)
  for begin, end in spans:
    supervised |= (starts >= begin) & (starts < end)
  return ids, np.where(supervised, ids, IGNORE).astype(np.int32)


def encode_text(tokenizer: Tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
  """Plain text plus ``<|endoftext|>`` (when the vocabulary has it); every token is a label."""
  ids = tokenizer.encode(text)
  eos = tokenizer.hf.get_vocab().get(END_OF_TEXT)
  if eos is not None:
    ids = ids + [eos]
  ids = np.asarray(ids, np.int32)
  return ids, ids.copy()


def end_at_last_label(ids, labels):
  """``ids`` and ``labels`` up to and including the last labelled token (unchanged when no
  token has a label)."""
  labelled = np.flatnonzero(np.asarray(labels) != IGNORE)
  if not len(labelled):
    return ids, labels
  end = int(labelled[-1]) + 1
  return ids[:end], labels[:end]


def pad_to_block(ids, labels, block_size: int, mask_id: int):
  """Appends MASK tokens (label IGNORE) up to a multiple of ``block_size``."""
  pad = -len(ids) % block_size
  if not pad:
    return ids, labels
  return (np.concatenate([ids, np.full(pad, mask_id, np.int32)]),
          np.concatenate([labels, np.full(pad, IGNORE, np.int32)]))


class EncodeExample:
  """grain map: a source record -> {"input_ids", "labels"} int32 arrays of one sample."""

  def __init__(self, tokenizer: Tokenizer, *, block_size: int, pad_mask_token: bool,
               end_at_last_label: bool = False):
    self.tokenizer = tokenizer
    self.block_size = block_size
    self.pad_mask_token = pad_mask_token
    self.end_at_last_label = end_at_last_label

  def __call__(self, record: dict) -> dict[str, np.ndarray]:
    example = record["example"]
    if "messages" in example:
      ids, labels = encode_chat(self.tokenizer, example["messages"])
    else:
      ids, labels = encode_text(self.tokenizer, example["text"])
    if len(ids) == 0:
      raise ValueError(f"{record['where']}: the example encodes to no tokens")
    if self.end_at_last_label:
      ids, labels = end_at_last_label(ids, labels)
    if self.pad_mask_token:
      ids, labels = pad_to_block(ids, labels, self.block_size, self.tokenizer.mask_id)
    return {"input_ids": ids, "labels": labels}


# ----------------------------------------------------------------------------- packing

class PackIterDataset(grain.IterDataset):
  """Concatenates samples and cuts windows of exactly ``seq_len`` tokens.

  A sample that does not fit the rest of a window continues in the next one. The iterator
  state is the parent's state *before* the sample being cut plus the offset into it, so it is
  small and has a fixed shape.
  """

  def __init__(self, parent: grain.IterDataset, seq_len: int):
    super().__init__(parent)
    self.seq_len = seq_len

  def __iter__(self):
    return _PackIterator(self._parent.__iter__(), self.seq_len)

  def __str__(self):
    return f"PackIterDataset(seq_len={self.seq_len})"


class _PackIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, seq_len: int):
    super().__init__(parent)
    self._seq_len = seq_len
    self._pending = None  # the sample being cut
    self._pending_parent_state = self._parent.get_state()
    self._offset = 0  # tokens of the pending sample already emitted

  def _load_next(self):
    self._pending_parent_state = self._parent.get_state()
    self._pending = next(self._parent)
    self._offset = 0

  def __next__(self):
    ids_out = np.empty(self._seq_len, np.int32)
    labels_out = np.empty(self._seq_len, np.int32)
    filled = 0
    while filled < self._seq_len:
      if self._pending is None or self._offset == len(self._pending["input_ids"]):
        self._load_next()
      take = min(self._seq_len - filled, len(self._pending["input_ids"]) - self._offset)
      ids_out[filled:filled + take] = self._pending["input_ids"][self._offset:self._offset + take]
      labels_out[filled:filled + take] = self._pending["labels"][self._offset:self._offset + take]
      self._offset += take
      filled += take
    return {"input_ids": ids_out, "labels": labels_out}

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._pending_parent_state, "offset": self._offset,
            "has_pending": self._pending is not None}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._pending_parent_state = state["parent"]
    self._pending, self._offset = None, 0
    if state["has_pending"]:
      self._pending = next(self._parent)
      self._offset = int(state["offset"])


# ----------------------------------------------------------------------------- batches

def row_dataset(source, encode: EncodeExample, *, row: int, num_rows: int, seq_len: int,
                seed: int, shuffle: bool = True) -> grain.IterDataset:
  """The packed stream of one row of the global batch (see the module docstring)."""
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat()[row::num_rows]
  # No per-row read threads: grain's default (16 threads, 500 elements ahead) per row would
  # mean hundreds of threads per process and a long re-tokenisation on every restore. The
  # host work overlaps the device step anyway (the loop dispatches asynchronously).
  reads = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  return PackIterDataset(ds.map(encode).to_iter_dataset(reads), seq_len)


class BatchIterator:
  """Yields {"input_ids", "labels"} int32 [len(rows), seq_len]: the given rows of each batch.

  ``rows`` are indices into the global batch (default: all ``global_batch_size`` rows).
  """

  def __init__(self, source, tokenizer: Tokenizer, *, global_batch_size: int, seq_len: int,
               block_size: int, pad_mask_token: bool = True, seed: int = 0, shuffle: bool = True,
               rows: Iterable[int] | None = None, end_at_last_label: bool = False):
    check_block_shape(seq_len, block_size)
    if global_batch_size < 1:
      raise ValueError(f"global_batch_size must be positive; got {global_batch_size}")
    self.rows = list(range(global_batch_size)) if rows is None else sorted(set(rows))
    if any(not 0 <= r < global_batch_size for r in self.rows):
      raise ValueError(f"rows {self.rows} are outside the global batch of {global_batch_size}")
    self.version = STATE_VERSION
    self.seq_len = seq_len
    self.global_batch_size = global_batch_size
    encode = EncodeExample(tokenizer, block_size=block_size, pad_mask_token=pad_mask_token,
                           end_at_last_label=end_at_last_label)
    self._iterators = [
        row_dataset(source, encode, row=r, num_rows=global_batch_size, seq_len=seq_len,
                    seed=seed, shuffle=shuffle).__iter__() for r in self.rows]

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    windows = [next(it) for it in self._iterators]
    return {key: np.stack([w[key] for w in windows]) for key in ("input_ids", "labels")}

  def get_state(self) -> dict[str, Any]:
    return {"version": STATE_VERSION, "global_batch_size": self.global_batch_size,
            "seq_len": self.seq_len,
            "rows": {str(r): it.get_state() for r, it in zip(self.rows, self._iterators)}}

  def set_state(self, state: dict[str, Any]) -> None:
    """Restores the rows of this iterator from a state holding (at least) those rows."""
    for key in ("version", "global_batch_size", "seq_len"):
      if state.get(key) != getattr(self, key):
        raise ValueError(f"data iterator state has {key}={state.get(key)!r}; this pipeline has "
                         f"{getattr(self, key)!r}")
    missing = [r for r in self.rows if str(r) not in state["rows"]]
    if missing:
      raise ValueError(f"data iterator state lacks rows {missing[:8]} of the global batch")
    for r, it in zip(self.rows, self._iterators):
      it.set_state(state["rows"][str(r)])


def merge_row_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """One state holding the rows of several processes' states (identical duplicates allowed)."""
  if not states:
    raise ValueError("no data iterator states to merge")
  merged = dict(states[0])
  merged["rows"] = {}
  for state in states:
    merged["rows"].update(state["rows"])
  return merged
