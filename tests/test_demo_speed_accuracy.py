"""benchmarks/demo_speed_accuracy.py: every method runs on the same problems, and the report's
accuracies and counts agree with decoding the problems directly."""

import functools
import json
import os

import pytest

from fdllm_jax import demo
from tests import benchmark_modules

demo_speed_accuracy = benchmark_modules.load("demo_speed_accuracy")

needs_bundle = pytest.mark.skipif(
    not os.path.isfile(os.path.join(demo.FAST_DLLM_DIR, "model.safetensors")),
    reason="the bundled demo checkpoints are not in this checkout (bash scripts/build_demo.sh)")


@needs_bundle
def test_report_matches_direct_decoding(tmp_path):
  from fdllm_jax import load_model, load_tokenizer
  from fdllm_jax.demo import task
  from fdllm_jax.generate import DecodeConfig, generate

  out = tmp_path / "report.json"
  report = demo_speed_accuracy.main([
      "--num_problems", "3", "--batch_sizes", "2", "--thresholds", "0.5", "--sub_block_size",
      "1", "--out", str(out), "--plot", str(tmp_path / "plot.png")])
  assert json.loads(out.read_text()) == json.loads(json.dumps(report))
  assert (tmp_path / "plot.png").stat().st_size > 0
  assert report["sub_block_size"] == 1 and report["num_problems"] == 3
  rows = {(r["model"], r["threshold"], r["dual_cache"]): r for r in report["results"]}
  assert set(rows) == {("ar_base", None, None), ("fast_dllm", 0.5, False),
                       ("fast_dllm", 0.5, True)}
  assert rows[("ar_base", None, None)]["speedup_vs_ar"] == 1.0

  # the no-cache row, recomputed: with sub-block 1 even threshold 0.5 fixes one token a forward
  tokenizer, model = load_tokenizer(demo.FAST_DLLM_DIR), load_model(demo.FAST_DLLM_DIR)
  problems = task.generate("test", 3, 0)
  prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p.prompt}])
             for p in problems]
  config = DecodeConfig(block_size=32, sub_block_size=1, threshold=0.5, max_new_tokens=128,
                        mask_id=tokenizer.mask_id, stop_ids=tokenizer.stop_ids[:1])
  outs = [generate(model, prompts[i:i + 2], config) for i in (0, 2)]
  texts = [tokenizer.decode(ids) for o in outs for ids in o.tokens]
  correct = sum(task.is_correct(text, p.answer) for text, p in zip(texts, problems))
  row = rows[("fast_dllm", 0.5, False)]
  assert row["tokens"] == sum(o.num_tokens for o in outs)
  assert row["accuracy"] == pytest.approx(correct / 3)
  assert row["tokens_per_row_forward"] <= 1.0
  assert len(report["forward_cost"]) == 1 and report["forward_cost"][0]["batch_size"] == 2


@needs_bundle
def test_stream_chunk_streams_both_engines_with_the_same_tokens(tmp_path, monkeypatch):
  # 5 problems through 2 rows in one chunk against fixed batches of 2: the same tokens and
  # accuracy per method, fewer batch forwards (no row waits for its batch's slowest row).
  # The forward timing (tested above) runs 2 forwards instead of 64 here.
  monkeypatch.setattr(demo_speed_accuracy, "time_forwards", functools.partial(
      demo_speed_accuracy.time_forwards, repeats=2))
  argv = ["--num_problems", "5", "--batch_sizes", "2", "--thresholds", "0.9", "--no_plot"]
  fixed = demo_speed_accuracy.main([*argv, "--out", str(tmp_path / "fixed.json")])
  streamed = demo_speed_accuracy.main([*argv, "--stream_chunk", "5",
                                       "--out", str(tmp_path / "streamed.json")])
  assert streamed["stream_chunk"] == 5 and fixed["stream_chunk"] == 0
  for a, b in zip(fixed["results"], streamed["results"], strict=True):
    assert (a["model"], a["dual_cache"], a["streamed"], b["streamed"]) == (
        b["model"], b["dual_cache"], False, True)
    assert (a["tokens"], a["accuracy"]) == (b["tokens"], b["accuracy"])
    assert b["forwards"] <= a["forwards"]
  with pytest.raises(SystemExit):
    demo_speed_accuracy.parse_args(["--stream_chunk", "-1"])


def test_place_labels_keeps_labels_apart_inside_the_axes_and_off_the_markers():
  place = demo_speed_accuracy.place_labels
  bounds = (0, 0, 100, 100)
  # two labels wanting the same spot: the better priority gets it, the other its second choice
  same = [[(10, 10, 30, 20), (40, 10, 60, 20)], [(10, 10, 30, 20), (40, 10, 60, 20)]]
  assert place(same, [1, 0], bounds) == {1: 0, 0: 1}
  # no candidate left: the label is left out rather than drawn over another
  assert place([[(10, 10, 30, 20)], [(15, 12, 35, 22)]], [0, 1], bounds) == {0: 0}
  # outside the axes, or over a marker: the next candidate
  assert place([[(-5, 10, 15, 20), (20, 10, 40, 20)]], [0], bounds) == {0: 1}
  assert place([[(10, 10, 30, 20), (50, 50, 70, 60)]], [0], bounds, [(25, 15, 27, 17)]) == {0: 1}
  # boxes that only touch do not overlap
  assert place([[(10, 10, 30, 20)], [(30, 10, 50, 20)]], [0, 1], bounds) == {0: 0, 1: 0}


def test_label_priority_puts_the_headline_thresholds_first():
  thresholds = [1.0, 0.95, 0.9, 0.8, 0.5]
  order = sorted(((t, dual) for t in thresholds for dual in (False, True)),
                 key=lambda p: demo_speed_accuracy._label_priority(*p, thresholds))
  assert order[:6] == [(0.9, False), (0.9, True), (1.0, False), (1.0, True), (0.5, False),
                       (0.5, True)]
  # 0.9 stays first when it is also the lowest threshold
  assert demo_speed_accuracy._label_priority(0.9, False, [1.0, 0.9])[0] == 0
