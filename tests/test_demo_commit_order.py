"""benchmarks/demo_commit_order.py: ranks and counts on hand-made steps, and a run on the
bundled model whose counts add up to the tokens it decoded."""

import pytest

from tests import benchmark_modules

order = benchmark_modules.load("demo_commit_order")


def test_ranks_per_sub_block_leave_out_block_starts():
  # generated positions 30..41: sub-blocks 3 (30, 31), block start 32, 4 (33..39), 5 (40, 41)
  steps = [2, 1, 3, 4, 4, 5, 4, 6, 6, 5, 7, 9]
  ranked = order.sub_block_ranks(steps, prompt_len=30, block_size=32, sub_block_size=8)
  assert ranked == [[(0, 2), (1, 1)],
                    [(3, 1), (4, 1), (5, 2), (6, 1), (7, 3), (8, 3), (9, 2)],
                    [(10, 1), (11, 2)]]


def test_summary_counts_forwards_first_forward_and_kinds():
  ranked = [[("a", 1), ("b", 2)], [("c", 1), ("d", 1), ("e", 3), ("f", 5)]]
  kinds = {"a": "number", "b": "other", "c": "other", "d": "number", "e": "number",
           "f": "other"}
  summary = order.summarize(ranked, kinds)
  assert summary["sub_blocks"] == 2
  assert summary["forwards_per_sub_block"] == {"2": 1, "5": 1}
  assert summary["mean_forwards_per_sub_block"] == 3.5
  assert summary["mean_fixed_by_first_forward"] == 1.5
  number = summary["share_by_forward"]["number"]
  assert number["tokens"] == 3
  assert number["1"] == pytest.approx(2 / 3) and number["3"] == pytest.approx(1 / 3)
  other = summary["share_by_forward"]["other"]
  assert (other["1"], other["2"], other["3"], other["4+"]) == pytest.approx((1 / 3,) * 2 +
                                                                             (0, 1 / 3))


@pytest.mark.parametrize("piece,kind", [(" 38", "number"), ("=", "="), (" *", "operator"),
                                        (" Lily", "other"), ("\\boxed{", "other")])
def test_token_kind(piece, kind):
  assert order.token_kind(piece) == kind


def test_bundled_model_counts_every_generated_token_once(tmp_path):
  out = tmp_path / "order.json"
  report = order.main(["--num_problems", "8", "--out", str(out)])
  assert out.exists() and report["num_problems"] == 8
  assert 0 <= report["accuracy"] <= 1 and 1 < report["tokens_per_row_forward"] <= 8
  histogram = report["forwards_per_sub_block"]
  assert sum(histogram.values()) == report["sub_blocks"] > 8
  assert all(int(k) >= 1 for k in histogram)
  counted = sum(v["tokens"] for v in report["share_by_forward"].values())
  # every generated token but the blocks' first (at most 256 / 32 per row) is ranked
  assert report["tokens"] - 8 * 8 <= counted < report["tokens"]
  for shares in report["share_by_forward"].values():
    assert sum(shares[rank] for rank in order.RANKS) == pytest.approx(1.0)
