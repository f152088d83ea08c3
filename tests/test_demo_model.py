"""The bundled demo checkpoints: they load, and each decodes a held-out problem correctly.

The AR base decodes with ``generate_ar`` and the adapted Fast-dLLM v2 model with ``generate``
(threshold 0.9, with and without DualCache): both engines on real trained weights.
"""

import json
import os

import pytest

from fdllm_jax import demo
from fdllm_jax.demo import task

pytestmark = pytest.mark.skipif(
    not os.path.isfile(os.path.join(demo.FAST_DLLM_DIR, "model.safetensors")),
    reason="the bundled demo checkpoints are not in this checkout (bash scripts/build_demo.sh)")

MAX_NEW_TOKENS = 128


@pytest.fixture(scope="module")
def tokenizer():
  from fdllm_jax import load_tokenizer
  return load_tokenizer(demo.FAST_DLLM_DIR)


@pytest.fixture(scope="module")
def prompt(tokenizer):
  assert task.split_of(demo.DEMO_QUESTION) == "test", "the demo question must be held out"
  return tokenizer.apply_chat_template([{"role": "user", "content": demo.DEMO_QUESTION}])


def _stop_id(tokenizer):
  return tokenizer.hf.convert_tokens_to_ids("<|im_end|>")


def test_configs_and_size():
  with open(os.path.join(demo.AR_BASE_DIR, "config.json")) as f:
    ar = json.load(f)
  with open(os.path.join(demo.FAST_DLLM_DIR, "config.json")) as f:
    adapted = json.load(f)
  assert ar["model_type"] == "qwen2"
  assert adapted["model_type"] == "Fast_dLLM_Qwen" and adapted["bd_size"] == 32
  total = sum(os.path.getsize(os.path.join(d, n)) for d in (demo.AR_BASE_DIR, demo.FAST_DLLM_DIR)
              for n in os.listdir(d))
  assert total <= 20 * 2**20


def test_ar_base_solves_a_held_out_problem(tokenizer, prompt):
  from fdllm_jax import load_model
  from fdllm_jax.generate import generate_ar
  model = load_model(demo.AR_BASE_DIR)
  out = generate_ar(model, [prompt], max_new_tokens=MAX_NEW_TOKENS, stop_ids=(_stop_id(tokenizer),))
  text = tokenizer.decode(out.tokens[0])
  assert out.finished[0], text
  assert task.extract_answer(text) == demo.DEMO_ANSWER, text


@pytest.mark.parametrize("dual_cache", [False, True])
def test_fast_dllm_solves_a_held_out_problem(tokenizer, prompt, dual_cache):
  from fdllm_jax import load_model
  from fdllm_jax.generate import DecodeConfig, generate
  model = load_model(demo.FAST_DLLM_DIR)
  config = DecodeConfig(threshold=0.9, use_dual_cache=dual_cache, mask_id=tokenizer.mask_id,
                        stop_ids=(_stop_id(tokenizer),), max_new_tokens=MAX_NEW_TOKENS)
  out = generate(model, [prompt], config)
  text = tokenizer.decode(out.tokens[0])
  assert out.finished[0], text
  assert task.extract_answer(text) == demo.DEMO_ANSWER, text
  assert out.tokens_per_forward > 1.5  # parallel decoding really happened


def test_transformers_tokenizes_both_as_trained(tokenizer, prompt):
  """transformers alone reads the bundled tokenizers as the models were trained: the adapted
  model's through AutoTokenizer (as the reference's code loads it), the AR base's through
  PreTrainedTokenizerFast (for a qwen2 config.json, transformers 5's AutoTokenizer rebuilds
  Qwen2's pre-tokenizer, which splits numbers into digits). Both render the chat prompt to
  the ids our tokenizer gives."""
  from transformers import AutoTokenizer, PreTrainedTokenizerFast

  messages = [{"role": "user", "content": demo.DEMO_QUESTION}]
  for hf in (AutoTokenizer.from_pretrained(demo.FAST_DLLM_DIR, trust_remote_code=False),
             PreTrainedTokenizerFast.from_pretrained(demo.AR_BASE_DIR)):
    rendered = hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    assert list(rendered["input_ids"]) == prompt
    assert hf.convert_tokens_to_ids("|<MASK>|") == tokenizer.mask_id


def test_transformers_loads_both(tokenizer, prompt):
  """The AR base through AutoModelForCausalLM; the adapted weights through Qwen2ForCausalLM
  (its own class needs the reference's remote code). Greedy logits match ours."""
  torch = pytest.importorskip("torch")
  import numpy as np
  from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

  from fdllm_jax import compute_logits, load_model
  ids = prompt
  for directory, loader in ((demo.AR_BASE_DIR, AutoModelForCausalLM),
                            (demo.FAST_DLLM_DIR, Qwen2ForCausalLM)):
    hf = loader.from_pretrained(directory, torch_dtype=torch.float32)
    with torch.no_grad():
      hf_logits = hf(torch.tensor([ids])).logits[0].numpy()
    ours = np.asarray(compute_logits(load_model(directory), [ids])[0])
    np.testing.assert_allclose(ours[:len(ids)], hf_logits, atol=2e-4, rtol=2e-4)


def test_decode_cli_default_runs_both_demo_models(capsys):
  """`python decode.py` with no arguments: both engines answer the built-in problem."""
  import re
  import sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import decode

  assert decode.main([]) == 0
  out = capsys.readouterr().out
  assert out.count(f"answer {demo.DEMO_ANSWER}:") == 2, out
  assert re.search(r"Fast-dLLM v2 \(threshold 0\.9\) .* tokens/s, +[\d.]+ tokens/forward", out), out
  # the AR engine spends one forward per token, the stop token's included
  assert re.search(r"AR base \(generate_ar\) .* 0\.9\d tokens/forward", out), out
  assert "speed-up over AR:" in out


def test_decode_cli_demo_reads_a_prompts_file_and_writes_both_engines(capsys, tmp_path):
  """The demo mode with --prompts_file / --output: one JSON line per question, both engines."""
  import json
  import sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import decode

  prompts = tmp_path / "questions.jsonl"
  chat = [{"role": "user", "content": demo.DEMO_QUESTION}]
  prompts.write_text(json.dumps({"prompt": demo.DEMO_QUESTION}) + "\n"
                     + json.dumps({"messages": chat}) + "\n")
  output = tmp_path / "answers.jsonl"
  assert decode.main(["--prompts_file", str(prompts), "--output", str(output)]) == 0
  out = capsys.readouterr().out
  assert "wrote 2 results" in out and "Q:" not in out and "speed-up over AR:" in out, out
  rows = [json.loads(line) for line in output.read_text().splitlines()]
  assert [row["prompt"] for row in rows] == [demo.DEMO_QUESTION, chat]
  for row in rows:
    for engine in ("fast_dllm", "ar_base"):
      result = row[engine]
      assert result["answer"] == demo.DEMO_ANSWER and result["finished"], result
      assert f"\\boxed{{{demo.DEMO_ANSWER}}}" in result["text"]
  # the same question decodes to the same text either way it was given
  assert rows[0]["fast_dllm"] == rows[1]["fast_dllm"] and rows[0]["ar_base"] == rows[1]["ar_base"]
