"""benchmarks/demo_digit_probe.py: batched block-setting logits equal the literal one-at-a-time
computation, and the report counts every answer token once per setting."""


import numpy as np
import pytest

from fdllm_jax import compute_logits, demo, load_model, load_tokenizer
from fdllm_jax.demo import task
from fdllm_jax.training.data import encode_chat, pad_to_block
from tests import benchmark_modules

probe = benchmark_modules.load("demo_digit_probe")


def test_batched_block_inputs_equal_one_truncated_forward_per_position():
  tokenizer, model = load_tokenizer(demo.FAST_DLLM_DIR), load_model(demo.FAST_DLLM_DIR)
  ids, labels = encode_chat(tokenizer, task.generate("test", 1, 3)[0].to_chat()["messages"])
  ids, labels = pad_to_block(np.asarray(ids), np.asarray(labels), 32, tokenizer.mask_id)
  targets = np.flatnonzero(labels != -100)[[0, 5, 17, -1]]
  batched = np.asarray(compute_logits(
      model, probe.block_inputs(ids, labels, targets, 32, tokenizer.mask_id),
      attention="block_causal", block_size=32))
  for row, i in enumerate(targets):
    end = (i // 32 + 1) * 32  # the literal setting: the sequence stops at the block's end
    literal = ids[:end].copy()
    literal[i:end] = tokenizer.mask_id  # the targets are answer tokens: no prompt after them
    want = np.asarray(compute_logits(model, literal[None], attention="block_causal",
                                     block_size=32))[0, i - 1]
    np.testing.assert_allclose(batched[row, i - 1], want, rtol=1e-4, atol=1e-4)


def test_block_rows_hide_the_newline_after_the_answer_and_keep_the_prompt():
  labels = np.array([-100, -100, -100, 7, 8, 9, -100, 3])  # prompt, answer, its newline, pad
  ids = np.array([1, 2, 3, 7, 8, 9, 5, 3])
  rows = probe.block_inputs(ids, labels, np.array([1, 4, 5]), 8, mask_id=3)
  np.testing.assert_array_equal(rows, [[1, 2, 3, 3, 3, 3, 3, 3],
                                       [1, 2, 3, 7, 3, 3, 3, 3],
                                       [1, 2, 3, 7, 8, 3, 3, 3]])


def test_prefix_setting_equals_one_truncated_forward_per_position():
  tokenizer, model = load_tokenizer(demo.AR_BASE_DIR), load_model(demo.AR_BASE_DIR)
  ids, labels = encode_chat(tokenizer, task.generate("test", 1, 4)[0].to_chat()["messages"])
  ids, labels = pad_to_block(np.asarray(ids), np.asarray(labels), 32, tokenizer.mask_id)
  targets = np.flatnonzero(labels != -100)[[0, 3, 20, -1]]
  batched = np.asarray(probe._explicit_mask_logits()(
      model, np.repeat(ids[None], len(targets), axis=0).astype(np.int32),
      probe.prefix_allowed(targets, len(ids), 32)))
  for row, i in enumerate(targets):
    want = np.asarray(compute_logits(model, ids[None, :i], attention="block_causal",
                                     block_size=32))[0, i - 1]
    np.testing.assert_allclose(batched[row, i - 1], want, rtol=1e-4, atol=1e-4)


def test_ahead_rows_hide_the_target_and_its_left_neighbour_to_the_block_end():
  labels = np.array([-100, -100, 1, 1, 1, 1, 1, 1, 1, -100])  # block 4: a prompt, then answer
  targets = np.array([2, 3, 4, 5, 7])
  ahead = probe.ahead_targets(labels, targets, 4)
  np.testing.assert_array_equal(ahead, [3, 5, 7])  # 2: prompt on its left; 4: a block start
  ids = np.arange(10, 20)
  rows = probe.block_inputs(ids, labels, ahead - 1, 4, mask_id=99)
  np.testing.assert_array_equal(rows == 99, [[j in (2, 3) for j in range(10)],
                                             [j in (4, 5, 6, 7) for j in range(10)],
                                             [j in (6, 7) for j in range(10)]])


def test_token_kinds():
  assert probe.token_kind("The", 32, 32, "\n") == "block_start"
  assert probe.token_kind("The", 5, 32, ".\n") == "line_start"
  assert probe.token_kind(" 45", 5, 32, " =") == "digit"
  assert probe.token_kind(" has", 5, 32, " Finn") == "other"


def test_infill_rows_hide_exactly_the_target():
  ids = np.arange(10, 20)
  rows = probe.infill_inputs(ids, np.array([2, 7]), mask_id=99)
  np.testing.assert_array_equal(rows != ids[None], [[j == 2 for j in range(10)],
                                                    [j == 7 for j in range(10)]])
  assert (rows[rows != ids[None]] == 99).all()


def test_report_counts_every_answer_token_in_every_setting(capsys):
  reports = probe.main(["--model", demo.AR_BASE_DIR, "--num_problems", "3", "--examples", "2"])
  (report,) = reports
  assert '"model"' in capsys.readouterr().out
  tokenizer = load_tokenizer(demo.AR_BASE_DIR)
  answer_tokens = 0
  for problem in task.generate("test", 3, 0):
    _, labels = encode_chat(tokenizer, problem.to_chat()["messages"])
    answer_tokens += int((np.asarray(labels)[1:] != -100).sum())
  ahead_tokens = 0
  for problem in task.generate("test", 3, 0):
    ids, labels = encode_chat(tokenizer, problem.to_chat()["messages"])
    ids, labels = pad_to_block(np.asarray(ids), np.asarray(labels), 32, tokenizer.mask_id)
    targets = np.asarray([i for i in np.flatnonzero(labels != -100) if i > 0])
    ahead_tokens += sum(1 for i in targets if i % 32 and labels[i - 1] != -100)
  assert 0 < ahead_tokens < answer_tokens
  for setting in probe.SETTINGS:
    want = ahead_tokens if setting == "ahead" else answer_tokens
    assert sum(report[setting]["total"].values()) == want
    assert report[setting]["total"].get("line_start", 0) > 0
    assert len(report[setting]["examples"]) <= 2
    assert all(0 <= e["p_want"] < 1 for e in report[setting]["examples"])
    for kind, confident in report[setting]["confident"].items():
      assert 0 <= confident <= report[setting]["wrong"][kind]
  # the AR base does its arithmetic under its own causal mask (1 digit in 1033 wrong on 60)
  assert report["causal"]["wrong"].get("digit", 0) <= 1


@pytest.mark.parametrize("argv,message", [(["--num_problems", "0"], "num_problems"),
                                          (["--block_size", "0"], "block_size"),
                                          (["--threshold", "1.5"], "threshold"),
                                          (["--sub_block_size", "5"], "sub_block_size")])
def test_bad_arguments_name_the_value(argv, message, capsys):
  with pytest.raises(SystemExit):
    probe.parse_args(argv)
  assert message in capsys.readouterr().err
