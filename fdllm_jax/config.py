"""ModelConfig: the static description of a Qwen2-family transformer, to and from HF config.json."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = ("qwen2", "Fast_dLLM_Qwen", "llama")

# HF fields that only matter to training frameworks or generation defaults; ignored on purpose.
_IGNORED_ROPE_TYPES = (None, "default")
# transformers' names of SiLU (its ACT2FN maps "swish" to the same nn.SiLU).
_SILU_NAMES = ("silu", "swish")
# The reference's PyTorch code for Fast_dLLM_Qwen, in the hub repository of the released 1.5B
# model (transformers' ``repo--module.Class`` form): written into exported configs so that
# ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` can build the model.
REFERENCE_REPO = "Efficient-Large-Model/Fast_dLLM_v2_1.5B"
REFERENCE_AUTO_MAP = {
    "AutoConfig": f"{REFERENCE_REPO}--configuration.Fast_dLLM_QwenConfig",
    "AutoModel": f"{REFERENCE_REPO}--modeling.Fast_dLLM_QwenModel",
    "AutoModelForCausalLM": f"{REFERENCE_REPO}--modeling.Fast_dLLM_QwenForCausalLM",
}
# transformers' max_position_embeddings when config.json has none.
_DEFAULT_MAX_POSITIONS = {"llama": 2048, "qwen2": 32768, "Fast_dLLM_Qwen": 32768}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A Qwen2 / Llama decoder. Frozen and hashable so it can be a static jit argument."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1_000_000.0
  max_position_embeddings: int = 32768
  tie_word_embeddings: bool = False
  attention_bias: bool = True  # bias on q/k/v projections (Qwen2 yes, Llama no)
  model_type: str = "qwen2"
  bd_size: int | None = None  # Fast-dLLM v2 block size, kept from the checkpoint
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"ModelConfig.{name} must be a positive integer; got {value!r}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"num_attention_heads={self.num_attention_heads} must be a multiple of "
          f"num_key_value_heads={self.num_key_value_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE; got {self.head_dim}")
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"model_type {self.model_type!r} is not supported; supported: "
                       f"{SUPPORTED_MODEL_TYPES}")
    if self.bd_size is not None and (not isinstance(self.bd_size, int) or self.bd_size < 1):
      raise ValueError(f"bd_size must be a positive integer or None; got {self.bd_size!r}")

  @property
  def num_params(self) -> int:
    """Parameter count (embedding counted once when tied)."""
    d, h, kv, hd = self.hidden_size, self.num_attention_heads, self.num_key_value_heads, self.head_dim
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d
    if self.attention_bias:
      attn += h * hd + 2 * kv * hd
    mlp = 3 * d * self.intermediate_size
    per_layer = attn + mlp + 2 * d
    embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
    return self.num_hidden_layers * per_layer + embed + d

  @classmethod
  def from_hf_dict(cls, raw: Mapping[str, Any], *, source: str = "config") -> "ModelConfig":
    """Builds a config from the dict of an HF ``config.json``; unsupported features raise."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"{source}: model_type {model_type!r} is not supported; supported: "
                       f"{SUPPORTED_MODEL_TYPES}")
    _reject_unsupported_features(raw, source)
    try:
      heads = int(raw["num_attention_heads"])
      hidden = int(raw["hidden_size"])
      head_dim = raw.get("head_dim") or hidden // heads
      if raw.get("head_dim") is None and hidden % heads:
        raise ValueError(f"{source}: hidden_size={hidden} is not divisible by "
                         f"num_attention_heads={heads} and no head_dim is given")
      eos = raw.get("eos_token_id")
      return cls(
          vocab_size=int(raw["vocab_size"]),
          hidden_size=hidden,
          intermediate_size=int(raw["intermediate_size"]),
          num_hidden_layers=int(raw["num_hidden_layers"]),
          num_attention_heads=heads,
          num_key_value_heads=_num_key_value_heads(raw, heads),
          head_dim=int(head_dim),
          rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
          rope_theta=float(_rope_theta(raw)),
          max_position_embeddings=int(raw.get("max_position_embeddings",
                                              _DEFAULT_MAX_POSITIONS[model_type])),
          tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
          attention_bias=_attention_bias(raw, model_type, source),
          model_type=model_type,
          bd_size=raw.get("bd_size"),
          bos_token_id=raw.get("bos_token_id"),
          eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
          pad_token_id=raw.get("pad_token_id"),
      )
    except KeyError as e:
      raise ValueError(f"{source}: required field {e.args[0]!r} is missing") from None

  @classmethod
  def from_json_file(cls, path: str | os.PathLike) -> "ModelConfig":
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"no config.json at {path}")
    with open(path) as f:
      try:
        raw = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return cls.from_hf_dict(raw, source=path)

  def to_hf_dict(self) -> dict[str, Any]:
    """The HF ``config.json`` dict, loadable by transformers (and the reference's remote code)."""
    is_llama = self.model_type == "llama"
    out: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM" if is_llama else "Qwen2ForCausalLM"],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "num_key_value_heads": self.num_key_value_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,  # transformers 4 and the reference's remote code
        "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},  # 5
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
    }
    if is_llama:
      out["attention_bias"] = False
      out["mlp_bias"] = False
    if self.model_type == "Fast_dLLM_Qwen":
      out["architectures"] = ["Fast_dLLM_QwenForCausalLM"]
      out["auto_map"] = dict(REFERENCE_AUTO_MAP)
      out["bd_size"] = self.bd_size or 32  # the reference's default
    elif self.bd_size is not None:
      out["bd_size"] = self.bd_size
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
      value = getattr(self, name)
      if value is not None:
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def _rope_theta(raw: Mapping[str, Any]) -> float:
  # transformers 5 reads rope_scaling, when there is one, as rope_parameters; a theta there
  # wins over the top-level one (transformers 4's place).
  params = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
  if "rope_theta" in params:
    return params["rope_theta"]
  return raw.get("rope_theta", 10000.0)  # transformers' default for both families


def _num_key_value_heads(raw: Mapping[str, Any], heads: int) -> int:
  value = raw.get("num_key_value_heads")
  return heads if value is None else int(value)  # None: multi-head attention, as transformers


def _other_than_full_attention(raw: Mapping[str, Any]) -> dict[int, str]:
  """The layers transformers' Qwen2 builds with another attention than full, by type."""
  layer_types = raw.get("layer_types")
  if layer_types:
    return {i: t for i, t in enumerate(layer_types) if t != "full_attention"}
  if raw.get("model_type") == "llama" or not raw.get("use_sliding_window"):
    return {}
  if raw.get("sliding_window", 4096) is None:
    return {}
  first = int(raw.get("max_window_layers", 28))  # Qwen2Config's defaults
  return {i: "sliding_attention" for i in range(first, int(raw.get("num_hidden_layers", 0)))}


def _reject_unsupported_features(raw: Mapping[str, Any], source: str) -> None:
  for key in ("rope_scaling", "rope_parameters"):
    params = raw.get(key) or {}
    rope_type = params.get("rope_type", params.get("type"))
    if rope_type not in _IGNORED_ROPE_TYPES:
      raise ValueError(f"{source}: {key} of type {rope_type!r} is not implemented; only plain "
                       f"RoPE (rope_type 'default') is supported")
  for key in ("rope_scaling", "rope_parameters"):
    factor = (raw.get(key) or {}).get("partial_rotary_factor")
    if factor not in (None, 1, 1.0):
      raise ValueError(f"{source}: {key} partial_rotary_factor={factor!r} is not implemented; "
                       f"RoPE rotates the whole head (1.0)")
  if raw.get("partial_rotary_factor") not in (None, 1, 1.0):
    raise ValueError(f"{source}: partial_rotary_factor={raw['partial_rotary_factor']!r} is not "
                     f"implemented; RoPE rotates the whole head (1.0)")
  other = _other_than_full_attention(raw)
  if other:
    raise ValueError(f"{source}: layers {sorted(other)} are {sorted(set(other.values()))} "
                     f"(from use_sliding_window / max_window_layers / layer_types), which is not "
                     f"implemented; only 'full_attention' layers")
  act = raw.get("hidden_act", "silu")
  if act not in _SILU_NAMES:
    raise ValueError(f"{source}: hidden_act={act!r} is not implemented; only 'silu' (SwiGLU), "
                     f"also called 'swish'")
  if raw.get("mlp_bias"):
    raise ValueError(f"{source}: mlp_bias=true is not implemented")


def _attention_bias(raw: Mapping[str, Any], model_type: str, source: str) -> bool:
  if model_type == "llama":
    if raw.get("attention_bias"):
      raise ValueError(f"{source}: Llama attention_bias=true (bias on q/k/v *and* o_proj) is not "
                       f"implemented")
    return False
  if raw.get("attention_bias") is False:
    raise ValueError(f"{source}: Qwen2 models always have q/k/v bias; attention_bias=false is "
                     f"not a Qwen2 model")
  return True
