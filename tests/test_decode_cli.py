"""decode.py on a tiny random model with the real Qwen2.5 tokenizer (MASK = 151665)."""

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
  code, _, err = _run(capsys, *common, "--max_batch_size", "0")
  assert code == 2 and "max_batch_size must be None or an integer >= 1; got 0" in err, err

@pytest.mark.parametrize("argv,message", [
    (["--threshold", "1.5"], r"threshold must be in \(0, 1\]; got 1.5"),
    (["--gin_param", "DecodeConfig.no_such_field = 1"], "bad gin configuration"),
    (["--gin_file", "/nonexistent.gin"], "does not exist"),
])
def test_errors_are_readable(model_dir, capsys, argv, message):
  code, _, err = _run(capsys, "--model", model_dir, "--prompt", "x", *argv)
  assert code == 2 and re.search(message, err), err


def test_model_without_prompt_is_an_error(model_dir, capsys):
  code, _, err = _run(capsys, "--model", model_dir)
  assert code == 2 and "--prompt is required with --model" in err, err


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
