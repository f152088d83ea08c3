"""Jitted block-diffusion decoding (Fast-dLLM v2, spec section 4) and the autoregressive baseline.

``generate(model, prompts, config)`` decodes a batch of prompts of different lengths:

* Prefill: one forward with the block-causal mask fills the KV cache with each row's whole
  prompt blocks (``floor(P_b / B) * B`` tokens of row b; the reference prefills only the blocks
  every row's prompt fills, spec 4.7); a row whose prompt ends exactly there takes its first
  new token from its last prefill logit.
* Each row then moves its own window of B positions block by block (the reference moves one
  window shared by the batch, spec 4.7; per-row windows give every row the same tokens and
  spend fewer forwards, since no row waits for the slowest to finish a block, and a row's
  forwards are exactly those it runs alone). A window holds the row's prompt tokens (or the
  carried first token) at their positions and MASK elsewhere. The row works on its current
  sub-block (the one holding its first MASK) and, once no MASK is left, commits the window:
  one forward with cache update, whose last logit gives the next block's first token.
* Each denoising step forwards the window against the committed prefix (``masks.Full()`` with
  ``kv_lengths = start + B``, which is block-causal for the window), shifts the logits by one
  position, and fixes every MASK of the row's sub-block whose confidence exceeds the threshold,
  plus the most confident one. Only the S logits a row needs go through the LM head.
* DualCache (``use_dual_cache``, spec 4.6) is decided per row: a row forwards the full window
  (and keeps the window's K/V as its block cache) while the first position of its sub-block is
  MASK or its block cache is not yet valid in this block; otherwise it forwards only its S
  sub-block tokens, which overwrite their own slots of its block cache. When rows need
  different kinds, each forward serves the larger group and a row waits for the forward of
  its kind (its K/V go to scratch slots in the meantime), so one row's schedule never changes
  another's tokens.
* Stop rule (spec 4.4), checked before every step: a row whose generated part of the window
  holds a stop id with no MASK before it is finished. Finished rows never change again.
* A row also ends when every position below ``P_b + max_new_tokens`` (capped by ``max_length``)
  is decoded; positions past that limit stay MASK in the window and are never candidates, and
  the last window is not committed (no forward is spent on K/V nobody reads).

Everything after the prefill runs in one ``lax.while_loop`` inside one compiled executable, one
forward per iteration and no conditional around it (see ``_decode_fn``), with static shapes:
the cache length and the prefill length are bucketed to multiples of B (``bucket``: exact up
to 256, then at most ~1/8 padding), so prompts of similar lengths share executables.
Executables are compiled ahead of time and cached by shape: a second call in the same bucket
compiles nothing (``GenerateOutput.compile_seconds == 0``). The loop state (cache included) is
donated. For a progress display the loop can stop after a number of block commits and be
resumed (``blocks_per_call``): one host round trip per chunk, none per step.

With ``max_batch_size`` smaller than the number of prompts, the rows are slots: when a row ends,
the host collects it and gives the row the next prompt, whose prompt blocks then enter through
the row's window (``_refill_fn``); the device loop returns whenever a row ends.

``generate_ar`` is causal KV-cache decoding in the same style (1-token steps, per-row write
positions for ragged prompts, one loop on the device); its ``max_batch_size`` streams prompts
through the rows too, a refilled row's prompt going through one forward of that row alone
(``_ar_refill_fn``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
import threading
import time
import warnings
import weakref
from typing import Any, Callable, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax import struct

from fdllm_jax import masks as masks_lib
from fdllm_jax.checks import is_int as _is_int, is_real as _is_real
from fdllm_jax import sampling
from fdllm_jax.cache import KVCache
from fdllm_jax.scoring import check_token_ids

_NO_BUDGET = 2**30  # "run to the end" for the chunk budget


# --------------------------------------------------------------------------------------- config

@gin.configurable
@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeConfig:
  """Block-diffusion decoding settings (frozen, hashable; validated on construction).

  Gin-configurable (``DecodeConfig.threshold = 0.5``) for the command-line tools.

  Attributes:
    block_size: B, the block of the attention mask (32 for the released models).
    sub_block_size: S, decoded left to right inside the block; must divide ``block_size``.
    threshold: a MASK position is fixed when its confidence exceeds this (plus the most
      confident position of the sub-block in every step); in (0, 1]. 1.0 = one token per step.
    max_new_tokens: generated tokens per row at most (the stop id included); >= 1.
    temperature: 0 for greedy, else sampling from softmax(logits / temperature).
    top_p: nucleus of the sampling distribution, in (0, 1] (unused when greedy).
    mask_id: the MASK token (151665 on the Qwen2.5 vocabulary).
    stop_ids: a row stops at the first of these ids (spec 4.4); may be empty.
    use_dual_cache: the sub-block cache of spec 4.6 (the reference's approximation, exactly).
    seed: PRNG seed of the sampling.
    max_length: cap of prompt + generated tokens; None = the model's max_position_embeddings
      (above it: a warning, the positions were never trained).
  """

  block_size: int = 32
  sub_block_size: int = 8
  threshold: float = 0.9
  max_new_tokens: int = 256
  temperature: float = 0.0
  top_p: float = 0.95
  mask_id: int = 151665
  stop_ids: tuple[int, ...] = (151645,)
  use_dual_cache: bool = False
  seed: int = 0
  max_length: int | None = None

  def __post_init__(self):
    stop_ids = self.stop_ids
    if _is_int(stop_ids):
      stop_ids = (stop_ids,)
    try:
      stop_ids = tuple(stop_ids)
    except TypeError:
      raise ValueError(f"DecodeConfig.stop_ids must be a sequence of token ids; got "
                       f"{self.stop_ids!r}") from None
    if not all(_is_int(s) and s >= 0 for s in stop_ids):
      raise ValueError(f"DecodeConfig.stop_ids must be non-negative integers; got {stop_ids!r}")
    object.__setattr__(self, "stop_ids", tuple(int(s) for s in stop_ids))
    for name in ("block_size", "sub_block_size", "max_new_tokens"):
      value = getattr(self, name)
      if not _is_int(value) or value < 1:
        raise ValueError(f"DecodeConfig.{name} must be an integer >= 1; got {value!r}")
    if self.block_size % self.sub_block_size:
      raise ValueError(f"DecodeConfig.sub_block_size={self.sub_block_size} must divide "
                       f"block_size={self.block_size}")
    if not _is_real(self.threshold) or not 0.0 < self.threshold <= 1.0:
      raise ValueError(f"DecodeConfig.threshold must be in (0, 1]; got {self.threshold!r}")
    if not _is_real(self.temperature) or not 0.0 <= self.temperature < math.inf:
      raise ValueError(f"DecodeConfig.temperature must be a finite number >= 0; got "
                       f"{self.temperature!r}")
    if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"DecodeConfig.top_p must be in (0, 1]; got {self.top_p!r}")
    if not _is_int(self.mask_id) or self.mask_id < 0:
      raise ValueError(f"DecodeConfig.mask_id must be a non-negative integer; got "
                       f"{self.mask_id!r}")
    if self.mask_id in self.stop_ids:
      raise ValueError(f"DecodeConfig.mask_id={self.mask_id} is also in stop_ids="
                       f"{self.stop_ids}")
    if not isinstance(self.use_dual_cache, bool):
      raise ValueError(f"DecodeConfig.use_dual_cache must be a bool; got "
                       f"{self.use_dual_cache!r}")
    if not _is_int(self.seed):
      raise ValueError(f"DecodeConfig.seed must be an integer; got {self.seed!r}")
    if self.max_length is not None and (not _is_int(self.max_length) or self.max_length < 2):
      raise ValueError(f"DecodeConfig.max_length must be None or an integer >= 2; got "
                       f"{self.max_length!r}")


@dataclasses.dataclass
class GenerateOutput:
  """What ``generate`` / ``generate_ar`` return.

  Attributes:
    tokens: per row, the generated ids up to (excluding) the first stop id.
    finished: per row, whether it stopped on a stop id (False: it hit the token limit).
    num_forwards: model forward passes spent on the batch, prefill included. In a batch a
      forward serves every row that needs that kind of forward (with DualCache a row may need
      the other kind and wait).
    step_of_token: per row, for each id of ``tokens``, the row's own forward count at which it
      was fixed (1-based: the prefill or the first step is 1). Rows do not share counters, so a
      row's trace is the same alone or in a batch.
    seconds: wall time of the call, compilation excluded.
    compile_seconds: time spent compiling in this call (0.0 when every executable was cached).
    host_syncs: device-to-host round trips made while decoding.
    confidence_of_token: per row, for each id of ``tokens``, its confidence when it was fixed:
      the probability the model gave it under the full softmax, in that forward (``generate``).
      None for ``generate_ar``.
    batch_rows: rows of the device batch (the number of prompts, or ``max_batch_size`` when
      they stream through fewer rows): ``num_tokens / (num_forwards * batch_rows)`` is what one
      row got per forward.
  """

  tokens: list[list[int]]
  finished: list[bool]
  num_forwards: int
  step_of_token: list[list[int]]
  seconds: float
  compile_seconds: float
  host_syncs: int
  confidence_of_token: list[list[float]] | None = None
  batch_rows: int | None = None

  @property
  def num_tokens(self) -> int:
    return sum(len(t) for t in self.tokens)

  @property
  def tokens_per_second(self) -> float:
    return self.num_tokens / self.seconds if self.seconds > 0 else float("nan")

  @property
  def tokens_per_forward(self) -> float:
    """Tokens per batched forward (all rows together)."""
    return self.num_tokens / self.num_forwards if self.num_forwards else float("nan")

  @property
  def tokens_per_row_forward(self) -> float:
    """Tokens one row got per forward (the paper's tokens per forward at batch size 1)."""
    row_forwards = self.num_forwards * (self.batch_rows or 1)
    return self.num_tokens / row_forwards if row_forwards else float("nan")


# ------------------------------------------------------------------------------ input checking

def _check_prompts(prompts, vocab_size: int, mask_id: int) -> list[list[int]]:
  if isinstance(prompts, np.ndarray) or hasattr(prompts, "shape"):
    arr = np.asarray(prompts)
    if arr.ndim == 1:
      arr = arr[None]
    prompts = arr.tolist()
  if not isinstance(prompts, Sequence) or isinstance(prompts, (str, bytes)):
    raise ValueError(f"prompts must be a list of token-id lists; got {type(prompts).__name__}")
  if len(prompts) == 0:
    raise ValueError("prompts is empty: give at least one prompt (a list of token ids)")
  if all(_is_int(p) for p in prompts):  # one prompt given as a flat list of ids
    prompts = [prompts]
  rows = []
  for i, prompt in enumerate(prompts):
    if isinstance(prompt, np.ndarray):
      prompt = prompt.tolist()
    if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
      raise ValueError(f"prompt {i} must be a list of token ids; got {type(prompt).__name__}")
    if len(prompt) == 0:
      raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
    if not all(_is_int(t) for t in prompt):
      bad = next(t for t in prompt if not _is_int(t))
      raise ValueError(f"prompt {i}: token ids must be integers; got {bad!r}")
    check_token_ids(np.asarray(prompt, np.int64), vocab_size, f"prompt {i}")
    if mask_id in prompt:
      raise ValueError(f"prompt {i}: holds the mask id {mask_id} at position "
                       f"{list(prompt).index(mask_id)}; prompts must not contain MASK")
    rows.append([int(t) for t in prompt])
  return rows


def _check_ids_in_vocab(ids, vocab_size: int, what: str) -> None:
  for i in ids:
    if not 0 <= i < vocab_size:
      raise ValueError(f"{what}={i} is outside the model's vocabulary [0, {vocab_size})")


def _max_length(requested: int | None, model_config) -> int:
  """The cap of prompt + generated tokens: ``requested``, else the model's trained positions."""
  trained = model_config.max_position_embeddings
  if requested is not None and requested > trained:
    warnings.warn(f"max_length={requested} exceeds the model's max_position_embeddings="
                  f"{trained}: positions past {trained} were never trained, so tokens there "
                  f"may degrade (no RoPE scaling is applied)", stacklevel=3)
  return requested or trained


def _limits(rows, max_new_tokens: int, max_length: int) -> np.ndarray:
  for i, row in enumerate(rows):
    if len(row) >= max_length:
      raise ValueError(f"prompt {i} has {len(row)} tokens, which already fills max_length="
                       f"{max_length}: no room to generate (shorten it or raise max_length)")
  return np.asarray([min(len(r) + max_new_tokens, max_length) for r in rows], np.int32)


# ------------------------------------------------------------------- compiled-executable cache

_COMPILED: "collections.OrderedDict[Any, Any]" = collections.OrderedDict()
_COMPILED_MAX = 64
_COMPILED_LOCK = threading.Lock()
COMPILE_COUNT = collections.Counter()  # kind -> number of compilations (tests read it)


def _signature(tree) -> tuple:
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((tuple(np.shape(x)), str(jnp.result_type(x)),
                         getattr(x, "sharding", None) if isinstance(x, jax.Array) else None)
                        for x in leaves)


def _executable(kind: str, fn: Callable, statics: tuple, args: tuple, donate: tuple = ()):
  """AOT-compiles ``fn`` for these argument shapes once; returns (executable, compile seconds).

  ``args[0]`` must be the model parameters: their shapes are part of ``statics`` (the model
  key of ``_prepare``), which saves flattening them for the lookup.
  """
  key = (kind, statics, _signature(args[1:]))
  with _COMPILED_LOCK:
    exe = _COMPILED.get(key)
    if exe is not None:
      _COMPILED.move_to_end(key)
      return exe, 0.0
  start = time.perf_counter()
  with _mesh_of(args[0]):
    exe = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
  seconds = time.perf_counter() - start
  with _COMPILED_LOCK:
    _COMPILED[key] = exe
    COMPILE_COUNT[kind] += 1
    while len(_COMPILED) > _COMPILED_MAX:
      _COMPILED.popitem(last=False)
  return exe, seconds


def _mesh_of(params):
  """The (abstract) mesh the parameters are sharded over, as the context mesh while a step is
  traced, so that attention kernels run per shard (``fdllm_jax.sharding.shard_attention``:
  XLA cannot partition a kernel call and would gather its inputs); a no-op on one device."""
  for leaf in jax.tree.leaves(params):
    mesh = getattr(getattr(leaf, "sharding", None), "mesh", None)
    if mesh is not None and mesh.size > 1 and hasattr(mesh, "abstract_mesh"):
      return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)
  return contextlib.nullcontext()


@dataclasses.dataclass(frozen=True)
class _Prepared:
  graphdef: Any
  params: Any  # nnx.State holding the model's own Variables: values are read at each call
  key: int  # equal for models of equal structure and parameter shapes


_PREPARED: "weakref.WeakKeyDictionary[Any, _Prepared]" = weakref.WeakKeyDictionary()
_MODEL_KEYS: dict = {}


def _prepare(model) -> _Prepared:
  """``nnx.split`` once per model object (a traversal costs ~1 ms per layer on a CPU host).

  The cached State holds the model's Variable objects, so parameter values assigned in place
  (``param[...] = x``) are seen by later calls; a model whose structure is changed after its
  first use (a Variable object replaced) must be copied (``nnx.clone``) to be seen.
  """
  try:
    prepared = _PREPARED.get(model)
  except TypeError:  # not weak-referenceable / hashable: no caching
    prepared = None
  if prepared is None:
    graphdef, params = nnx.split(model)
    with _COMPILED_LOCK:
      key = _MODEL_KEYS.setdefault((graphdef, _signature(params)), len(_MODEL_KEYS))
    prepared = _Prepared(graphdef, params, key)
    try:
      _PREPARED[model] = prepared
    except TypeError:
      pass
  return prepared


# --------------------------------------------------------------------------- decoding state

@struct.dataclass
class _Knobs:
  """Per-call values that do not change shapes (traced, so new values never recompile)."""

  prompt_lens: jax.Array  # int32[B]
  limits: jax.Array  # int32[B]: positions < limit are generated
  prompt_ids: jax.Array  # int32[B]: which prompt each row decodes (its sampling keys)
  stop_ids: jax.Array  # int32[n]
  mask_id: jax.Array
  threshold: jax.Array
  temperature: jax.Array
  top_p: jax.Array
  seed: jax.Array


@struct.dataclass
class _DiffusionState:
  tokens: jax.Array  # int32[B, L]: prompts, decoded tokens, MASK
  step_of: jax.Array  # int32[B, L]: row step that fixed each position (0: prompt / not yet)
  conf_of: jax.Array  # float32[B, L]: confidence of each position when it was fixed (0: not)
  cache: KVCache
  start: jax.Array  # int32[B]: first position of each row's window
  active: jax.Array  # bool[B]
  finished: jax.Array  # bool[B]: stopped on a stop id
  block_valid: jax.Array  # bool[B]: DualCache block cache computed in the current window
  row_steps: jax.Array  # int32[B]
  num_forwards: jax.Array  # int32 scalar


@dataclasses.dataclass(frozen=True)
class _Statics:
  block_size: int
  sub_block_size: int
  dual_cache: bool
  greedy: bool
  attention_impl: str | None


def _knobs(config: DecodeConfig, prompt_lens, limits, *, temperature=None, top_p=None,
           threshold=None, stop_ids=None, seed=None, mask_id=None, prompt_ids=None) -> _Knobs:
  # numpy values: cheaper to build than device arrays; the executable call transfers them.
  f32 = lambda v: np.asarray(v, np.float32)
  stops = config.stop_ids if stop_ids is None else stop_ids
  return _Knobs(
      prompt_lens=np.asarray(prompt_lens, np.int32), limits=np.asarray(limits, np.int32),
      prompt_ids=np.asarray(np.arange(len(prompt_lens)) if prompt_ids is None else prompt_ids,
                            np.int32),
      stop_ids=np.asarray(stops, np.int32).reshape(-1),
      mask_id=np.asarray(config.mask_id if mask_id is None else mask_id, np.int32),
      threshold=f32(config.threshold if threshold is None else threshold),
      temperature=f32(config.temperature if temperature is None else temperature),
      top_p=f32(config.top_p if top_p is None else top_p),
      seed=np.asarray((config.seed if seed is None else seed) % 2**32, np.uint32))


def _is_stop(ids, stop_ids):
  return jnp.any(ids[..., None] == stop_ids, axis=-1)


def _choose(model, hidden_BxTxD, knobs: _Knobs, row_steps_B, statics: _Statics):
  """(ids, confidence) [B, T] from final hidden states; MASK never chosen."""
  logits = model.logits(hidden_BxTxD)
  if statics.greedy:
    return sampling.greedy(logits, knobs.mask_id)
  return sampling.sample(logits, sampling.row_keys(knobs.seed, row_steps_B, knobs.prompt_ids),
                         temperature=knobs.temperature, top_p=knobs.top_p,
                         exclude_id=knobs.mask_id)


def _prefill_fn(graphdef, statics: _Statics, prefill_pad: int, params, tokens_BxL,
                knobs: _Knobs, prefill_len_B) -> _DiffusionState:
  """Block-causal prefill of each row's whole prompt blocks: ``prefill_len_B`` (int32[B],
  multiples of B, traced) tokens of row b, where its first window starts.

  One forward covers ``prefill_pad >= max(prefill_len_B)`` tokens of every row (a static
  bucket): the block-causal mask keeps the tokens after a row's prefill from influencing it,
  and their K/V slots lie in the row's windows, which rewrite them before any query can see
  them. A row whose prompt ends exactly there takes its first new token from the last logit.
  """
  model = nnx.merge(graphdef, params)
  batch, total = tokens_BxL.shape
  scratch = statics.block_size if statics.dual_cache and batch > 1 else 0  # see _decode_fn
  cache = KVCache.init(model.config, batch, total + scratch, model.dtype)
  zeros_B = jnp.zeros((batch,), jnp.int32)
  step_of = jnp.zeros((batch, total), jnp.int32)
  conf_of = jnp.zeros((batch, total), jnp.float32)
  num_forwards = jnp.int32(0)
  prefill_len_B = jnp.asarray(prefill_len_B, jnp.int32)
  if prefill_pad:
    hidden, cache = model(tokens_BxL[:, :prefill_pad], mask=masks_lib.BlockCausal(
        statics.block_size), cache=cache, write_start=0,
        kv_lengths=jnp.full((batch,), prefill_pad, jnp.int32), return_hidden=True,
        attention_impl=statics.attention_impl)
    last = _row_slices(hidden, jnp.maximum(prefill_len_B - 1, 0), 1)[:, 0]
    first, first_conf = sampling.greedy(model.logits(last), knobs.mask_id)
    # the prompt ends at the prefill: its next position is generated, from the last logit
    takes = (prefill_len_B > 0) & (knobs.prompt_lens == prefill_len_B)
    tokens_BxL = _set_at(tokens_BxL, prefill_len_B, takes, first)
    step_of = _set_at(step_of, prefill_len_B, takes, 1)
    conf_of = _set_at(conf_of, prefill_len_B, takes, first_conf)
    zeros_B = takes.astype(jnp.int32)
    num_forwards = jnp.int32(1)
  state = _DiffusionState(
      tokens=tokens_BxL, step_of=step_of, conf_of=conf_of,
      cache=cache.replace(lengths=prefill_len_B), start=prefill_len_B,
      active=jnp.ones((batch,), bool), finished=jnp.zeros((batch,), bool),
      block_valid=jnp.zeros((batch,), bool), row_steps=zeros_B, num_forwards=num_forwards)
  return _update_status(state, knobs, statics.block_size)


def _row_slices(array_BxL, start_B, size: int):
  """``array[b, start[b] : start[b] + size]`` for every row, as [B, size, ...]. Like every
  dynamic slice, a start too close to the end is moved back so the slice fits (only rows that
  are done have such starts, and ``_put_row_slices`` moves them back the same way)."""
  if array_BxL.shape[0] == 1:  # one row: a plain slice, cheaper than a gather
    return jax.lax.dynamic_slice_in_dim(array_BxL, start_B[0], size, axis=1)
  take = lambda row, start: jax.lax.dynamic_slice_in_dim(row, start, size)
  return jax.vmap(take)(array_BxL, start_B)


def _put_row_slices(array_BxL, start_B, values_BxT):
  """Writes ``values[b]`` at ``array[b, start[b]:]`` for every row (``_row_slices``' inverse)."""
  if array_BxL.shape[0] == 1:
    return jax.lax.dynamic_update_slice_in_dim(array_BxL, values_BxT, start_B[0], axis=1)
  put = lambda row, values, start: jax.lax.dynamic_update_slice_in_dim(row, values, start, 0)
  return jax.vmap(put)(array_BxL, values_BxT, start_B)


def _set_at(array_BxL, pos_B, where_B, value_B):
  """``array[b, pos[b]] = value[b]`` for the rows in ``where_B``; the other rows unchanged."""
  old_B = _row_slices(array_BxL, pos_B, 1)[:, 0]
  new_B = jnp.where(where_B, value_B, old_B).astype(array_BxL.dtype)
  return _put_row_slices(array_BxL, pos_B, new_B[:, None])


def _window_status(state: _DiffusionState, knobs: _Knobs, W: int):
  """(window tokens, generated-position mask, MASK-candidate mask), each [B, W]."""
  window = _row_slices(state.tokens, state.start, W)
  positions = state.start[:, None] + jnp.arange(W, dtype=jnp.int32)[None]
  generated = ((positions >= knobs.prompt_lens[:, None])
               & (positions < knobs.limits[:, None]))
  return window, generated, generated & (window == knobs.mask_id)


def _update_status(state: _DiffusionState, knobs: _Knobs, W: int) -> _DiffusionState:
  """Applies the stop rule and the length limit to the current window (before any step).

  A row stops when its generated part of the window holds a stop id with no MASK before it
  (spec 4.4); it is done when its last window holds no MASK below its limit. Rows whose window
  is done but whose limit lies further wait for the commit.
  """
  window, generated, masked = _window_status(state, knobs, W)
  mask_before = (jnp.cumsum(masked, axis=1) - masked) > 0
  stopped = state.active & jnp.any(generated & _is_stop(window, knobs.stop_ids) & ~mask_before,
                                   axis=1)
  length_done = ~jnp.any(masked, axis=1) & (state.start + W >= knobs.limits)
  return state.replace(active=state.active & ~stopped & ~length_done,
                       finished=state.finished | stopped)


def _decode_fn(graphdef, statics: _Statics, params, state: _DiffusionState, knobs: _Knobs,
               budget, stop_on_end) -> _DiffusionState:
  """Steps and commits until no row is active, every active row committed ``budget`` windows,
  or (``stop_on_end``, traced bool) a row that was active on entry ended, so that the host can
  give its slot the next prompt.

  Each row moves its own window (``state.start`` [B]): a row whose window has no MASK left
  commits it in the next window forward while the other rows go on denoising theirs, so no row
  waits for the slowest one to finish a block. Invariant between iterations: ``state.active``
  already reflects the stop rule and the length limit of each row's window, so every active row
  has work: a denoising step if it has a MASK left, else the commit of its window. Each
  iteration runs exactly one forward and no conditional (a conditional would copy the whole
  cache at every step):

  * without DualCache, a single loop of window forwards (a commit is a window forward too), in
    which every active row steps or commits;
  * with DualCache, an outer loop whose body is one full-window forward (the rows that need
    one, and the commits) followed by an inner loop of S-token forwards while at least as many
    rows need one as need a full-window forward (every forward serves the larger group, the
    S-token kind on a tie; on the bundled demo at batch 8 this took 15% fewer forwards than
    giving full-window forwards priority). A row that needs the other kind of forward waits; its
    own sequence of forwards is exactly the one it would have alone. A waiting row's K/V go to
    scratch slots past its window (``write_start = start + B``, invisible to every query), so
    its block cache stays intact. The inner loop ends with a row needing a full-window forward
    (or none needing an S-token one), so the outer forward always serves some row.
  """
  model = nnx.merge(graphdef, params)
  W, S = statics.block_size, statics.sub_block_size
  batch = state.tokens.shape[0]
  full = masks_lib.Full()
  arange_W = jnp.arange(W, dtype=jnp.int32)
  arange_S = jnp.arange(S, dtype=jnp.int32)

  def forward(tokens_BxT, cache, write_start_B, start_B):
    # One row: a scalar write position, so the cache write is a plain dynamic update slice.
    write_start = write_start_B[0] if batch == 1 else write_start_B
    return model(tokens_BxT, mask=full, cache=cache, write_start=write_start,
                 kv_lengths=start_B + W, return_hidden=True,
                 attention_impl=statics.attention_impl)

  def heads(hidden_BxWxD, sub_B, row_steps):
    """From a window forward: (ids, conf) for the row's sub-block (token shift: the logit of
    position i comes from i - 1, position 0 keeps its own) and the greedy next-block token with
    its confidence."""
    source = jnp.maximum(sub_B[:, None] * S + arange_S[None] - 1, 0)
    source = jnp.concatenate([source, jnp.full((batch, 1), W - 1, jnp.int32)], axis=1)
    picked = jnp.take_along_axis(hidden_BxWxD, source[:, :, None], axis=1)  # [B, S + 1, D]
    if statics.greedy:
      ids, conf = sampling.greedy(model.logits(picked), knobs.mask_id)
      return ids[:, :S], conf[:, :S], ids[:, S], conf[:, S]
    ids, conf = _choose(model, picked[:, :S], knobs, row_steps, statics)
    nxt, nxt_conf = sampling.greedy(model.logits(picked[:, S]), knobs.mask_id)
    return ids, conf, nxt, nxt_conf

  def needs(state):
    """Window, MASK candidates, each row's sub-block, rows that step, rows that commit."""
    window, _, masked = _window_status(state, knobs, W)
    need_step = state.active & jnp.any(masked, axis=1)
    sub_B = jnp.argmax(masked, axis=1).astype(jnp.int32) // S  # sub-block of the first MASK
    return window, masked, sub_B, need_step, state.active & ~need_step

  def dual_needs(state, masked, sub_B, need_step):
    head_masked = jnp.take_along_axis(masked, (sub_B * S)[:, None], axis=1)[:, 0]
    need_full = need_step & (head_masked | ~state.block_valid)
    return need_full, need_step & ~need_full

  def denoise(state, window, masked, sub_B, stepping, ids, conf):
    """Fixes the confident MASKs of each stepping row's sub-block, and its most confident."""
    start = state.start
    offset_BxW = arange_W[None] - sub_B[:, None] * S
    gather = lambda a: jnp.take_along_axis(a, jnp.clip(offset_BxW, 0, S - 1), axis=1)
    candidate = masked & (offset_BxW >= 0) & (offset_BxW < S) & stepping[:, None]
    conf_W = jnp.where(candidate, gather(conf), -jnp.inf)
    best = jnp.argmax(conf_W, axis=1)
    fix = candidate & ((conf_W > knobs.threshold) | (arange_W[None] == best[:, None]))
    row_steps = state.row_steps + stepping.astype(jnp.int32)
    old_steps = _row_slices(state.step_of, start, W)
    old_conf = _row_slices(state.conf_of, start, W)
    return state.replace(
        tokens=_put_row_slices(state.tokens, start, jnp.where(fix, gather(ids), window)),
        step_of=_put_row_slices(state.step_of, start,
                                jnp.where(fix, row_steps[:, None], old_steps)),
        conf_of=_put_row_slices(state.conf_of, start, jnp.where(fix, gather(conf), old_conf)),
        row_steps=row_steps)

  def commit(state, commits, nxt, nxt_conf):
    """For the rows in ``commits``, the forward wrote their clean window's K/V and its last
    logit is the next block's first token. A committing row is active with no MASK left, so
    ``_update_status`` found its window below its limit: pos < limit <= the buffer length."""
    pos = state.start + W
    counts = commits & (pos >= knobs.prompt_lens)
    takes = counts & (pos < knobs.limits)
    row_steps = state.row_steps + counts.astype(jnp.int32)
    pos_c = jnp.minimum(pos, state.tokens.shape[1] - 1)
    start = jnp.where(commits, pos, state.start)
    return state.replace(
        tokens=_set_at(state.tokens, pos_c, takes, nxt),
        step_of=_set_at(state.step_of, pos_c, takes, row_steps),
        conf_of=_set_at(state.conf_of, pos_c, takes, nxt_conf),
        start=start, row_steps=row_steps, cache=state.cache.replace(lengths=start))

  def window_iteration(state):
    """One full-window forward: denoising for the rows that need it, and the commits."""
    window, masked, sub_B, need_step, commits = needs(state)
    if statics.dual_cache:
      stepping, _ = dual_needs(state, masked, sub_B, need_step)
    else:
      stepping = need_step
    start = state.start
    write_start = start
    if statics.dual_cache and batch > 1:  # waiting rows keep their block cache
      write_start = jnp.where(stepping | commits, start, start + W)
    hidden, cache = forward(window, state.cache, write_start, start)
    ids, conf, nxt, nxt_conf = heads(hidden, sub_B, state.row_steps)
    state = denoise(state.replace(cache=cache, num_forwards=state.num_forwards + 1),
                    window, masked, sub_B, stepping, ids, conf)
    state = state.replace(block_valid=(state.block_valid | stepping) & ~commits)
    return _update_status(commit(state, commits, nxt, nxt_conf), knobs, W), commits

  def sub_block_iteration(state):
    """One S-token forward for the rows whose sub-block head is decoded (DualCache)."""
    window, masked, sub_B, need_step, _ = needs(state)
    _, need_sub = dual_needs(state, masked, sub_B, need_step)
    first = state.start + sub_B * S
    write_start = jnp.where(need_sub, first, state.start + W) if batch > 1 else first
    tokens_BxS = jnp.take_along_axis(window, sub_B[:, None] * S + arange_S[None], axis=1)
    hidden, cache = forward(tokens_BxS, state.cache, write_start, state.start)
    shifted = jnp.take_along_axis(hidden, jnp.maximum(arange_S - 1, 0)[None, :, None], axis=1)
    ids, conf = _choose(model, shifted, knobs, state.row_steps, statics)
    state = denoise(state.replace(cache=cache, num_forwards=state.num_forwards + 1),
                    window, masked, sub_B, need_sub, ids, conf)
    return _update_status(state, knobs, W)

  def sub_block_phase(state):
    def cond(state):  # S-token forwards while they serve at least as many rows as a full one
      _, masked, sub_B, need_step, commits = needs(state)
      need_full, need_sub = dual_needs(state, masked, sub_B, need_step)
      return jnp.any(need_sub) & (jnp.sum(need_sub) >= jnp.sum(need_full | commits))
    return jax.lax.while_loop(cond, sub_block_iteration, state)

  def body(carry):
    state, commits_B = carry
    state, commits = window_iteration(state)
    if statics.dual_cache:
      state = sub_block_phase(state)
    return state, commits_B + commits.astype(jnp.int32)

  entry_active = state.active

  def cond(carry):
    state, commits_B = carry
    ended = jnp.any(entry_active & ~state.active)
    return jnp.any(state.active & (commits_B < budget)) & ~(stop_on_end & ended)

  state, _ = jax.lax.while_loop(cond, body, (state, jnp.zeros((batch,), jnp.int32)))
  return state


def _refill_fn(W: int, params, state: _DiffusionState, knobs: _Knobs, refill_B,
               tokens_BxL) -> _DiffusionState:
  """Rows in ``refill_B`` start the prompts of ``tokens_BxL`` (``knobs`` already describes
  them): window at 0, counters cleared. The row's prompt blocks then enter through its window,
  one commit forward each (the K/V a prefill would give), and its stale cache slots stay
  beyond every query's ``kv_lengths``. ``params`` is unused (the executable cache's key)."""
  del params
  r = refill_B[:, None]
  state = state.replace(
      tokens=jnp.where(r, tokens_BxL, state.tokens),
      step_of=jnp.where(r, 0, state.step_of), conf_of=jnp.where(r, 0.0, state.conf_of),
      start=jnp.where(refill_B, 0, state.start),
      active=state.active | refill_B, finished=state.finished & ~refill_B,
      block_valid=state.block_valid & ~refill_B,
      row_steps=jnp.where(refill_B, 0, state.row_steps))
  return _update_status(state, knobs, W)


# ------------------------------------------------------------------------------- public API

def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def bucket(n: int, block: int) -> int:
  """``n`` rounded up to a multiple of ``block``, coarser for large n (at most ~1/8 waste):
  the granularity is max(block, next_power_of_two(n) / 8). Bounds the number of distinct
  shapes, hence of compilations, over a run of varied prompt lengths."""
  if n <= 0:
    return 0
  return _round_up(n, max(block, (1 << (n - 1).bit_length()) // 8))


def generate(model, prompts, config: DecodeConfig | None = None, *,
             progress: Callable[[int, int], None] | None = None,
             blocks_per_call: int | None = None,
             attention_impl: str | None = None,
             max_batch_size: int | None = None) -> GenerateOutput:
  """Block-diffusion decoding of a batch of prompts (see the module docstring).

  Args:
    model: a ``fdllm_jax.Transformer`` (a Fast-dLLM v2 checkpoint for meaningful text).
    prompts: a list of token-id lists (different lengths allowed), or one list of ids.
    config: a ``DecodeConfig`` (default ``DecodeConfig()``).
    progress: called as ``progress(done, total)`` (generated positions over all rows) after
      every chunk of ``blocks_per_call`` windows; implies chunking (default 1 window a chunk).
    blocks_per_call: stop the device loop once every active row has committed this many
      windows since the last stop, report, resume. None (and no progress): the whole
      generation is one device call.
    attention_impl: attention implementation name (``fdllm_jax.attention``), default xla.
    max_batch_size: decode at most this many prompts at a time (rows of the device batch):
      when a row ends, the host gives it the next prompt, whose prompt blocks then enter
      through the row's window (one commit forward each, alongside the other rows' steps)
      instead of a prefill. Each prompt is decoded as in one batch (its prompt's K/V come from
      window forwards rather than the prefill: the same values up to float rounding); the
      device loop returns to the host whenever a row ends. Sampling keys follow the prompt,
      not the row, so sampled tokens are also those of one batch. None: every prompt in one
      batch.
  """
  config = DecodeConfig() if config is None else config
  if not isinstance(config, DecodeConfig):
    raise ValueError(f"config must be a DecodeConfig; got {type(config).__name__}")
  wall_start = time.perf_counter()
  vocab = model.config.vocab_size
  _check_ids_in_vocab([config.mask_id], vocab, "mask_id")
  _check_ids_in_vocab(config.stop_ids, vocab, "stop id")
  rows = _check_prompts(prompts, vocab, config.mask_id)
  max_length = _max_length(config.max_length, model.config)
  limits = _limits(rows, config.max_new_tokens, max_length)
  W = config.block_size
  prompt_lens = np.asarray([len(r) for r in rows], np.int32)
  if blocks_per_call is not None and (not _is_int(blocks_per_call) or blocks_per_call < 1):
    raise ValueError(f"blocks_per_call must be None or an integer >= 1; got {blocks_per_call!r}")
  if max_batch_size is not None and (not _is_int(max_batch_size) or max_batch_size < 1):
    raise ValueError(f"max_batch_size must be None or an integer >= 1; got {max_batch_size!r}")
  if progress is not None and blocks_per_call is None:
    blocks_per_call = 1
  batch = len(rows) if max_batch_size is None else min(max_batch_size, len(rows))
  total = bucket(int(limits.max()), W)
  queue = collections.deque(range(batch, len(rows)))  # prompts waiting for a row
  prompt_of = list(range(batch))  # the prompt each row decodes (None: no more prompts)

  def row_tokens(i):
    ids = np.full((total,), config.mask_id, np.int32)
    ids[:len(rows[i])] = rows[i]
    return ids

  tokens = np.stack([row_tokens(i) for i in prompt_of])
  row_prompt_lens, row_limits = prompt_lens[:batch].copy(), limits[:batch].copy()
  prefill_lens = row_prompt_lens // W * W  # each row's whole prompt blocks
  prefill_pad = min(bucket(int(prefill_lens.max()), W), total)

  statics = _Statics(W, config.sub_block_size, config.use_dual_cache,
                     config.temperature == 0.0, attention_impl)
  prepared = _prepare(model)
  graphdef, params = prepared.graphdef, prepared.params
  knobs = _knobs(config, row_prompt_lens, row_limits)
  tokens = jnp.asarray(tokens)
  compile_seconds = 0.0
  prefill, seconds = _executable(
      "prefill", functools.partial(_prefill_fn, graphdef, statics, prefill_pad),
      (prepared.key, statics, prefill_pad), (params, tokens, knobs, prefill_lens))
  compile_seconds += seconds
  state = prefill(params, tokens, knobs, prefill_lens)
  budget = jnp.int32(blocks_per_call or _NO_BUDGET)
  stop_on_end = np.asarray(bool(queue))
  decode, seconds = _executable(
      "decode", functools.partial(_decode_fn, graphdef, statics), (prepared.key, statics),
      (params, state, knobs, budget, stop_on_end), donate=(1,))
  compile_seconds += seconds

  results = [None] * len(rows)  # per prompt: (tokens, steps, confidences, finished)
  fetch = lambda s: (s.tokens, s.step_of, s.conf_of, s.finished)
  host_syncs = 0
  total_positions = int((limits - prompt_lens).sum())
  while True:
    state = decode(params, state, knobs, budget, stop_on_end)
    if blocks_per_call is None and not queue:
      break
    # with prompts waiting, the arrays come along: a row has ended unless the budget ran out
    start, active, arrays = jax.device_get((state.start, state.active,
                                            fetch(state) if queue else ()))
    host_syncs += 1
    ended = [b for b, i in enumerate(prompt_of) if i is not None and not active[b]]
    if queue and ended:  # collect the ended rows, give them the next prompts
      refill = np.zeros((batch,), bool)
      new_tokens = np.zeros((batch, total), np.int32)
      for b in ended:
        results[prompt_of[b]] = _row_result(arrays, b, row_prompt_lens[b], row_limits[b], config)
        prompt_of[b] = queue.popleft() if queue else None
        if prompt_of[b] is not None:
          refill[b], new_tokens[b] = True, row_tokens(prompt_of[b])
          row_prompt_lens[b], row_limits[b] = prompt_lens[prompt_of[b]], limits[prompt_of[b]]
      knobs = _knobs(config, row_prompt_lens, row_limits,
                     prompt_ids=[-1 if i is None else i for i in prompt_of])
      stop_on_end = np.asarray(bool(queue))
      if refill.any():
        refill_rows, seconds = _executable(
            "refill", functools.partial(_refill_fn, W), (prepared.key, W),
            (params, state, knobs, refill, new_tokens), donate=(1,))
        compile_seconds += seconds
        state = refill_rows(params, state, knobs, refill, new_tokens)
        active, start = active | refill, np.where(refill, 0, start)
    if progress is not None:
      done = sum(limits[i] - prompt_lens[i] for i, r in enumerate(results) if r is not None)
      for b, i in enumerate(prompt_of):
        if i is not None and results[i] is None:
          done += (max(min(start[b], limits[i]) - prompt_lens[i], 0) if active[b] else
                   limits[i] - prompt_lens[i])
      progress(int(done), total_positions)
    if not active.any():
      break
  *arrays, num_forwards = jax.device_get((*fetch(state), state.num_forwards))
  host_syncs += 1
  for b, i in enumerate(prompt_of):
    if i is not None and results[i] is None:
      results[i] = _row_result(arrays, b, row_prompt_lens[b], row_limits[b], config)
  out_tokens, out_steps, out_conf, finished = (list(x) for x in zip(*results))
  return GenerateOutput(
      tokens=out_tokens, finished=finished, num_forwards=int(num_forwards),
      step_of_token=out_steps, seconds=time.perf_counter() - wall_start - compile_seconds,
      compile_seconds=compile_seconds, host_syncs=host_syncs, confidence_of_token=out_conf,
      batch_rows=batch)


def _row_result(arrays, b: int, prompt_len: int, limit: int, config: DecodeConfig):
  """(tokens, steps, confidences, finished) of row ``b`` of fetched state arrays."""
  tokens_BxL, step_of_BxL, conf_of_BxL, finished_B = arrays
  (ids,), (steps,), (conf,) = _cut(tokens_BxL[b:b + 1], step_of_BxL[b:b + 1],
                                   conf_of_BxL[b:b + 1], [prompt_len], [limit],
                                   config.stop_ids, config.mask_id)
  return ids, steps, conf, bool(finished_B[b])


def _cut(tokens_BxL, step_of_BxL, conf_of_BxL, prompt_lens, limits, stop_ids, mask_id):
  """Per row: generated ids up to the first stop (or MASK), their steps and confidences."""
  out_tokens, out_steps, out_conf = [], [], []
  stops = set(stop_ids)
  for row, steps, conf, p, limit in zip(tokens_BxL, step_of_BxL, conf_of_BxL, prompt_lens,
                                        limits):
    ids = row[p:limit].tolist()
    end = next((i for i, t in enumerate(ids) if t in stops or t == mask_id), len(ids))
    out_tokens.append(ids[:end])
    out_steps.append(steps[p:p + end].tolist())
    out_conf.append([float(c) for c in conf[p:p + end]])
  return out_tokens, out_steps, out_conf


# ---------------------------------------------------------------------------------- AR baseline

@struct.dataclass
class _ARState:
  out: jax.Array  # int32[B, N]: column k = the row's k-th generated token
  cache: KVCache
  last: jax.Array  # int32[B]: each row's newest token (the next one to feed)
  pos: jax.Array  # int32[B]: its position
  count: jax.Array  # int32[B]: tokens each row generated so far
  active: jax.Array  # bool[B]
  finished: jax.Array  # bool[B]: stopped on a stop id
  num_forwards: jax.Array  # int32 scalar: batch forwards, prefills included


@dataclasses.dataclass(frozen=True)
class _ARStatics:
  greedy: bool
  attention_impl: str | None


def _ar_choose(model, hidden_BxD, knobs: _Knobs, count_B, prompt_ids_B, statics: _ARStatics):
  """Next token per row (no id excluded: an AR model has no MASK). Sampling keys follow the
  prompt and its own token count, so a row draws the same alone, in a batch or streamed."""
  logits = model.logits(hidden_BxD)
  if statics.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  keys_B = sampling.row_keys(knobs.seed, count_B, prompt_ids_B)
  return sampling.sample(logits, keys_B, temperature=knobs.temperature, top_p=knobs.top_p)[0]


def _ar_prompt_forward(model, statics: _ARStatics, cache: KVCache, tokens_BxP, knobs: _Knobs,
                       prompt_lens_B, prompt_ids_B):
  """Causal forward of right-padded prompts into ``cache`` from slot 0; each row's first token
  from its last prompt position (the padding after it is never visible to that row's queries).
  Returns (first token int32[B], cache)."""
  batch, prompt_pad = tokens_BxP.shape
  hidden, cache = model(tokens_BxP, mask=masks_lib.Causal(), cache=cache, write_start=0,
                        kv_lengths=jnp.full((batch,), prompt_pad, jnp.int32),
                        return_hidden=True, attention_impl=statics.attention_impl)
  hidden_last = jnp.take_along_axis(hidden, (prompt_lens_B - 1)[:, None, None], axis=1)[:, 0]
  first = _ar_choose(model, hidden_last, knobs, jnp.zeros((batch,), jnp.int32), prompt_ids_B,
                     statics)
  return first, cache


def _ar_started(first_B, prompt_lens_B, knobs: _Knobs, limits_B):
  """(active, finished) of rows whose first token is ``first_B``."""
  stopped = _is_stop(first_B, knobs.stop_ids)
  return ~stopped & (limits_B - prompt_lens_B > 1), stopped


def _ar_prefill_fn(graphdef, statics: _ARStatics, cache_len: int, max_new: int, params,
                   tokens_BxP, knobs: _Knobs) -> _ARState:
  """The first forward: every row's prompt into a cache of ``cache_len`` slots."""
  model = nnx.merge(graphdef, params)
  batch = tokens_BxP.shape[0]
  cache = KVCache.init(model.config, batch, cache_len, model.dtype)
  first, cache = _ar_prompt_forward(model, statics, cache, tokens_BxP, knobs, knobs.prompt_lens,
                                    knobs.prompt_ids)
  active, finished = _ar_started(first, knobs.prompt_lens, knobs, knobs.limits)
  out = jnp.zeros((batch, max_new), jnp.int32).at[:, 0].set(first)
  return _ARState(out=out, cache=cache, last=first, pos=knobs.prompt_lens,
                  count=jnp.ones((batch,), jnp.int32), active=active, finished=finished,
                  num_forwards=jnp.int32(1))


def _ar_refill_fn(graphdef, statics: _ARStatics, params, state: _ARState, knobs: _Knobs, row,
                  tokens_1xP) -> _ARState:
  """Row ``row`` starts the prompt ``tokens_1xP`` (``knobs`` already describes it): one
  forward of that row alone writes its prompt's K/V over the row's cache and gives its first
  token; its stale slots past the prompt stay beyond its ``kv_lengths`` until overwritten."""
  model = nnx.merge(graphdef, params)
  take = lambda a: jax.lax.dynamic_slice_in_dim(a, row, 1, axis=0)
  put = lambda a, r: jax.lax.dynamic_update_slice_in_dim(a, r, row, axis=0)
  prompt_len, limit = take(knobs.prompt_lens), take(knobs.limits)
  first, row_cache = _ar_prompt_forward(model, statics, jax.tree.map(take, state.cache),
                                        tokens_1xP, knobs, prompt_len, take(knobs.prompt_ids))
  active, finished = _ar_started(first, prompt_len, knobs, limit)
  out_row = jnp.zeros((1, state.out.shape[1]), jnp.int32).at[:, 0].set(first)
  return state.replace(
      out=put(state.out, out_row), cache=jax.tree.map(put, state.cache, row_cache),
      last=put(state.last, first), pos=put(state.pos, prompt_len),
      count=put(state.count, jnp.ones((1,), jnp.int32)), active=put(state.active, active),
      finished=put(state.finished, finished), num_forwards=state.num_forwards + 1)


def _ar_decode_fn(graphdef, statics: _ARStatics, params, state: _ARState, knobs: _Knobs,
                  budget, stop_on_end) -> _ARState:
  """One token per active row and forward until no row is active, ``budget`` steps were
  taken, or (``stop_on_end``) a row that was active ended, for the host to refill it.

  Row b's k-th token lands in column k of ``out`` (one update slice per step at batch 1). Rows
  that ended keep computing (their outputs no longer change).
  """
  model = nnx.merge(graphdef, params)
  batch = state.out.shape[0]
  room = knobs.limits - knobs.prompt_lens  # tokens each row may generate
  was_active = state.active

  def body(carry):
    state, taken = carry
    write_start = state.pos[0] if batch == 1 else state.pos  # one update slice when B=1
    hidden, cache = model(state.last[:, None], mask=masks_lib.Full(), cache=state.cache,
                          write_start=write_start, kv_lengths=state.pos + 1,
                          positions_BxT=state.pos[:, None], return_hidden=True,
                          attention_impl=statics.attention_impl)
    nxt = _ar_choose(model, hidden[:, 0], knobs, state.count, knobs.prompt_ids, statics)
    live = state.active
    out = _set_at(state.out, state.count, live, nxt)
    stopped = live & _is_stop(nxt, knobs.stop_ids)
    count = state.count + live
    return state.replace(out=out, cache=cache, last=jnp.where(live, nxt, state.last),
                         pos=state.pos + live, count=count,
                         active=live & ~stopped & (count < room),
                         finished=state.finished | stopped,
                         num_forwards=state.num_forwards + 1), taken + 1

  def cond(carry):
    state, taken = carry
    ended = jnp.any(was_active & ~state.active)
    return jnp.any(state.active) & (taken < budget) & ~(stop_on_end & ended)

  state, _ = jax.lax.while_loop(cond, body, (state, jnp.int32(0)))
  return state


def generate_ar(model, prompts, *, max_new_tokens: int, stop_ids=(151645,),
                temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                max_length: int | None = None, progress: Callable[[int, int], None] | None = None,
                tokens_per_call: int | None = None,
                attention_impl: str | None = None,
                max_batch_size: int | None = None) -> GenerateOutput:
  """Autoregressive KV-cache decoding (the baseline): one token per forward for every row.

  Ragged prompts are right-padded to a bucket (a multiple of 32); each row writes its K/V at
  its own position and attends to its own slots only. The whole decode is one device loop;
  ``progress(done, total)`` / ``tokens_per_call`` chunk it as in ``generate``.
  ``step_of_token`` is the row's forward that produced each token (1 = its prompt's forward).

  ``max_batch_size``: decode at most this many prompts at a time, as in ``generate``: when a
  row ends, the host gives it the next prompt, whose prompt goes through one forward of that
  row alone (counted in ``num_forwards``), and the device loop resumes. Each prompt gets the
  tokens of one batch (its K/V from a one-row forward: the same values up to float rounding).
  """
  # The AR engine has no MASK; DecodeConfig validates the shared fields (any non-stop mask id).
  stops = _as_tuple(stop_ids)
  mask_id = 1 + max((s for s in stops if _is_int(s)), default=-1)
  config = DecodeConfig(max_new_tokens=max_new_tokens, stop_ids=stops, temperature=temperature,
                        top_p=top_p, seed=seed, mask_id=mask_id, max_length=max_length)
  wall_start = time.perf_counter()
  vocab = model.config.vocab_size
  _check_ids_in_vocab(config.stop_ids, vocab, "stop id")
  rows = _check_prompts(prompts, vocab, mask_id=-1)
  max_length = _max_length(config.max_length, model.config)
  limits = _limits(rows, config.max_new_tokens, max_length)
  prompt_lens = np.asarray([len(r) for r in rows], np.int32)
  if tokens_per_call is not None and (not _is_int(tokens_per_call) or tokens_per_call < 1):
    raise ValueError(f"tokens_per_call must be None or an integer >= 1; got {tokens_per_call!r}")
  if max_batch_size is not None and (not _is_int(max_batch_size) or max_batch_size < 1):
    raise ValueError(f"max_batch_size must be None or an integer >= 1; got {max_batch_size!r}")
  if progress is not None and tokens_per_call is None:
    tokens_per_call = 32
  batch = len(rows) if max_batch_size is None else min(max_batch_size, len(rows))
  prompt_pad = bucket(int(prompt_lens.max()), 32)  # every prompt, so refills share one shape
  max_new = bucket(int((limits - prompt_lens).max()), 32)
  cache_len = bucket(prompt_pad + max_new, 32)
  queue = collections.deque(range(batch, len(rows)))  # prompts waiting for a row
  prompt_of = list(range(batch))  # the prompt each row decodes (None: no more prompts)

  def padded(i):
    ids = np.zeros((prompt_pad,), np.int32)
    ids[:len(rows[i])] = rows[i]
    return ids

  row_prompt_lens, row_limits = prompt_lens[:batch].copy(), limits[:batch].copy()
  statics = _ARStatics(config.temperature == 0.0, attention_impl)
  prepared = _prepare(model)
  graphdef, params = prepared.graphdef, prepared.params
  knobs = _knobs(config, row_prompt_lens, row_limits, mask_id=-1)
  tokens = jnp.asarray(np.stack([padded(i) for i in prompt_of]))
  compile_seconds = 0.0
  prefill, seconds = _executable(
      "ar_prefill", functools.partial(_ar_prefill_fn, graphdef, statics, cache_len, max_new),
      (prepared.key, statics, cache_len, max_new), (params, tokens, knobs))
  compile_seconds += seconds
  state = prefill(params, tokens, knobs)
  budget = jnp.int32(tokens_per_call or _NO_BUDGET)
  stop_on_end = np.asarray(bool(queue))
  decode, seconds = _executable(
      "ar_decode", functools.partial(_ar_decode_fn, graphdef, statics), (prepared.key, statics),
      (params, state, knobs, budget, stop_on_end), donate=(1,))
  compile_seconds += seconds

  results = [None] * len(rows)  # per prompt: (tokens, finished)
  stop_set = set(config.stop_ids)

  def row_result(out_BxN, count_B, b):
    ids = out_BxN[b, :min(row_limits[b] - row_prompt_lens[b], count_B[b])].tolist()
    end = next((i for i, t in enumerate(ids) if t in stop_set), len(ids))
    return ids[:end], end < len(ids)

  host_syncs = 0
  room = limits - prompt_lens
  while True:
    state = decode(params, state, knobs, budget, stop_on_end)
    if tokens_per_call is None and not queue:
      break
    # with prompts waiting, the outputs come along: a row has ended unless the budget ran out
    count, active, out = (np.array(x) for x in jax.device_get(
        (state.count, state.active, state.out if queue else ())))
    host_syncs += 1
    ended = [b for b, i in enumerate(prompt_of) if i is not None and not active[b]]
    if queue and ended:  # collect the ended rows, give them the next prompts
      for b in ended:
        results[prompt_of[b]] = row_result(out, count, b)
        prompt_of[b] = queue.popleft() if queue else None
        if prompt_of[b] is not None:
          row_prompt_lens[b], row_limits[b] = prompt_lens[prompt_of[b]], limits[prompt_of[b]]
      knobs = _knobs(config, row_prompt_lens, row_limits, mask_id=-1,
                     prompt_ids=[-1 if i is None else i for i in prompt_of])
      stop_on_end = np.asarray(bool(queue))
      for b in ended:
        if prompt_of[b] is None:
          continue
        refill, seconds = _executable(
            "ar_refill", functools.partial(_ar_refill_fn, graphdef, statics),
            (prepared.key, statics), (params, state, knobs, np.int32(b),
                                      padded(prompt_of[b])[None]), donate=(1,))
        compile_seconds += seconds
        state = refill(params, state, knobs, np.int32(b), padded(prompt_of[b])[None])
        active[b], count[b] = True, 0  # a prompt that ends at once is collected next round
    if progress is not None:
      done = sum(room[i] for i, r in enumerate(results) if r is not None)
      for b, i in enumerate(prompt_of):
        if i is not None and results[i] is None:
          done += min(count[b], room[i]) if active[b] else room[i]
      progress(int(done), int(room.sum()))
    if not active.any():
      break
  out, count, num_forwards = jax.device_get((state.out, state.count, state.num_forwards))
  host_syncs += 1
  for b, i in enumerate(prompt_of):
    if i is not None and results[i] is None:
      results[i] = row_result(out, count, b)
  out_tokens, finished = (list(x) for x in zip(*results))
  return GenerateOutput(
      tokens=out_tokens, finished=finished, num_forwards=int(num_forwards),
      step_of_token=[list(range(1, len(t) + 1)) for t in out_tokens],
      seconds=time.perf_counter() - wall_start - compile_seconds,
      compile_seconds=compile_seconds, host_syncs=host_syncs, batch_rows=batch)


def _as_tuple(stop_ids):
  if _is_int(stop_ids):
    return (stop_ids,)
  try:
    return tuple(stop_ids)
  except TypeError:
    return stop_ids  # DecodeConfig names the bad value
