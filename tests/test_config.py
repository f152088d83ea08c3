"""ModelConfig from HF config dicts: supported families, and clear refusals."""

import pytest

from fdllm_jax.config import ModelConfig
from tests import hf_models


def _qwen_dict(**changes):
  raw = hf_models.tiny_config("qwen2").to_dict()
  raw.update(changes)
  return raw


def test_qwen2_from_transformers_dict():
  config = ModelConfig.from_hf_dict(_qwen_dict())
  assert (config.hidden_size, config.head_dim, config.num_key_value_heads) == (96, 24, 2)
  assert config.attention_bias and config.rope_theta == 10000.0


def test_rope_theta_top_level_or_in_rope_parameters():
  top = _qwen_dict(rope_theta=1e6)
  top.pop("rope_parameters")
  assert ModelConfig.from_hf_dict(top).rope_theta == 1e6
  nested = _qwen_dict(rope_parameters={"rope_type": "default", "rope_theta": 5e5})
  assert ModelConfig.from_hf_dict(nested).rope_theta == 5e5


def test_fast_dllm_keeps_bd_size_and_round_trips():
  raw = _qwen_dict(model_type="Fast_dLLM_Qwen", bd_size=32, auto_map={"AutoConfig": "x.Y"})
  config = ModelConfig.from_hf_dict(raw)
  assert config.bd_size == 32
  again = ModelConfig.from_hf_dict(config.to_hf_dict())
  assert again == config


def test_llama_without_bias_and_explicit_head_dim():
  raw = hf_models.tiny_config("llama", head_dim=32).to_dict()
  config = ModelConfig.from_hf_dict(raw)
  assert not config.attention_bias and config.head_dim == 32
  assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config


def test_tied_and_untied_param_counts():
  tied = ModelConfig.from_hf_dict(_qwen_dict(tie_word_embeddings=True))
  untied = ModelConfig.from_hf_dict(_qwen_dict(tie_word_embeddings=False))
  assert untied.num_params - tied.num_params == 517 * 96


@pytest.mark.parametrize("changes,message", [
    (dict(model_type="mistral"), "model_type 'mistral' is not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}),
     "rope_parameters of type 'yarn' is not implemented"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}),
     "rope_scaling of type 'linear' is not implemented"),
    (dict(use_sliding_window=True), "sliding-window"),
    (dict(layer_types=["full_attention", "sliding_attention"]), "sliding_attention"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(num_key_value_heads=3), "multiple of num_key_value_heads=3"),
])
def test_unsupported_features_are_refused(changes, message):
  with pytest.raises(ValueError, match=message):
    ModelConfig.from_hf_dict(_qwen_dict(**changes))


def test_missing_field_is_named():
  raw = _qwen_dict()
  del raw["intermediate_size"]
  with pytest.raises(ValueError, match="'intermediate_size' is missing"):
    ModelConfig.from_hf_dict(raw)
