"""decode.py on a tiny random model with the real Qwen2.5 tokenizer (MASK = 151665)."""

import json
import os
import re
import shutil
import sys

import pytest
from flax import nnx

import fdllm_jax
from fdllm_jax import tokenizer as tokenizer_lib
from fdllm_jax import viz
from fdllm_jax.config import ModelConfig
from fdllm_jax.model import Transformer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import decode  # noqa: E402

STATS = re.compile(r"\[(.*)\] (\d+) tokens in [\d.]+ s: [\d.]+ tokens/s, ([\d.]+) tokens/forward, "
                   r"(\d+) forwards")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("tiny_qwen_vocab"))
  config = ModelConfig(vocab_size=151936, hidden_size=32, intermediate_size=48,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                       head_dim=16, tie_word_embeddings=True, model_type="Fast_dLLM_Qwen",
                       bd_size=32)
  fdllm_jax.save_hf(Transformer(config, rngs=nnx.Rngs(0)), directory)
  shutil.copy(os.path.join(tokenizer_lib.qwen25_tokenizer_dir(), "tokenizer.json"), directory)
  return directory


def _run(capsys, *argv):
  code = decode.main(list(argv))
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def test_diffusion_with_gin_and_steps(model_dir, capsys, tmp_path):
  gin_file = tmp_path / "decode.gin"
  gin_file.write_text("DecodeConfig.sub_block_size = 4\nDecodeConfig.threshold = 0.5\n")
  code, out, err = _run(capsys, "--model", model_dir, "--prompt", "Hello there", "--chat",
                        "--max_new_tokens", "20", "--gin_file", str(gin_file), "--gin_param",
                        "DecodeConfig.seed = 3", "--show_steps", "--progress", "always")
  assert code == 0, err
  stats = STATS.search(out)
  assert stats and stats.group(1) == "threshold 0.5" and int(stats.group(2)) <= 20
  assert "\x1b[38;5;" in out and "tokens per step" in out
  # gin bindings do not leak into later DecodeConfig() constructions
  assert fdllm_jax.DecodeConfig().sub_block_size == 8


def test_ar_and_dual_cache_and_batch(model_dir, capsys):
  code, out, err = _run(capsys, "--model", model_dir, "--prompt", "a b c", "--ar",
                        "--max_new_tokens", "12", "--progress", "never")
  assert code == 0, err
  stats = STATS.search(out)
  assert stats.group(1) == "AR" and float(stats.group(3)) == pytest.approx(
      int(stats.group(2)) / int(stats.group(4)))
  code, out, err = _run(capsys, "--model", model_dir, "--prompt", "one", "--prompt",
                        "two three four", "--dual_cache", "--threshold", "1.0",
                        "--max_new_tokens", "10")
  assert code == 0, err
  assert "--- [0]" in out and "--- [1]" in out
  assert STATS.search(out).group(1) == "threshold 1.0, DualCache"



@pytest.mark.parametrize("engine", [[], ["--ar"]])
def test_max_batch_size_streams_the_prompts(model_dir, capsys, engine):
  prompts = ["--prompt", "one", "--prompt", "two three four five", "--prompt", "six"]
  common = ["--model", model_dir, *prompts, *engine, "--max_new_tokens", "10",
            "--progress", "always"]
  code, batch, err = _run(capsys, *common)
  assert code == 0, err
  code, streamed, err = _run(capsys, *common, "--max_batch_size", "1")
  assert code == 0, err
  text = lambda out: out[:out.rindex("\n[")]  # the three rows, without the timing line
  assert "--- [2]" in streamed and text(streamed) == text(batch)
  # tokens/forward is per row: 3 rows in one batch, 1 row when streamed
  for out, rows in ((batch, 3), (streamed, 1)):
    stats = STATS.search(out)
    assert float(stats.group(3)) == pytest.approx(
        int(stats.group(2)) / (int(stats.group(4)) * rows), abs=0.006)
    assert (f"forwards of {rows} rows" in out) == (rows > 1)
  code, _, err = _run(capsys, *common, "--max_batch_size", "0")
  assert code == 2 and "max_batch_size must be None or an integer >= 1; got 0" in err, err

@pytest.mark.parametrize("engine", [[], ["--ar"]])
def test_prompts_file_and_output_give_what_the_prompt_flags_give(model_dir, capsys, tmp_path,
                                                                 engine):
  texts = ["one", "two three four five", "six"]
  common = ["--model", model_dir, *engine, "--max_new_tokens", "10", "--progress", "never"]
  code, printed, err = _run(capsys, *common, *[a for t in texts for a in ("--prompt", t)])
  assert code == 0, err
  expected = [block.split("\n", 1)[1].rsplit("\n", 1)[0]  # each row's text as printed
              for block in printed[:printed.rindex("\n[")].split("--- [")[1:]]

  plain = tmp_path / "prompts.txt"
  plain.write_text("one\n\ntwo three four five\r\nsix")  # blank lines skipped, CRLF stripped
  output = tmp_path / "sub" / "results.jsonl"  # its folder is made
  code, out, err = _run(capsys, *common, "--prompts_file", str(plain), "--output", str(output),
                        "--max_batch_size", "2")
  assert code == 0, err
  assert f"wrote 3 results to {output}" in out and "--- [" not in out and STATS.search(out)
  rows = [json.loads(line) for line in output.read_text().splitlines()]
  assert [row["index"] for row in rows] == [0, 1, 2]
  assert [row["prompt"] for row in rows] == texts
  assert [row["text"] for row in rows] == expected
  for row in rows:
    assert 0 < row["num_tokens"] <= 10 and isinstance(row["finished"], bool)
    if engine:  # AR: token k is fixed by forward k
      assert row["forwards"] == row["num_tokens"]
    else:
      assert 1 <= row["forwards"] <= 10 + 1

  # jsonl: a "messages" entry is the chat template of its messages, a "prompt" entry follows --chat
  chat = tmp_path / "chat.jsonl"
  chat.write_text(json.dumps({"messages": [{"role": "user", "content": "six"}], "id": 7}) + "\n"
                  + json.dumps({"prompt": "six"}) + "\n")
  code, _, err = _run(capsys, *common, "--prompts_file", str(chat), "--output", str(output),
                      "--chat")
  assert code == 0, err
  code, printed, err = _run(capsys, *common, "--prompt", "six", "--chat")
  assert code == 0, err
  by_chat = printed[:printed.rindex("\n[")]
  rows = [json.loads(line) for line in output.read_text().splitlines()]
  assert rows[0]["prompt"] == [{"role": "user", "content": "six"}] and rows[1]["prompt"] == "six"
  assert rows[0]["text"] == rows[1]["text"] == by_chat


def test_result_rows_take_the_last_forward_of_out_of_order_tokens():
  out = fdllm_jax.GenerateOutput(tokens=[[5, 6, 7], []], finished=[True, False], num_forwards=4,
                                 step_of_token=[[1, 3, 2], []], seconds=1.0, compile_seconds=0.0,
                                 host_syncs=1)

  class Tok:
    def decode(self, ids):
      return " ".join(map(str, ids))

  rows = decode.result_rows(["a", [{"role": "user", "content": "b"}]], out, Tok(),
                            double=lambda text: text * 2)
  assert rows == [
      {"index": 0, "prompt": "a", "text": "5 6 7", "num_tokens": 3, "finished": True,
       "forwards": 3, "double": "5 6 75 6 7"},
      {"index": 1, "prompt": [{"role": "user", "content": "b"}], "text": "", "num_tokens": 0,
       "finished": False, "forwards": 0, "double": ""}]


@pytest.mark.parametrize("content,message", [
    ("", "holds no prompt"),
    ("{not json}\n", r"p.jsonl line 1 is not JSON"),
    ('{"prompt": "a"}\n\n{"text": "b"}\n', r"p.jsonl line 3 must be an object with one of the "
                                           r"keys 'prompt' \(text\) or 'messages'"),
    ('{"prompt": "a", "messages": []}\n', "line 1 must be an object with one of the keys"),
    ('["a"]\n', "line 1 must be an object"),
    ('{"prompt": 3}\n', r"line 1: 'prompt' must be a string; got 3"),
    ('{"messages": []}\n', "'messages' must be a non-empty list of objects"),
    ('{"messages": [{"role": "user"}]}\n', "string 'role' and 'content'"),
])
def test_bad_prompts_files_name_the_line(tmp_path, content, message):
  path = tmp_path / "p.jsonl"
  path.write_text(content)
  with pytest.raises(ValueError, match=message):
    decode.read_prompts_file(str(path))


def test_prompts_file_flag_errors(model_dir, capsys, tmp_path):
  path = tmp_path / "p.txt"
  path.write_text("x\n")
  binary = tmp_path / "b.bin"
  binary.write_bytes(b"\x9a\xff\x00")
  for argv, message in [
      (["--prompts_file", str(tmp_path / "missing.txt")], "does not exist"),
      (["--prompts_file", str(path), "--prompt", "y"], "give --prompt or --prompts_file"),
      (["--prompts_file", str(path), "--output", str(tmp_path / "o.jsonl"), "--show_steps"],
       "give one of them"),
      (["--prompts_file", str(tmp_path)], "is a directory; give a file"),
      (["--prompts_file", str(binary)], "is not UTF-8 text"),
      (["--prompts_file", str(path), "--output", str(tmp_path)], "is a directory; give a file"),
      (["--prompts_file", str(path), "--output", str(path / "o.jsonl")], "is a file, not a")]:
    code, _, err = _run(capsys, "--model", model_dir, *argv)
    assert code == 2 and message in err, err
  assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("argv,message", [
    (["--threshold", "1.5"], r"threshold must be in \(0, 1\]; got 1.5"),
    (["--gin_param", "DecodeConfig.no_such_field = 1"], "bad gin configuration"),
    (["--gin_file", "/nonexistent.gin"], "does not exist"),
    # flags that would be ignored are refused
    (["--ar", "--threshold", "0.5", "--dual_cache"],
     "--threshold, --dual_cache set block-diffusion decoding, which --ar does not run"),
    (["--ar", "--sub_block_size", "4"], "--sub_block_size set block-diffusion decoding"),
    (["--system", "be brief"], "--system is a chat turn: it needs --chat"),
    (["--top_p", "0.5"], r"--top_p and --seed shape sampling, which needs --temperature > 0"),
    (["--seed", "3"], "needs --temperature > 0"),
])
def test_errors_are_readable(model_dir, capsys, argv, message):
  code, _, err = _run(capsys, "--model", model_dir, "--prompt", "x", *argv)
  assert code == 2 and re.search(message, err), err


def test_model_without_prompt_is_an_error(model_dir, capsys):
  code, _, err = _run(capsys, "--model", model_dir)
  assert code == 2 and "--prompt or --prompts_file is required with --model" in err, err


def test_demo_mode_names_the_missing_bundle(monkeypatch, tmp_path, capsys):
  from fdllm_jax import demo
  monkeypatch.setattr(demo, "FAST_DLLM_DIR", str(tmp_path / "fast_dllm"))
  code, _, err = _run(capsys)
  assert code == 2 and "no demo model in" in err and "build_demo.sh" in err, err


def test_token_pieces_rebuild_the_text():
  tok = fdllm_jax.load_tokenizer(tokenizer_lib.qwen25_tokenizer_dir())
  ids = tok.encode("Grüße, 世界! ∑x²")
  pieces = viz.token_pieces(tok, ids)
  assert "".join(pieces) == tok.decode(ids) and len(pieces) == len(ids)
  text = viz.render_steps_ansi(tok, ids, list(range(1, len(ids) + 1)), legend=False)
  assert re.sub(r"\x1b\[[0-9;]*m", "", text) == tok.decode(ids)


def test_a_model_not_trained_for_block_diffusion_gets_a_warning(model_dir, capsys):
  from fdllm_jax import demo
  common = ["--prompt", "x", "--max_new_tokens", "4", "--progress", "never"]
  code, _, err = _run(capsys, "--model", demo.AR_BASE_DIR, *common)
  assert code == 0 and "is a qwen2 model, not trained for block diffusion" in err, err
  for argv in (["--model", demo.AR_BASE_DIR, "--ar"], ["--model", model_dir]):
    code, _, err = _run(capsys, *argv, *common)
    assert code == 0 and "warning" not in err, err


def test_demo_mode_refuses_flags_it_would_ignore(capsys):
  for flag in ("--tokenizer", "--system"):
    code, _, err = _run(capsys, flag, "x")
    assert code == 2 and f"{flag} needs --model" in err, err
