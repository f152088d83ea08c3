"""Qwen2-family decoder (Qwen2, Qwen2.5, Fast_dLLM_Qwen, Llama) in Flax NNX.

One call serves training and decoding::

    logits_BxTxV, cache = model(tokens_BxT, positions_BxT, mask=masks.BlockCausal(32),
                                cache=cache, write_start=start, kv_lengths=lengths)

Without a cache, the T tokens attend to each other through ``mask`` (query and key indices
0..T-1). With a cache, their keys/values are first written to slots ``write_start + [0, T)``
and the queries (indices ``write_start + t``) attend to every slot ``< kv_lengths`` that
``mask`` allows; the updated cache is returned and the caller decides what it commits.

Numerics follow the Hugging Face implementation: parameters and activations in the parameter
dtype (float32 or bfloat16), RMSNorm statistics, RoPE angles and softmax in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fdllm_jax import attention as attention_lib
from fdllm_jax import cache as cache_lib
from fdllm_jax import masks as masks_lib
from fdllm_jax.config import ModelConfig

_INIT_STD = 0.02  # transformers' initializer_range default for Qwen2 and Llama


class Dense(nnx.Linear):
  """``nnx.Linear`` (same parameters) applied to the tokens flattened to one matrix.

  A [B, T, D] input contracts as one [B*T, D] matmul either way, but XLA:CPU lays out the
  backward of the 3-D form with transposing copies (a quarter of the demo's stage-2 step in a
  profile). Flattened, that step took 1.9 s instead of 2.44 s on 2 cores, the AR step 0.38 s
  instead of 0.48 s (``benchmarks/train_speed.py`` before and after, separate processes).
  The reshapes are free on every backend.
  """

  def __call__(self, x):
    lead = x.shape[:-1]
    return super().__call__(x.reshape(-1, x.shape[-1])).reshape(*lead, -1)


def _dense(in_dim, out_dim, *, bias, dtype, rngs):
  return Dense(in_dim, out_dim, use_bias=bias, dtype=dtype, param_dtype=dtype,
               kernel_init=nnx.initializers.normal(_INIT_STD), rngs=rngs)


class RMSNorm(nnx.Module):
  """Root-mean-square norm with float32 statistics, scaled in the input dtype (as HF)."""

  def __init__(self, dim: int, eps: float, *, dtype):
    self.weight = nnx.Param(jnp.ones((dim,), dtype))
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.weight[...] * (x32 * inv_rms).astype(x.dtype)


def rope_tables(positions_BxT, head_dim: int, theta: float, dtype):
  """cos, sin [B, T, head_dim] for rotate-half RoPE; angles computed in float32."""
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  inv_freq = 1.0 / (theta ** exponents)
  angles = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x_BxTxHxD, cos_BxTxD, sin_BxTxD):
  half = x_BxTxHxD.shape[-1] // 2
  rotated = jnp.concatenate([-x_BxTxHxD[..., half:], x_BxTxHxD[..., :half]], axis=-1)
  return x_BxTxHxD * cos_BxTxD[:, :, None] + rotated * sin_BxTxD[:, :, None]


class Attention(nnx.Module):
  """Grouped-query self-attention with optional q/k/v bias and an optional KV cache."""

  def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
    d, hd = config.hidden_size, config.head_dim
    self.num_heads, self.num_kv_heads, self.head_dim = (
        config.num_attention_heads, config.num_key_value_heads, hd)
    bias = config.attention_bias
    self.q_proj = _dense(d, self.num_heads * hd, bias=bias, dtype=dtype, rngs=rngs)
    self.k_proj = _dense(d, self.num_kv_heads * hd, bias=bias, dtype=dtype, rngs=rngs)
    self.v_proj = _dense(d, self.num_kv_heads * hd, bias=bias, dtype=dtype, rngs=rngs)
    self.o_proj = _dense(self.num_heads * hd, d, bias=False, dtype=dtype, rngs=rngs)

  def __call__(self, x_BxTxD, cos, sin, *, mask, layer_kv, write_start, kv_lengths_B,
               implementation):
    batch, num_tokens, _ = x_BxTxD.shape
    q = self.q_proj(x_BxTxD).reshape(batch, num_tokens, self.num_heads, self.head_dim)
    k = self.k_proj(x_BxTxD).reshape(batch, num_tokens, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x_BxTxD).reshape(batch, num_tokens, self.num_kv_heads, self.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if layer_kv is None:
      out = attention_lib.attention(q, k, v, mask=mask, implementation=implementation)
    else:
      cached_k, cached_v = layer_kv
      k = cache_lib.write(cached_k, k, write_start)
      v = cache_lib.write(cached_v, v, write_start)
      q_offset_B = jnp.broadcast_to(write_start, (batch,))
      out = attention_lib.attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask,
                                    q_offset_B=q_offset_B, kv_lengths_B=kv_lengths_B,
                                    implementation=implementation)
      layer_kv = (k, v)
    return self.o_proj(out.reshape(batch, num_tokens, -1)), layer_kv


class MLP(nnx.Module):
  """SwiGLU feed-forward."""

  def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
    d, f = config.hidden_size, config.intermediate_size
    self.gate_proj = _dense(d, f, bias=False, dtype=dtype, rngs=rngs)
    self.up_proj = _dense(d, f, bias=False, dtype=dtype, rngs=rngs)
    self.down_proj = _dense(f, d, bias=False, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):

  def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
    self.self_attn = Attention(config, dtype=dtype, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
    self.mlp = MLP(config, dtype=dtype, rngs=rngs)

  def __call__(self, x, cos, sin, **attention_kwargs):
    attn_out, layer_kv = self.self_attn(self.input_layernorm(x), cos, sin, **attention_kwargs)
    x = x + attn_out
    return x + self.mlp(self.post_attention_layernorm(x)), layer_kv


class Transformer(nnx.Module):
  """The decoder with its LM head. Parameter paths mirror the HF names (see checkpoints.py)."""

  def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None,
               remat: bool = False):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    self.config = config
    self.dtype = jnp.dtype(dtype)
    self.remat = remat
    self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype,
                                  param_dtype=dtype,
                                  embedding_init=nnx.initializers.normal(_INIT_STD), rngs=rngs)
    self.layers = nnx.List([DecoderLayer(config, dtype=dtype, rngs=rngs)
                            for _ in range(config.num_hidden_layers)])
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
    if not config.tie_word_embeddings:
      self.lm_head = _dense(config.hidden_size, config.vocab_size, bias=False, dtype=dtype,
                            rngs=rngs)

  def __call__(self, tokens_BxT, positions_BxT=None, *, mask=masks_lib.Causal(),
               cache: cache_lib.KVCache | None = None, write_start=None, kv_lengths=None,
               attention_impl: str | None = None, return_hidden: bool = False):
    """Runs the decoder. Returns ``(logits_BxTxV or hidden_BxTxD, cache or None)``.

    Args:
      tokens_BxT: int32 token ids.
      positions_BxT: RoPE positions; default ``arange(T)`` (plus ``write_start`` with a cache).
      mask: a ``fdllm_jax.masks`` mask over key-sequence indices.
      cache: optional KVCache; when given, K/V are written at ``write_start`` and returned.
      write_start: scalar or int32[B], first slot written (default ``cache.lengths``).
      kv_lengths: int32[B], number of visible slots (default ``write_start + T``).
      attention_impl: attention implementation name (see ``fdllm_jax.attention``).
      return_hidden: return final-norm hidden states instead of logits (apply ``logits()``).
    """
    batch, num_tokens = tokens_BxT.shape
    if cache is not None:
      write_start = cache.lengths if write_start is None else jnp.asarray(write_start, jnp.int32)
      if kv_lengths is None:
        kv_lengths = jnp.broadcast_to(write_start + num_tokens, (batch,))
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32), (batch, num_tokens))
      if cache is not None:
        positions_BxT = positions_BxT + jnp.reshape(write_start, (-1, 1))
    cos, sin = rope_tables(positions_BxT, self.config.head_dim, self.config.rope_theta, self.dtype)
    x = self.embed_tokens(tokens_BxT)

    def run_layer(layer, x, layer_kv, write_start, kv_lengths):
      return layer(x, cos, sin, mask=mask, layer_kv=layer_kv, write_start=write_start,
                   kv_lengths_B=kv_lengths, implementation=attention_impl)

    if self.remat:  # recompute activations in the backward pass, one layer at a time
      run_layer = nnx.remat(run_layer)
    new_keys, new_values = [], []
    for i, layer in enumerate(self.layers):
      layer_kv = None if cache is None else (cache.keys[i], cache.values[i])
      x, layer_kv = run_layer(layer, x, layer_kv, write_start, kv_lengths)
      if layer_kv is not None:
        new_keys.append(layer_kv[0])
        new_values.append(layer_kv[1])
    hidden = self.norm(x)
    if cache is not None:
      cache = cache.replace(keys=tuple(new_keys), values=tuple(new_values))
    return (hidden if return_hidden else self.logits(hidden)), cache

  def logits(self, hidden_BxTxD):
    """LM head (tied to the embedding when the config says so), in the parameter dtype."""
    if self.config.tie_word_embeddings:
      return self.embed_tokens.attend(hidden_BxTxD)
    return self.lm_head(hidden_BxTxD)
