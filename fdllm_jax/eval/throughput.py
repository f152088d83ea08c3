"""Throughput accounting: generated tokens up to the stop token, wall time including prefill.

* tokens: per row, the ids ``generate`` returned, cut at the first stop id (which is not
  counted) -- never the padding or MASK slots written after it;
* seconds: wall time of each ``generate`` call (prefill, decoding, and the transfer of the
  tokens back to the host), summed over batches; compilation is kept out by a warm-up call;
* tokens per forward: generated tokens / (model forwards x rows of the batch): the tokens one
  row gets per forward (the rows on the device: with ``max_batch_size`` the prompts of a call
  stream through that many rows). At batch size 1 it is the paper's tokens-per-forward; at
  larger batch sizes rows that finished early lower it. ``tokens_per_batch_forward`` divides
  by forwards only (how much one batched forward produced).

The reference's evaluation also counts the padding written after a row's stop token as
generated tokens, which inflates its tokens/s when answers end early (most of all in batches,
where finished rows keep being padded until the longest row ends); ours does not.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence


def truncate_at_stop(tokens: Iterable[int], stop_ids: Sequence[int]) -> list[int]:
  """The tokens before the first stop id (all of them when there is none)."""
  stop = set(int(s) for s in stop_ids)
  kept = []
  for token in tokens:
    token = int(token)
    if token in stop:
      break
    kept.append(token)
  return kept


@dataclasses.dataclass
class Throughput:
  """Running totals over batches."""

  tokens: int = 0
  seconds: float = 0.0
  forwards: int = 0
  row_forwards: int = 0
  samples: int = 0

  def add_batch(self, token_counts: Sequence[int], seconds: float, forwards: int,
                rows: int | None = None) -> None:
    """One ``generate`` call: tokens per prompt, its wall time, its number of model forwards,
    and the rows of its device batch (default: one per prompt)."""
    rows = len(token_counts) if rows is None else int(rows)
    if not 1 <= rows <= max(len(token_counts), 1):
      raise ValueError(f"rows must be in [1, {len(token_counts)}] (the prompts of the call); "
                       f"got {rows}")
    self.tokens += int(sum(token_counts))
    self.seconds += float(seconds)
    self.forwards += int(forwards)
    self.row_forwards += int(forwards) * rows
    self.samples += len(token_counts)

  @property
  def tokens_per_s(self) -> float:
    return self.tokens / self.seconds if self.seconds > 0 else 0.0

  @property
  def tokens_per_forward(self) -> float:
    return self.tokens / self.row_forwards if self.row_forwards else 0.0

  @property
  def tokens_per_batch_forward(self) -> float:
    return self.tokens / self.forwards if self.forwards else 0.0

  def as_dict(self) -> dict:
    return {"tokens": self.tokens, "seconds": round(self.seconds, 4),
            "tokens_per_s": round(self.tokens_per_s, 3), "forwards": self.forwards,
            "tokens_per_forward": round(self.tokens_per_forward, 4),
            "tokens_per_batch_forward": round(self.tokens_per_batch_forward, 4),
            "mean_tokens": round(self.tokens / self.samples, 2) if self.samples else 0.0}
