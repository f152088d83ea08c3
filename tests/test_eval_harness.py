"""The evaluation loop, its outputs, sweeps and the command line (fdllm_jax.eval.harness)."""

import json
import os
import shutil
import time
import types

import pytest

from fdllm_jax.eval import data, harness

STOP, PAD = 1000, 1001


class ByteTokenizer:
  """A stand-in tokenizer: bytes as ids, a fake ChatML, one stop id."""

  stop_ids = (STOP,)
  mask_id = 999
  pad_id = PAD

  def encode(self, text):
    return list(text.encode())

  def decode(self, ids):
    return bytes(i for i in ids if i < 256).decode("utf-8", "replace")

  def apply_chat_template(self, messages):
    text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
    return self.encode(text + "<assistant>")


class CannedGenerate:
  """Answers each prompt from a table (key found in the prompt text), then writes the stop
  token and padding, as a batched decoder does; records its calls."""

  def __init__(self, answers, forwards=6, delay_s=0.0):
    self.answers, self.forwards, self.delay_s = answers, forwards, delay_s
    self.calls = []

  def __call__(self, prompts):
    self.calls.append(len(prompts))
    time.sleep(self.delay_s)
    tok = ByteTokenizer()
    tokens = []
    for ids in prompts:
      text = tok.decode(ids)
      answer = next((v for k, v in self.answers.items() if k in text), "no idea")
      tokens.append(tok.encode(answer) + [STOP] + [PAD] * 9)
    return types.SimpleNamespace(tokens=tokens, finished=[True] * len(prompts),
                                 num_forwards=self.forwards)


GSM_ROWS = [
    {"question": "Q-one: 2+2?", "answer": "2+2=4\n#### 4"},
    {"question": "Q-two: 3*3?", "answer": "#### 9"},
    {"question": "Q-three: 10-1?", "answer": "#### 9"},
]
GSM_ANSWERS = {"Q-one": "2+2 = 4, so \\boxed{4}", "Q-two": "It is \\boxed{9}.",
               "Q-three": "I think 8"}


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_evaluate_gsm8k_writes_samples_and_summary(tmp_path):
  generate = CannedGenerate(GSM_ANSWERS, forwards=6, delay_s=0.01)
  summary = harness.evaluate(harness.TASKS["gsm8k"], GSM_ROWS, ByteTokenizer(), generate,
                             out_dir=str(tmp_path), stop_ids=ByteTokenizer.stop_ids,
                             progress=False, run_name="t", config={"threshold": 0.9})
  assert generate.calls == [1, 1, 1, 1]  # warm-up call + one per row
  samples = _read_jsonl(tmp_path / "samples.jsonl")
  assert [s["correct"] for s in samples] == [True, True, False]
  assert [s["extracted"] for s in samples] == ["4", "9", "8"]
  first = samples[0]
  assert first["id"] == "gsm8k/0" and first["gold"] == "4"
  assert first["prompt"] == "Q-one: 2+2?\nPlease reason step by step, and put your final " \
                            "answer within \\boxed{}."
  assert first["output"] == GSM_ANSWERS["Q-one"]
  # tokens up to the stop token: the padding after it is not counted
  assert first["tokens"] == len(GSM_ANSWERS["Q-one"].encode())
  assert first["forwards"] == 6 and first["seconds"] >= 0.01 and first["finished"] is True
  assert first["prompt_tokens"] == len(ByteTokenizer().apply_chat_template(
      [{"role": "user", "content": first["prompt"]}]))
  total_tokens = sum(len(a.encode()) for a in GSM_ANSWERS.values())
  assert summary["accuracy"] == pytest.approx(2 / 3) and summary["correct"] == 2
  assert summary["tokens"] == total_tokens
  assert summary["tokens_per_forward"] == pytest.approx(total_tokens / 18, abs=1e-3)
  assert 0 < summary["tokens_per_s"] <= total_tokens / 0.03
  assert summary["warmup_seconds"] is not None and summary["config"] == {"threshold": 0.9}
  assert json.loads((tmp_path / "summary.json").read_text())["accuracy"] == summary["accuracy"]


def test_batches_share_forwards_and_time(tmp_path):
  generate = CannedGenerate(GSM_ANSWERS, forwards=10)
  summary = harness.evaluate(harness.TASKS["gsm8k"], GSM_ROWS, ByteTokenizer(), generate,
                             out_dir=str(tmp_path), batch_size=2, stop_ids=(STOP,),
                             warmup=False, progress=False)
  assert generate.calls == [2, 1]
  samples = _read_jsonl(tmp_path / "samples.jsonl")
  assert [s["batch_rows"] for s in samples] == [2, 2, 1]
  assert samples[0]["seconds"] == samples[1]["seconds"]
  assert summary["forwards"] == 20 and summary["warmup_seconds"] is None
  assert summary["tokens_per_batch_forward"] == pytest.approx(summary["tokens"] / 20, abs=1e-3)
  assert summary["tokens_per_forward"] == pytest.approx(summary["tokens"] / 30, abs=1e-3)


def test_progress_bar_shows_accuracy_and_speed(tmp_path, capsys):
  harness.evaluate(harness.TASKS["gsm8k"], GSM_ROWS, ByteTokenizer(),
                   CannedGenerate(GSM_ANSWERS), out_dir=str(tmp_path), stop_ids=(STOP,),
                   warmup=False, progress=True, run_name="bar")
  err = capsys.readouterr().err
  assert "bar" in err and "acc=66.7%" in err and "tok_s=" in err


def test_wrong_number_of_rows_is_an_error(tmp_path):
  def broken(prompts):
    return types.SimpleNamespace(tokens=[[1]], num_forwards=1)
  with pytest.raises(ValueError, match="1 rows of tokens for a batch of 2"):
    harness.evaluate(harness.TASKS["gsm8k"], GSM_ROWS, ByteTokenizer(), broken,
                     out_dir=str(tmp_path), batch_size=2, warmup=False, progress=False)


def test_humaneval_run_carries_on_after_hazards(tmp_path):
  """Loop, 10 GiB, write outside, socket, then a correct solution: the run finishes, only the
  last problem passes."""
  problem = data.load_humaneval()[0]
  outside = tmp_path / "escaped.txt"
  header = "def has_close_elements(numbers, threshold):\n"
  bodies = ["    while True:\n        pass\n",
            "    x = bytearray(10 * 2**30)\n",
            f"    open({str(outside)!r}, 'w').write('x')\n",
            "    import socket\n    socket.create_connection(('1.1.1.1', 53), timeout=1)\n"]
  rows, answers = [], {}
  for i, body in enumerate(bodies + [None]):
    key = f"problem-{i}"
    rows.append({**problem, "task_id": f"H/{i}", "prompt": f"# {key}\n" + problem["prompt"]})
    code = (header + body) if body else (problem["prompt"] + problem["canonical_solution"])
    answers[key] = code + "```\nDone."
  summary = harness.evaluate(harness.TASKS["humaneval"], rows, ByteTokenizer(),
                             CannedGenerate(answers), out_dir=str(tmp_path / "out"),
                             stop_ids=(STOP,), warmup=False, progress=False,
                             score_kwargs={"timeout_s": 1.5, "memory_mb": 1024})
  samples = _read_jsonl(tmp_path / "out" / "samples.jsonl")
  assert [s["status"] for s in samples] == ["timeout", "failed", "failed", "failed", "passed"]
  assert [s["correct"] for s in samples] == [False] * 4 + [True]
  assert summary["accuracy"] == pytest.approx(0.2) and not outside.exists()
  assert samples[4]["prompt"].startswith("Please provide a self-contained Python script")


# ----------------------------------------------------------------------------- command line

def test_plan_runs():
  def plans(*argv):
    args = harness.parse_args(["--model", "m", "--task", "gsm8k", "--out", "o", *argv])
    return [(p.name, p.kind, p.threshold) for p in harness.plan_runs(args)]
  assert plans() == [("threshold_1", "dllm", 1.0)]
  assert plans("--ar") == [("ar", "ar", None)]
  assert plans("--threshold", "0.9", "0.7", "0.9", "--ar") == [
      ("threshold_0.9", "dllm", 0.9), ("threshold_0.7", "dllm", 0.7), ("ar", "ar", None)]


@pytest.mark.parametrize("argv,message", [
    (["--threshold", "1.5"], "threshold must be in"),
    (["--threshold", "x"], "threshold must be a number"),
    (["--sub_block_size", "5"], "must divide --block_size"),
    (["--limit", "0"], "positive integer"),
    (["--task", "mmlu"], "invalid choice"),
])
def test_bad_command_lines(argv, message, capsys):
  base = {"--model": "m", "--task": "gsm8k", "--out": "o"}
  for i in range(0, len(argv), 2):
    base[argv[i]] = argv[i + 1]
  with pytest.raises(SystemExit):
    harness.parse_args([x for kv in base.items() for x in kv])
  assert message in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--block_size", "16"], ["--sub_block_size", "4"],
                                   ["--dual_cache"], ["--block_size", "16", "--dual_cache"]])
def test_ar_alone_refuses_the_block_diffusion_flags(flags, capsys):
  common = ["--model", "m", "--task", "gsm8k", "--out", "o"]
  with pytest.raises(SystemExit):
    harness.parse_args([*common, "--ar", *flags])
  err = capsys.readouterr().err
  assert "with --ar alone" in err and "would be ignored" in err and flags[0] in err
  args = harness.parse_args([*common, "--ar", "--threshold", "0.9", *flags])  # beside a dLLM run
  assert (args.block_size, args.sub_block_size) == (
      int(flags[1]) if flags[0] == "--block_size" else 32,
      int(flags[1]) if flags[0] == "--sub_block_size" else 8)


def test_run_time_errors_are_one_line(tmp_path, capsys):
  """A missing model or an --out that is a file: 'error: ...' and status 2, no traceback."""
  common = ["--task", "gsm8k", "--limit", "1", "--max_new_tokens", "4", "--no_progress"]
  assert harness.main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o"),
                       *common]) == 2
  assert capsys.readouterr().err.startswith("error: ")
  (tmp_path / "afile").write_text("x")
  assert harness.main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "afile"),
                       *common]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: --out") and "is a file" in err


@pytest.fixture
def fake_backend(monkeypatch):
  """main() with the canned generator in place of a model; records the run configs."""
  made = []

  def make_generate_fn(model, tokenizer, plan, args):
    made.append(plan)
    # a slower, more accurate "model" at higher thresholds, like the real trade-off
    answers = dict(GSM_ANSWERS) if (plan.threshold or 1.0) >= 0.9 else {
        k: "\\boxed{0}" for k in GSM_ANSWERS}
    return CannedGenerate(answers, forwards=4 if plan.kind == "ar" else 2), {"kind": plan.kind}

  monkeypatch.setattr(harness, "load_backend", lambda args: (ByteTokenizer(), None))
  monkeypatch.setattr(harness, "make_generate_fn", make_generate_fn)
  return made


def test_main_sweep_writes_runs_summary_and_plot(tmp_path, fake_backend):
  data_path = tmp_path / "gsm.jsonl"
  data.write_jsonl(str(data_path), GSM_ROWS)
  out = tmp_path / "out"
  code = harness.main(["--model", "m", "--task", "gsm8k", "--data", str(data_path), "--out",
                       str(out), "--threshold", "0.5", "0.9", "--ar", "--no_progress"])
  assert code == 0
  assert [p.name for p in fake_backend] == ["threshold_0.5", "threshold_0.9", "ar"]
  overview = json.loads((out / "summary.json").read_text())
  assert [r["run"] for r in overview["runs"]] == ["threshold_0.5", "threshold_0.9", "ar"]
  assert [r["accuracy"] for r in overview["runs"]] == [0.0, pytest.approx(2 / 3),
                                                      pytest.approx(2 / 3)]
  assert overview["runs"][0]["threshold"] == 0.5 and overview["runs"][2]["kind"] == "ar"
  for run in ("threshold_0.5", "threshold_0.9", "ar"):
    assert len(_read_jsonl(out / run / "samples.jsonl")) == 3
    assert json.loads((out / run / "summary.json").read_text())["run"] == run
  assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_main_single_run_has_no_plot(tmp_path, fake_backend):
  out = tmp_path / "out"
  assert harness.main(["--model", "m", "--task", "gsm8k", "--limit", "2", "--out", str(out),
                       "--no_progress", "--no_warmup"]) == 0
  overview = json.loads((out / "summary.json").read_text())
  assert len(overview["runs"]) == 1 and overview["runs"][0]["n"] == 2
  assert not (out / "sweep.png").exists()


def test_main_reports_bad_data_file(tmp_path, fake_backend, capsys):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q"}\n')
  code = harness.main(["--model", "m", "--task", "gsm8k", "--data", str(bad), "--out",
                       str(tmp_path / "out")])
  assert code == 2
  assert "bad.jsonl:2: missing key 'answer'" in capsys.readouterr().err
  assert not fake_backend  # failed before loading any model


def test_plot_sweep_directly(tmp_path):
  runs = [{"run": "threshold_0.9", "kind": "dllm", "threshold": 0.9, "tokens_per_s": 30.0,
           "accuracy": 0.8},
          {"run": "threshold_1", "kind": "dllm", "threshold": 1.0, "tokens_per_s": 12.0,
           "accuracy": 0.82},
          {"run": "ar", "kind": "ar", "threshold": None, "tokens_per_s": 10.0, "accuracy": 0.83}]
  path = harness.plot_sweep(runs, str(tmp_path / "p.png"), "test")
  assert os.path.getsize(path) > 1000


# ----------------------------------------------------------------------------- end to end

def _has_decoding():
  try:
    module = harness._decoding_api()
  except ImportError:
    return False
  return all(hasattr(module, n) for n in ("generate", "generate_ar", "DecodeConfig"))


@pytest.fixture(scope="module")
def tiny_qwen_vocab_model(tmp_path_factory):
  """A random 2-layer Qwen2 with the real Qwen2.5 tokenizer (vocab 151936, hidden 32)."""
  from fdllm_jax import tokenizer as tokenizer_lib
  from tests import hf_models
  directory = str(tmp_path_factory.mktemp("tiny_qwen_vocab"))
  config = hf_models.tiny_config("qwen2", vocab_size=151936, hidden_size=32,
                                 intermediate_size=64, num_attention_heads=4,
                                 num_key_value_heads=2, tie_word_embeddings=True)
  hf_models.save_random_model(directory, config)
  source = tokenizer_lib.qwen25_tokenizer_dir(str(tmp_path_factory.mktemp("qwen_tok")))
  shutil.copy(os.path.join(source, "tokenizer.json"), directory)
  return directory


@pytest.mark.skipif(not _has_decoding(), reason="fdllm_jax.generate / generate_ar / "
                    "DecodeConfig are not available yet (decoding issue)")
@pytest.mark.parametrize("task,extra", [
    ("gsm8k", ["--threshold", "0.9", "1.0", "--ar", "--batch_size", "2", "--no_warmup"]),
    ("humaneval", ["--threshold", "0.9", "--dual_cache", "--no_warmup"]),
])
def test_end_to_end_tiny_random_model(tiny_qwen_vocab_model, tmp_path, task, extra):
  out = tmp_path / "out"
  start = time.perf_counter()
  code = harness.main(["--model", tiny_qwen_vocab_model, "--task", task, "--limit", "3",
                       "--max_new_tokens", "32", "--out", str(out), "--no_progress",
                       "--timeout", "3", *extra])
  assert code == 0
  overview = json.loads((out / "summary.json").read_text())
  for run in overview["runs"]:
    assert run["n"] == 3 and 0.0 <= run["accuracy"] <= 1.0
    assert 0 < run["tokens"] <= 3 * 32 and run["tokens_per_s"] > 0 and run["forwards"] > 0
    samples = _read_jsonl(out / run["run"] / "samples.jsonl")
    assert len(samples) == 3 and all(s["tokens"] <= 32 for s in samples)
  if len(overview["runs"]) > 1:
    assert (out / "sweep.png").exists()
  assert time.perf_counter() - start < 60


@pytest.mark.skipif(not _has_decoding(), reason="fdllm_jax.generate / generate_ar / "
                    "DecodeConfig are not available yet (decoding issue)")
def test_max_batch_size_streams_each_call_with_the_same_outputs(tiny_qwen_vocab_model, tmp_path):
  # 3 prompts per call through 2 device rows: every sample's output as in one batch of 3.
  common = ["--model", tiny_qwen_vocab_model, "--task", "gsm8k", "--limit", "3",
            "--max_new_tokens", "24", "--no_progress", "--no_warmup", "--threshold", "0.9",
            "--ar", "--batch_size", "3"]
  assert harness.main([*common, "--out", str(tmp_path / "batch")]) == 0
  assert harness.main([*common, "--max_batch_size", "2", "--out", str(tmp_path / "rows")]) == 0
  for run in ("threshold_0.9", "ar"):
    batch = _read_jsonl(tmp_path / "batch" / run / "samples.jsonl")
    rows = _read_jsonl(tmp_path / "rows" / run / "samples.jsonl")
    assert [s["output"] for s in rows] == [s["output"] for s in batch]
    summary = json.loads((tmp_path / "rows" / run / "summary.json").read_text())
    assert summary["config"]["max_batch_size"] == 2
    # tokens per forward counts the 2 device rows, not the 3 prompts of the call
    assert {s["batch_rows"] for s in rows} == {2} and {s["batch_rows"] for s in batch} == {3}
    assert summary["tokens_per_forward"] == pytest.approx(
        summary["tokens"] / (summary["forwards"] * 2), abs=1e-4)
    if run == "ar":  # one token per row per forward at most
      assert 0.5 < summary["tokens_per_forward"] <= 1.0
  with pytest.raises(SystemExit):
    harness.parse_args([*common, "--out", "x", "--max_batch_size", "0"])
