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


def test_rope_theta_inside_rope_scaling_wins_as_in_transformers():
  """transformers 5's reading, which we follow whatever version is installed (4 warns about
  the key and keeps the top-level theta)."""
  import transformers
  if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("transformers 4 ignores a rope_theta inside rope_scaling; we read it as 5 does")
  raw = _qwen_dict(rope_theta=1e4, rope_scaling={"rope_type": "default", "rope_theta": 5e5})
  raw.pop("rope_parameters")
  expected = transformers.Qwen2Config(**raw).rope_parameters["rope_theta"]
  assert ModelConfig.from_hf_dict(raw).rope_theta == expected == 5e5


def test_what_transformers_builds_as_a_plain_model_is_accepted():
  """swish is SiLU; use_sliding_window with max_window_layers >= layers slides no layer."""
  swish = ModelConfig.from_hf_dict(_qwen_dict(hidden_act="swish"))
  assert swish == ModelConfig.from_hf_dict(_qwen_dict())
  raw = _qwen_dict(use_sliding_window=True, sliding_window=8, max_window_layers=2)
  raw.pop("layer_types")
  assert ModelConfig.from_hf_dict(raw).num_hidden_layers == 2
  none_kv = _qwen_dict(num_key_value_heads=None)
  assert ModelConfig.from_hf_dict(none_kv).num_key_value_heads == 4


def test_missing_max_positions_take_the_family_default():
  import transformers
  for family, cls in (("qwen2", transformers.Qwen2Config), ("llama", transformers.LlamaConfig)):
    raw = hf_models.tiny_config(family).to_dict()
    raw.pop("max_position_embeddings")
    assert (ModelConfig.from_hf_dict(raw).max_position_embeddings
            == cls().max_position_embeddings), family


def test_bd_size_survives_the_round_trip_of_every_family():
  for family in ("qwen2", "llama"):
    config = ModelConfig.from_hf_dict(dict(hf_models.tiny_config(family).to_dict(), bd_size=16))
    assert ModelConfig.from_hf_dict(config.to_hf_dict()).bd_size == 16, family


def test_fast_dllm_keeps_bd_size_and_round_trips():
  raw = _qwen_dict(model_type="Fast_dLLM_Qwen", bd_size=32, auto_map={"AutoConfig": "x.Y"})
  config = ModelConfig.from_hf_dict(raw)
  assert config.bd_size == 32
  again = ModelConfig.from_hf_dict(config.to_hf_dict())
  assert again == config
  # transformers builds a Fast_dLLM_Qwen model from the reference's code, found by auto_map
  assert config.to_hf_dict()["auto_map"]["AutoModelForCausalLM"].endswith(
      "--modeling.Fast_dLLM_QwenForCausalLM")


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
    (dict(use_sliding_window=True, sliding_window=8, max_window_layers=1, layer_types=None),
     r"layers \[1\] are \['sliding_attention'\]"),
    (dict(layer_types=["full_attention", "sliding_attention"]), "sliding_attention"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(num_key_value_heads=3), "multiple of num_key_value_heads=3"),
    (dict(num_key_value_heads=0), "num_key_value_heads must be a positive integer; got 0"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5 is not implemented"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                           "partial_rotary_factor": 0.5}), "partial_rotary_factor=0.5"),
])
def test_unsupported_features_are_refused(changes, message):
  with pytest.raises(ValueError, match=message):
    ModelConfig.from_hf_dict(_qwen_dict(**changes))


def test_missing_field_is_named():
  raw = _qwen_dict()
  del raw["intermediate_size"]
  with pytest.raises(ValueError, match="'intermediate_size' is missing"):
    ModelConfig.from_hf_dict(raw)
