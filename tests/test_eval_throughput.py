"""Throughput accounting (fdllm_jax.eval.throughput)."""

import pytest

from fdllm_jax.eval import throughput


def test_truncate_at_stop_drops_stop_and_padding():
  assert throughput.truncate_at_stop([5, 6, 7, 151645, 151643, 151643], [151645, 151643]) == [
      5, 6, 7]
  assert throughput.truncate_at_stop([5, 6], [151645]) == [5, 6]
  assert throughput.truncate_at_stop([151645, 5], [151645]) == []


def test_meter_totals():
  meter = throughput.Throughput()
  meter.add_batch([10, 30], seconds=2.0, forwards=10)  # two rows, one call of 10 forwards
  meter.add_batch([20], seconds=1.0, forwards=4)
  assert meter.tokens == 60 and meter.samples == 3
  assert meter.tokens_per_s == pytest.approx(20.0)
  assert meter.tokens_per_batch_forward == pytest.approx(60 / 14)
  assert meter.tokens_per_forward == pytest.approx(60 / (10 * 2 + 4 * 1))
  summary = meter.as_dict()
  assert summary["tokens_per_s"] == 20.0 and summary["mean_tokens"] == 20.0


def test_streamed_calls_divide_by_the_device_rows():
  """Four prompts streamed through 2 rows in 12 forwards: 2 x 12 row forwards, not 4 x 12."""
  meter = throughput.Throughput()
  meter.add_batch([6, 6, 5, 7], seconds=1.0, forwards=12, rows=2)
  assert meter.tokens_per_forward == pytest.approx(24 / 24)
  assert meter.samples == 4
  for rows in (0, 5):
    with pytest.raises(ValueError, match=r"rows must be in \[1, 4\]"):
      meter.add_batch([1, 1, 1, 1], seconds=1.0, forwards=1, rows=rows)


def test_empty_meter():
  meter = throughput.Throughput()
  assert meter.tokens_per_s == 0.0 and meter.tokens_per_forward == 0.0
  assert meter.as_dict()["mean_tokens"] == 0.0
