"""One attention entry point, several implementations.

``attention(q, k, v, mask=..., q_offset=..., kv_lengths=...)`` computes softmax attention with
grouped-query heads. Query ``t`` of row ``b`` has index ``q_offset[b] + t`` in the key sequence;
key ``s`` is visible when ``mask(q_index, s)`` holds and ``s < kv_lengths[b]``.

``implementation="xla"`` is the reference every other path is tested against: scores and
softmax in float32, probabilities cast to the value dtype before the second matmul (as the
Hugging Face eager path does).

The other implementations and what they cover (``route(...)`` says which path a call takes):

* ``"xla_blocks"`` (the default on CPU): plain jnp like ``"xla"``, but a ``Training`` mask with
  T == S == ``mask.total_len`` and no cache (as for the block kernels below) is computed block
  by block (``xla_training_attention``): each query against its own block and the clean
  stream, never the dense [T, S] scores, of which the mask shows at most a quarter. Other masks
  run the xla reference itself (no warning: it is this implementation's definition).
* ``"pallas"``: the fused kernels of ``pallas_kernels``.
  - ``block_attention`` for ``Causal``, ``BlockCausal`` and ``Training`` masks without a cache:
    ``q_offset_B`` None (or a concrete all-zero array) and ``kv_lengths_B`` None; ``Training``
    also needs T == S == ``mask.total_len`` (2L, or 3L with two noisy streams). Differentiable
    (Pallas backward kernels).
  - ``window_attention`` for the decode step: ``Full()`` mask, at most 64 queries, with
    ``kv_lengths_B`` (or without: every key visible); ``q_offset_B`` is irrelevant to ``Full``.
    Forward only (decoding).
* ``"triton"``: the decode step through the hand-written Triton kernel (``jax_triton``, GPU
  only, imported on first use); the block masks go to the Pallas ``block_attention``, which
  itself lowers to Triton on GPU.
* ``"mosaic"``: the decode step through ``pallas_kernels.mosaic_window`` (wgmma on Hopper,
  Pallas' Mosaic GPU backend; bf16 / f16 with D a multiple of 64, other decode steps run the
  xla reference); the block masks (the cases "pallas" sends to ``block_attention``) through
  ``pallas_kernels.mosaic_block``, forward and backward on wgmma (bf16 / f16 with D a power of
  two >= 64; otherwise ``block_attention`` itself).
  Interpreted (CPU), both need JAX >= 0.11.
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")``: ``is_causal`` for a
  plain causal mask, ``key_value_seq_lengths`` for ``Full`` with lengths, a boolean [T, S] mask
  otherwise. On a backend without cuDNN (CPU) the same call runs with jax's ``"xla"``
  implementation, so the argument mapping stays testable. cuDNN takes only 16-bit inputs:
  float32 inputs use the xla reference.
* ``"splash"`` (TPU; the default there): ``fdllm_jax.splash``: splash attention without a cache,
  the Pallas TPU window kernel (``pallas_kernels.tpu_window``) with one; interpreted off TPU.

Sharding: under a mesh (``jax.set_mesh``; the trainer sets it) every kernel path runs inside
``jax.shard_map`` on each device's shard (``fdllm_jax.sharding.shard_attention``: batch over
``data`` x ``fsdp``, heads over ``tensor``), since XLA cannot partition a kernel call; the xla
path and cudnn (which carries its own partitioning rules) are left to XLA.

Every combination a kernel does not cover (e.g. a block-causal window against a cache with a
traced ``q_offset_B``, ``Explicit`` masks) runs the xla reference instead, with a one-time
``UserWarning`` naming the combination: nothing is computed differently, only slower. (The
splash path's own fallbacks, listed in ``fdllm_jax.splash.window_attention``, do not warn.)

A query that sees no key at all (a row with ``kv_lengths`` 0: padding, whose output is
discarded) gets the mean of the values from the xla reference and cudnn (a finite mask value,
as the Hugging Face eager path) and zeros from the Pallas and TPU window kernels. Every other
query gets the same result from every path.

Interpret mode: Pallas kernels cannot be compiled for the CPU; ``interpret=None`` (the
default) runs them in Pallas' interpreter whenever the default backend is not a GPU, which
is how the tests check them on CPU. Pass ``interpret=True/False`` to force either.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from fdllm_jax import masks as masks_lib
from fdllm_jax import sharding

Implementation = Literal["xla", "xla_blocks", "pallas", "triton", "mosaic", "cudnn", "splash"]
IMPLEMENTATIONS = ("xla", "xla_blocks", "pallas", "triton", "mosaic", "cudnn", "splash")

# Finite, so a query with no visible key yields a uniform average instead of NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def default_implementation() -> str:
  """The implementation used when none is named: the reference until a kernel is faster.

  CPU: "xla_blocks" (kernels only run interpreted there): the xla reference, with the
  training mask block by block (the demo's stage-2 step 1.20x faster on 2 cores;
  ``benchmarks/train_speed.py --attention_impls xla_blocks,xla``). GPU: "pallas", measured
  faster than xla
  and cudnn on every shape of ``benchmarks/gpu_attention.py`` on an H200 (training mask
  5-15x xla, 1.6-4x cudnn; decode windows 1.4-2.9x xla); float32 inputs still take "xla"
  by default, since Pallas GPU dots run in TF32. TPU: "splash" (``fdllm_jax.splash``).
  """
  backend = jax.default_backend()
  if backend == "tpu":
    return "splash"
  if backend == "gpu":
    return "pallas"
  return "xla_blocks"


def visibility(mask, num_queries: int, num_keys: int, q_offset_B=None, kv_lengths_B=None):
  """Boolean [B or 1, T, S]: which keys each query may attend to."""
  q_idx_T = jnp.arange(num_queries, dtype=jnp.int32)
  k_idx_S = jnp.arange(num_keys, dtype=jnp.int32)
  if q_offset_B is None:
    q_idx_BxT = q_idx_T[None, :]
  else:
    q_idx_BxT = jnp.asarray(q_offset_B, jnp.int32)[:, None] + q_idx_T[None, :]
  allowed = mask(q_idx_BxT[:, :, None], k_idx_S[None, None, :])
  if allowed.ndim == 2:
    allowed = allowed[None]
  if kv_lengths_B is not None:
    allowed = allowed & _live_keys(kv_lengths_B, num_keys)[:, None, :]
  return allowed


def _live_keys(kv_lengths_B, num_keys: int):
  """Boolean [B, S]: the keys inside each row's length."""
  lengths_B = jnp.asarray(kv_lengths_B, jnp.int32)
  return jnp.arange(num_keys, dtype=jnp.int32)[None, :] < lengths_B[:, None]


def _without_stale_values(v_BxSxKxD, kv_lengths_B):
  """Zeros the value slots past each row's length (none without lengths).

  Those cache slots are stale (a previous step's or prompt's). Their attention weights are 0,
  but 0 * NaN is NaN: one bad value left there would poison every later query of the row.
  """
  if kv_lengths_B is None:
    return v_BxSxKxD
  live_BxS = _live_keys(kv_lengths_B, v_BxSxKxD.shape[1])
  return jnp.where(live_BxS[:, :, None, None], v_BxSxKxD, jnp.zeros((), v_BxSxKxD.dtype))


def xla_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, *, mask, q_offset_B=None,
                  kv_lengths_B=None, sm_scale=None):
  """Reference attention in plain jnp (any backend)."""
  batch, num_q, num_heads, head_dim = q_BxTxHxD.shape
  num_kv_heads = k_BxSxKxD.shape[2]
  group = num_heads // num_kv_heads
  scale = head_dim ** -0.5 if sm_scale is None else sm_scale
  q_BxTxKxGxD = q_BxTxHxD.reshape(batch, num_q, num_kv_heads, group, head_dim)
  scores = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxD, k_BxSxKxD,
                      preferred_element_type=jnp.float32) * scale
  allowed_BxTxS = visibility(mask, num_q, k_BxSxKxD.shape[1], q_offset_B, kv_lengths_B)
  scores = jnp.where(allowed_BxTxS[:, None, None], scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxKxD.dtype)
  v_BxSxKxD = _without_stale_values(v_BxSxKxD, kv_lengths_B)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v_BxSxKxD,
                   preferred_element_type=jnp.float32)
  return out.reshape(batch, num_q, num_heads, head_dim).astype(q_BxTxHxD.dtype)


def xla_training_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, *, mask: masks_lib.Training,
                           sm_scale=None):
  """``xla_attention`` under a ``Training`` mask over all its indices, block by block.

  Under that mask a query of any stream, block j, sees exactly two groups of keys: its own
  block (bidirectional) and the clean stream's blocks before j. So the scores come in two
  pieces, [T, block] against the own block and [T, L] against the clean stream (blocks
  before j visible), with one softmax across both: (block + L) / total_len of the dense
  entries (42% for x_t^A ++ x_t^B ++ x_0 at L = 4 blocks), the same precision rules as the
  reference (float32 scores, probabilities cast to the value dtype).
  """
  batch, num_q, num_heads, head_dim = q_BxTxHxD.shape
  num_kv_heads = k_BxSxKxD.shape[2]
  group = num_heads // num_kv_heads
  seq_len, block = mask.seq_len, mask.block_size
  if num_q != mask.total_len or k_BxSxKxD.shape[1] != mask.total_len:
    raise ValueError(f"xla_training_attention needs T == S == mask.total_len="
                     f"{mask.total_len}; got T={num_q}, S={k_BxSxKxD.shape[1]}")
  scale = head_dim ** -0.5 if sm_scale is None else sm_scale
  num_blocks = num_q // block  # over all streams
  clean_start = mask.num_noisy_streams * seq_len
  k_clean, v_clean = k_BxSxKxD[:, clean_start:], v_BxSxKxD[:, clean_start:]
  q_BxTxKxGxD = q_BxTxHxD.reshape(batch, num_q, num_kv_heads, group, head_dim)
  prefix = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxD, k_clean,
                      preferred_element_type=jnp.float32) * scale
  q_block_T = (jnp.arange(num_q) % seq_len) // block
  earlier_TxL = jnp.arange(seq_len)[None, :] // block < q_block_T[:, None]
  prefix = jnp.where(earlier_TxL, prefix, _MASK_VALUE)
  q_blocks = q_BxTxHxD.reshape(batch, num_blocks, block, num_kv_heads, group, head_dim)
  k_blocks = k_BxSxKxD.reshape(batch, num_blocks, block, num_kv_heads, head_dim)
  v_blocks = v_BxSxKxD.reshape(batch, num_blocks, block, num_kv_heads, head_dim)
  own = jnp.einsum("bjtkgd,bjskd->bkgjts", q_blocks, k_blocks,
                   preferred_element_type=jnp.float32) * scale
  own = own.reshape(batch, num_kv_heads, group, num_q, block)
  # One softmax over both pieces; the max only stabilises exp, so it carries no gradient.
  row_max = jax.lax.stop_gradient(jnp.maximum(prefix.max(-1, keepdims=True),
                                              own.max(-1, keepdims=True)))
  prefix, own = jnp.exp(prefix - row_max), jnp.exp(own - row_max)
  total = prefix.sum(-1, keepdims=True) + own.sum(-1, keepdims=True)
  prefix = (prefix / total).astype(v_BxSxKxD.dtype)
  own = (own / total).astype(v_BxSxKxD.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", prefix, v_clean, preferred_element_type=jnp.float32)
  own = own.reshape(batch, num_kv_heads, group, num_blocks, block, block)
  out_own = jnp.einsum("bkgjts,bjskd->bjtkgd", own, v_blocks,
                       preferred_element_type=jnp.float32)
  out = out + out_own.reshape(batch, num_q, num_kv_heads, group, head_dim)
  return out.reshape(batch, num_q, num_heads, head_dim).astype(q_BxTxHxD.dtype)


def attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, *, mask=masks_lib.Causal(), q_offset_B=None,
              kv_lengths_B=None, sm_scale=None, implementation: str | None = None,
              interpret: bool | None = None):
  """Grouped-query attention; see the module docstring for the index conventions.

  Args:
    q_BxTxHxD: queries, H a multiple of K.
    k_BxSxKxD, v_BxSxKxD: keys and values.
    mask: a mask of ``fdllm_jax.masks``.
    q_offset_B: int32[B], index of each row's first query in the key sequence (default 0).
    kv_lengths_B: int32[B], number of valid keys per row (default all S).
    sm_scale: softmax scale (default 1/sqrt(D)).
    implementation: "xla" (reference), "xla_blocks", "pallas", "triton", "mosaic", "cudnn" or
      "splash" (TPU); None picks the default for the backend. Combinations without a kernel
      run the xla reference (module docstring).
    interpret: Pallas interpreter on/off; None: on when the default backend is not a GPU
      (for "splash": not a TPU).
  """
  _check_shapes(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD)
  _check_row_indices(q_BxTxHxD.shape[0], q_offset_B=q_offset_B, kv_lengths_B=kv_lengths_B)
  _check_mask_span(mask, q_BxTxHxD.shape[1], k_BxSxKxD.shape[1])
  requested = implementation is not None
  implementation = implementation or default_implementation()
  if not requested and implementation == "pallas" and q_BxTxHxD.dtype == jnp.float32:
    implementation = "xla"  # Pallas GPU dots run in TF32 (~1e-3): float32 users get float32
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"attention implementation {implementation!r} is unknown; use one of {IMPLEMENTATIONS}")
  if implementation == "splash":  # TPU path; interpret=None: interpreted unless on a TPU
    from fdllm_jax import splash
    return splash.attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask=mask, q_offset_B=q_offset_B,
                            kv_lengths_B=kv_lengths_B, sm_scale=sm_scale, interpret=interpret)
  chosen = route(implementation, mask, q_BxTxHxD, k_BxSxKxD, q_offset_B=q_offset_B,
                 kv_lengths_B=kv_lengths_B)
  if chosen.fallback and requested:  # a default that falls back is expected, not news
    warnings.warn(f"attention: implementation={implementation!r} has no kernel for "
                  f"{chosen.reason}; running the xla reference instead", stacklevel=2)
  if chosen.path == "xla_training":
    return xla_training_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask=mask,
                                  sm_scale=sm_scale)
  if chosen.path == "xla":
    return xla_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask=mask, q_offset_B=q_offset_B,
                         kv_lengths_B=kv_lengths_B, sm_scale=sm_scale)
  if chosen.path == "cudnn":   # (jax's cuDNN call carries its own partitioning rules)
    return cudnn_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask=mask, q_offset_B=q_offset_B,
                           kv_lengths_B=kv_lengths_B, sm_scale=sm_scale)
  if interpret is None:
    interpret = not _on_gpu()
  kernel = functools.partial(_run_kernel, chosen, sm_scale=sm_scale, interpret=interpret)
  # XLA cannot partition a kernel call: under a mesh each device runs it on its shard.
  return sharding.shard_attention(kernel, q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, q_offset_B,
                                  kv_lengths_B, mesh=sharding.context_mesh())


def _run_kernel(chosen, q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, q_offset_B, kv_lengths_B, *, sm_scale,
                interpret):
  """The kernel of route ``chosen`` on (a shard of) the inputs."""
  del q_offset_B   # the block kernels take it as 0 (route checked), the windows ignore it
  if chosen.path == "block":
    from pallas_kernels import block_kernel
    return block_kernel.block_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, kind=chosen.kind,
                                        block_size=chosen.block_size, sm_scale=sm_scale,
                                        interpret=interpret)
  if chosen.path == "mosaic_block":
    from pallas_kernels import mosaic_block
    return mosaic_block.mosaic_block_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD,
                                               kind=chosen.kind, block_size=chosen.block_size,
                                               sm_scale=sm_scale, interpret=interpret)
  assert chosen.path in ("window", "triton_window", "mosaic_window"), chosen
  lengths_B = _window_lengths(kv_lengths_B, q_BxTxHxD.shape[0], k_BxSxKxD.shape[1])
  return _window_with_reference_gradient(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, lengths_B,
                                         chosen.path, sm_scale, interpret)


@dataclasses.dataclass(frozen=True)
class Route:
  """Which code path ``attention`` takes for a call (``route`` computes it from static data).

  path: "xla", "xla_training" (``xla_training_attention``), "block" (pallas block_attention),
  "mosaic_block", "window" (pallas window_attention), "triton_window", "mosaic_window",
  "cudnn" or "splash"; kind/block_size:
  block_attention's arguments; fallback: the requested implementation had no kernel and the
  xla reference runs (reason says why).
  """

  path: str
  kind: str | None = None
  block_size: int | None = None
  fallback: bool = False
  reason: str = ""


WINDOW_MAX_QUERIES = 64


def route(implementation: str, mask, q_BxTxHxD, k_BxSxKxD, *, q_offset_B=None,
          kv_lengths_B=None) -> Route:
  """The path ``attention(..., implementation=...)`` takes; see the module docstring."""
  if implementation == "xla":
    return Route("xla")
  if implementation == "xla_blocks":
    block = _block_kind(mask, q_BxTxHxD.shape[1], k_BxSxKxD.shape[1])
    if (block is not None and block[0].startswith("training") and kv_lengths_B is None
        and _is_zero_offset(q_offset_B)):
      return Route("xla_training", kind=block[0], block_size=block[1])
    return Route("xla")
  if implementation == "splash":
    return Route("splash")
  num_q, num_k = q_BxTxHxD.shape[1], k_BxSxKxD.shape[1]
  if implementation == "cudnn":
    if _on_gpu() and jnp.dtype(q_BxTxHxD.dtype) not in (jnp.bfloat16, jnp.float16):
      return Route("xla", fallback=True,
                   reason=f"dtype {jnp.dtype(q_BxTxHxD.dtype).name} (cuDNN takes bf16/fp16)")
    if isinstance(mask, masks_lib.Explicit) and np.ndim(mask.allowed) > 3:
      return Route("xla", fallback=True, reason="an Explicit mask of rank > 3")
    return Route("cudnn")
  if isinstance(mask, masks_lib.Full) and num_q <= WINDOW_MAX_QUERIES:
    if implementation == "mosaic":
      return _mosaic_window_route(q_BxTxHxD)
    return Route("triton_window" if implementation == "triton" else "window")
  block = _block_kind(mask, num_q, num_k)
  if block is not None and kv_lengths_B is None and _is_zero_offset(q_offset_B):
    if implementation == "mosaic" and _mosaic_block_applies(q_BxTxHxD, k_BxSxKxD):
      return Route("mosaic_block", kind=block[0], block_size=block[1])
    return Route("block", kind=block[0], block_size=block[1])
  what = (f"mask {type(mask).__name__} with T={num_q}, S={num_k}, "
          f"q_offset_B={'none' if q_offset_B is None else 'given'}, "
          f"kv_lengths_B={'none' if kv_lengths_B is None else 'given'}")
  return Route("xla", fallback=True, reason=what)


def _mosaic_window_route(q_BxTxHxD) -> Route:
  dtype, head_dim = jnp.dtype(q_BxTxHxD.dtype), q_BxTxHxD.shape[3]
  if dtype not in (jnp.bfloat16, jnp.float16) or head_dim % 64:
    return Route("xla", fallback=True,
                 reason=f"a decode window of dtype {dtype.name}, D={head_dim} (the Mosaic "
                        "kernel takes bf16 / f16 with D a multiple of 64)")
  return Route("mosaic_window")


def _mosaic_block_applies(q_BxTxHxD, k_BxSxKxD) -> bool:
  """``pallas_kernels.mosaic_block.supports``, without importing Mosaic GPU to route."""
  dtype, head_dim = jnp.dtype(q_BxTxHxD.dtype), q_BxTxHxD.shape[3]
  return (dtype in (jnp.bfloat16, jnp.float16) and jnp.dtype(k_BxSxKxD.dtype) == dtype
          and head_dim >= 64 and head_dim & (head_dim - 1) == 0)


def _block_kind(mask, num_q, num_k):
  if isinstance(mask, masks_lib.Causal):
    return "causal", 1
  if isinstance(mask, masks_lib.BlockCausal):
    return "block_causal", mask.block_size
  if isinstance(mask, masks_lib.Training) and num_q == num_k == mask.total_len:
    kind = "training" if mask.num_noisy_streams == 1 else "training_shared"
    return kind, mask.block_size
  return None


def _is_zero_offset(q_offset_B) -> bool:
  if q_offset_B is None:
    return True
  try:
    offsets = np.asarray(q_offset_B)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return False  # traced: unknown at trace time, so no kernel that assumes 0
  return bool(np.all(offsets == 0))


def _window_lengths(kv_lengths_B, batch, num_keys):
  if kv_lengths_B is None:
    return jnp.full((batch,), num_keys, jnp.int32)
  return jnp.broadcast_to(jnp.asarray(kv_lengths_B, jnp.int32), (batch,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _window_with_reference_gradient(q, k, v, lengths_B, path, sm_scale, interpret):
  """The decode-window kernels (forward only) with the xla reference's gradient, so that
  ``jax.grad`` through a short ``Full``-mask call works (decoding never differentiates)."""
  if path == "window":
    from pallas_kernels import window_kernel
    return window_kernel.window_attention(q, k, v, lengths_B, sm_scale=sm_scale,
                                          interpret=interpret)
  if path == "mosaic_window":
    from pallas_kernels import mosaic_window
    return mosaic_window.mosaic_window_attention(q, k, v, lengths_B, sm_scale=sm_scale,
                                                 interpret=interpret)
  from pallas_kernels import triton_window
  return triton_window.triton_window_attention(q, k, v, lengths_B, sm_scale=sm_scale)


def _window_forward(q, k, v, lengths_B, path, sm_scale, interpret):
  out = _window_with_reference_gradient(q, k, v, lengths_B, path, sm_scale, interpret)
  return out, (q, k, v, lengths_B)


def _window_backward(path, sm_scale, interpret, residuals, d_out):
  del path, interpret
  q, k, v, lengths_B = residuals
  reference = lambda q, k, v: xla_attention(q, k, v, mask=masks_lib.Full(),
                                            kv_lengths_B=lengths_B, sm_scale=sm_scale)
  _, vjp = jax.vjp(reference, q, k, v)
  return (*vjp(d_out), None)


_window_with_reference_gradient.defvjp(_window_forward, _window_backward)


def _on_gpu() -> bool:
  return jax.default_backend() in ("gpu", "cuda", "rocm")


def cudnn_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, *, mask, q_offset_B=None,
                    kv_lengths_B=None, sm_scale=None):
  """``jax.nn.dot_product_attention`` with our mask mapped onto its arguments.

  cuDNN on a GPU; jax's "xla" implementation elsewhere (same arguments, so CPU tests check the
  mapping). A plain causal mask uses ``is_causal`` (cuDNN skips hidden tiles); ``Full`` with
  lengths uses ``key_value_seq_lengths``; every other mask becomes a boolean [T, S] (or
  [B, T, S]) array, which cuDNN applies densely.
  """
  batch, num_q = q_BxTxHxD.shape[:2]
  num_k = k_BxSxKxD.shape[1]
  kwargs = dict(scale=sm_scale, implementation="cudnn" if _on_gpu() else "xla")
  if isinstance(mask, masks_lib.Full) and kv_lengths_B is not None:
    kwargs["key_value_seq_lengths"] = _window_lengths(kv_lengths_B, batch, num_k)
  elif isinstance(mask, masks_lib.Full):
    pass
  elif (isinstance(mask, masks_lib.Causal) and kv_lengths_B is None and num_q == num_k
        and _is_zero_offset(q_offset_B)):
    kwargs["is_causal"] = True
  else:
    allowed_BxTxS = visibility(mask, num_q, num_k, q_offset_B, kv_lengths_B)
    kwargs["mask"] = allowed_BxTxS[:, None]
  return jax.nn.dot_product_attention(q_BxTxHxD, k_BxSxKxD,
                                      _without_stale_values(v_BxSxKxD, kv_lengths_B), **kwargs)


def _check_row_indices(batch: int, **per_row) -> None:
  """``q_offset_B`` / ``kv_lengths_B``: None or integers of shape [B]."""
  for name, value in per_row.items():
    if value is None:
      continue
    dtype = value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype
    shape = np.shape(value)
    if shape != (batch,) or not jnp.issubdtype(dtype, jnp.integer):
      raise ValueError(f"{name} must be integers of shape [B]=({batch},); got shape {shape}, "
                       f"dtype {dtype}")


def _check_mask_span(mask, num_q: int, num_k: int) -> None:
  if isinstance(mask, masks_lib.Training) and max(num_q, num_k) > mask.total_len:
    raise ValueError(f"a Training mask spans {mask.total_len} indices ((noisy streams + 1) x "
                     f"seq_len={mask.seq_len}); got T={num_q} queries and S={num_k} keys")


def _check_shapes(q, k, v):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"attention expects rank-4 q/k/v [B, T, H, D]; got {q.shape}, {k.shape}, "
                     f"{v.shape}")
  if k.shape != v.shape:
    raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
  if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
    raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head_dim")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
