"""Builders of tiny random transformers models for parity tests (torch CPU)."""

from __future__ import annotations

import numpy as np


def tiny_config(model_type="qwen2", *, vocab_size=517, hidden_size=96, intermediate_size=160,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=None,
                tie_word_embeddings=False, rope_theta=10000.0, **extra):
  """A transformers config of ``model_type`` ('qwen2' or 'llama') with small odd sizes."""
  import transformers
  cls = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig}[model_type]
  kwargs = dict(vocab_size=vocab_size, hidden_size=hidden_size,
                intermediate_size=intermediate_size, num_hidden_layers=num_hidden_layers,
                num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
                tie_word_embeddings=tie_word_embeddings, rms_norm_eps=1e-6,
                max_position_embeddings=4096, **extra)
  if head_dim is not None:
    kwargs["head_dim"] = head_dim
  config = cls(rope_theta=rope_theta, **kwargs)  # transformers 4 reads this
  config.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}  # and 5 this
  return config


def random_torch_model(config, seed=0, bias_scale=0.5):
  """A transformers causal LM with random weights; q/k/v biases made non-trivial."""
  import torch
  import transformers
  torch.manual_seed(seed)
  cls = (transformers.Qwen2ForCausalLM if config.model_type == "qwen2"
         else transformers.LlamaForCausalLM)
  model = cls(config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith("bias"):
        param.normal_(0.0, bias_scale)
      elif "norm" in name:
        param.uniform_(0.5, 1.5)  # non-unit norms catch a missing scale
  return model


def save_random_model(directory, config, seed=0):
  model = random_torch_model(config, seed)
  model.save_pretrained(directory, safe_serialization=True)
  return model


def torch_logits(model, ids, attention_mask_4d=None):
  """float32 numpy logits of the torch model; optional boolean 4-D mask [B, 1, T, T]."""
  import torch
  with torch.no_grad():
    kwargs = {}
    if attention_mask_4d is not None:
      kwargs["attention_mask"] = torch.from_numpy(np.asarray(attention_mask_4d))
    out = model(torch.from_numpy(np.asarray(ids, np.int64)), **kwargs)
  return out.logits.float().numpy()
