"""The training loop: one jitted, sharded step; optax AdamW; orbax checkpoints; metrics; export.

State. Parameters are a nested dict with string keys that mirror the NNX paths
(``params["layers"]["3"]["self_attn"]["q_proj"]["kernel"]``), kept in ``param_dtype``
(float32 master weights by default). Inside the step they are cast to ``compute_dtype`` and
merged into a ``Transformer`` built with that dtype, so ``compute_dtype="bfloat16"`` runs every
matmul in bfloat16 while AdamW updates float32 weights. The optimizer state is optax's pytree.

Step. ``train_step(params, opt_state, input_ids, labels, step)`` draws the view masks from
``fold_in(key(seed), step)`` (so a resumed run draws the same masks), splits the global batch
into ``grad_accum_steps`` micro-batches, adds the gradients of the CE *sums* and divides once by
the global label count, clips by global norm and applies AdamW. It is jitted with explicit
in/out shardings on the (data, fsdp, tensor) mesh and donates the state.

Checkpoints. ``workdir/checkpoints/<step>/`` (orbax CheckpointManager): ``state`` (params and
optimizer state), ``data`` (the data iterator's state: one JSON file per process) and ``run``
(the run's fingerprint). Orbax writes into a temporary directory and renames it when every
item is complete, so a run killed mid-save leaves nothing that resume picks up. A new run in
a workdir with checkpoints resumes from the newest one, after checking that the fingerprint
(model, objective, data, batch, sequence and block size, seed, dtype) matches.

Outputs. ``workdir/metrics.jsonl`` (one line per step: loss, lr, grad_norm, tokens/s, ...),
on process 0 a tqdm bar (on a terminal or in a notebook) or log lines (``log_every``; in a log
file), and at the end ``workdir/export/``: the final model written by
``save_hf`` (``model_type`` ``Fast_dLLM_Qwen`` with ``bd_size`` for the block-diffusion
objective on a Qwen2 model) plus the tokenizer, loadable by ``fdllm_jax.load_model`` /
``load_tokenizer``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import math
import os
import sys
import time
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from fdllm_jax import attention as attention_lib
from fdllm_jax import checks
from fdllm_jax import sharding as sharding_lib
from fdllm_jax.checkpoints import keep_on_host, load_model, save_hf
from fdllm_jax.config import ModelConfig
from fdllm_jax.model import Transformer
from fdllm_jax.tokenizer import load_tokenizer
from fdllm_jax.training import data as data_lib
from fdllm_jax.training import objective as objective_lib

_log = logging.getLogger(__name__)
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
FINGERPRINT_VERSION = 1


# ----------------------------------------------------------------------------- configuration

@gin.configurable
def model_config(**fields) -> dict[str, Any]:
  """ModelConfig fields for ``init="scratch"`` (gin: ``model_config.hidden_size = 64`` ...).

  ``vocab_size`` may be left out: it is then the tokenizer's size (rounded up to
  ``TrainConfig.vocab_multiple``).
  """
  return dict(fields)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a run needs; bound from gin files (``TrainConfig.num_steps = 100``)."""

  # data
  data_files: str | tuple[str, ...] = ""
  tokenizer: str | None = None  # dir or hub id; default: the init checkpoint
  seq_len: int = 2048
  block_size: int = 32
  pad_mask_token: bool = True  # block_diffusion only; AR packs samples back to back
  # block_diffusion only, not in the reference: a sample ends at its last label, so a chat
  # sample's MASK padding starts right after its final <|im_end|> (the newline that ChatML
  # puts there is never masked and shows a noisy block where the answer ends; data.py)
  end_at_last_label: bool = False
  # block_diffusion noise (objective.sample_view_masks). The reference: t ~ U(0, 1) per block,
  # view B the complement of view A. Other values leave the paper's recipe.
  mask_ratio_range: tuple[float, float] = (0.0, 1.0)
  complementary_masks: bool = True
  # "sub_block" (not in the reference) trains the decoder's states: clean sub-blocks, one
  # partly masked sub-block of mask_sub_block_size tokens, MASK after it.
  mask_pattern: str = "bernoulli"
  mask_sub_block_size: int = 8
  # "active_sub_block" (sub_block pattern only): loss on the active sub-block's MASKs, the
  # MASKs after it are context only. "masked" (the reference): loss on every MASK.
  mask_loss: str = "masked"
  # block_diffusion only, not in the reference: adds ar_loss_weight x the plain next-token CE
  # under the causal mask on the same clean batch (a replay of stage 1), so a small model
  # keeps what its AR base knew. 0: the reference's objective alone.
  ar_loss_weight: float = 0.0
  # block_diffusion only, not in the reference: weight of the CE of predictions made at a MASK
  # (token shift: x_t at j - 1 is MASK), where parallel decoding commits tokens without their
  # left neighbour (objective.masked_input_weights). 1: the reference's unweighted loss.
  masked_input_loss_weight: float = 1.0
  # block_diffusion only, not in the reference: the focal loss's exponent on the block-diffusion
  # CE (each term times (1 - p)^gamma, p the target's probability; objective.py). 0: plain CE.
  diffusion_focal_gamma: float = 0.0
  shuffle: bool = True
  # model
  init: str = "checkpoint"  # "checkpoint" (HF dir / hub id) or "scratch" (model_config)
  checkpoint: str | None = None
  model: dict | None = None  # ModelConfig fields for init="scratch": @model_config()
  vocab_multiple: int = 1  # round a grown/derived vocabulary up to this multiple
  objective: str = "block_diffusion"  # or "autoregressive"
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  remat: bool = False
  attention_impl: str | None = None
  # LM head + cross-entropy over this many positions at a time (recomputed in the backward
  # pass), so [rows, seq_len, vocab] logits are never held at once; None: all in one piece.
  loss_chunk_size: int | None = 512
  # block_diffusion: one x_t^A ++ x_t^B ++ x_0 row per sample instead of two x_t ++ x_0 rows;
  # the same loss with a quarter less work (objective.py).
  share_clean_stream: bool = False
  # optimisation
  num_steps: int = 100
  global_batch_size: int = 8
  grad_accum_steps: int = 1
  learning_rate: float = 2e-5
  warmup_steps: int | None = None  # default: warmup_ratio * num_steps
  warmup_ratio: float = 0.03
  schedule: str = "constant"  # after warmup: "constant", "cosine" or "linear" decay
  min_lr_ratio: float = 0.0  # final lr / peak lr for cosine and linear
  weight_decay: float = 0.0  # decoupled, on matrices only
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  adam_eps: float = 1e-8
  max_grad_norm: float | None = 1.0
  seed: int = 0
  # parallelism
  mesh_shape: tuple[int, int, int] = (-1, 1, 1)  # (data, fsdp, tensor); one -1 = the rest
  # checkpoints, logging, export
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  async_checkpointing: bool = True
  # Process 0 reports progress: a tqdm bar on a terminal or in a notebook; otherwise (a log
  # file, a cluster job) one log line every log_every steps and at the last step. 0: every 5%
  # of num_steps.
  progress_bar: bool = True
  log_every: int = 0
  export: bool = True
  export_dtype: str | None = None  # default: param_dtype

  def validate(self) -> None:
    if not self.data_files:
      raise ValueError("TrainConfig.data_files is empty: name one or more jsonl files")
    if self.objective not in objective_lib.OBJECTIVES:
      raise ValueError(f"objective={self.objective!r} is unknown; use one of "
                       f"{objective_lib.OBJECTIVES}")
    if self.objective == "block_diffusion":
      objective_lib.check_block_shape(self.seq_len, self.block_size)
    if self.init not in ("checkpoint", "scratch"):
      raise ValueError(f"init={self.init!r} is unknown; use 'checkpoint' or 'scratch'")
    if self.init == "checkpoint" and not self.checkpoint:
      raise ValueError("init='checkpoint' needs TrainConfig.checkpoint (an HF dir or hub id)")
    if self.init == "scratch" and self.model is None:
      raise ValueError("init='scratch' needs TrainConfig.model = @model_config() with the "
                       "ModelConfig fields")
    if self.init == "scratch" and not (self.tokenizer or self.checkpoint):
      raise ValueError("init='scratch' needs TrainConfig.tokenizer (a tokenizer directory)")
    for name in ("param_dtype", "compute_dtype") + (("export_dtype",) if self.export_dtype
                                                     else ()):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(f"{name}={getattr(self, name)!r} is not supported; use one of "
                         f"{sorted(_DTYPES)}")
    if self.schedule not in ("constant", "cosine", "linear"):
      raise ValueError(f"schedule={self.schedule!r} is unknown; use 'constant', 'cosine' or "
                       f"'linear'")
    for name in ("num_steps", "global_batch_size", "grad_accum_steps", "checkpoint_every",
                 "keep_checkpoints", "seq_len", "block_size", "vocab_multiple"):
      value = getattr(self, name)
      if not checks.is_int(value) or value < 1:
        raise ValueError(f"TrainConfig.{name} must be a positive integer; got {value!r}")
    self._validate_optimisation()
    for name in ("pad_mask_token", "shuffle", "remat", "async_checkpointing", "progress_bar",
                 "export", "share_clean_stream", "complementary_masks", "end_at_last_label"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"TrainConfig.{name} must be True or False; got "
                         f"{getattr(self, name)!r}")
    sharding_lib.check_mesh_shape(self.mesh_shape)
    if self.attention_impl is not None and self.attention_impl not in attention_lib.IMPLEMENTATIONS:
      raise ValueError(f"attention_impl={self.attention_impl!r} is unknown; use None (the "
                       f"backend's default) or one of {attention_lib.IMPLEMENTATIONS}")
    log_every = self.log_every
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 0:
      raise ValueError(f"TrainConfig.log_every must be an integer >= 0 (0: every 5% of the "
                       f"steps); got {self.log_every!r}")
    objective_lib.check_loss_chunk_size(self.loss_chunk_size)
    objective_lib.check_mask_ratio_range(self.mask_ratio_range)
    objective_lib.check_mask_pattern(self.mask_pattern, self.block_size, self.mask_sub_block_size)
    if self.mask_loss not in ("masked", "active_sub_block"):
      raise ValueError(f"mask_loss={self.mask_loss!r} is unknown; use 'masked' or "
                       f"'active_sub_block'")
    if self.mask_loss == "active_sub_block" and self.mask_pattern != "sub_block":
      raise ValueError(f"mask_loss='active_sub_block' needs mask_pattern='sub_block'; got "
                       f"mask_pattern={self.mask_pattern!r}")
    if (not isinstance(self.ar_loss_weight, (int, float)) or isinstance(self.ar_loss_weight, bool)
        or not math.isfinite(self.ar_loss_weight) or self.ar_loss_weight < 0):
      raise ValueError(f"ar_loss_weight must be a finite number >= 0; got "
                       f"{self.ar_loss_weight!r}")
    if self.ar_loss_weight and self.objective != "block_diffusion":
      raise ValueError(f"ar_loss_weight={self.ar_loss_weight} needs "
                       f"objective='block_diffusion'; got objective={self.objective!r}")
    objective_lib.check_masked_input_weight(self.masked_input_loss_weight)
    objective_lib.check_focal_gamma(self.diffusion_focal_gamma)
    if self.diffusion_focal_gamma and self.objective != "block_diffusion":
      raise ValueError(f"diffusion_focal_gamma={self.diffusion_focal_gamma} needs "
                       f"objective='block_diffusion'; got objective={self.objective!r}")
    if self.masked_input_loss_weight != 1.0 and self.objective != "block_diffusion":
      raise ValueError(f"masked_input_loss_weight={self.masked_input_loss_weight} needs "
                       f"objective='block_diffusion'; got objective={self.objective!r}")
    if self.global_batch_size % self.grad_accum_steps:
      raise ValueError(f"global_batch_size={self.global_batch_size} is not divisible by "
                       f"grad_accum_steps={self.grad_accum_steps}")

  def _validate_optimisation(self) -> None:
    """The optimiser's numbers: each out-of-range value would train silently wrong (a negative
    clip norm or learning rate ascends; adam_eps = 0 or b = 1 give NaN)."""
    ranges = (
        ("learning_rate", "a finite number >= 0", lambda x: x >= 0),
        ("min_lr_ratio", "a number in [0, 1]", lambda x: 0 <= x <= 1),
        ("warmup_ratio", "a number in [0, 1]", lambda x: 0 <= x <= 1),
        ("weight_decay", "a finite number >= 0", lambda x: x >= 0),
        ("adam_b1", "a number in [0, 1)", lambda x: 0 <= x < 1),
        ("adam_b2", "a number in [0, 1)", lambda x: 0 <= x < 1),
        ("adam_eps", "a finite number > 0", lambda x: x > 0),
    )
    for name, accepted, in_range in ranges:
      value = getattr(self, name)
      if not _is_real(value) or not in_range(value):
        raise ValueError(f"TrainConfig.{name} must be {accepted}; got {value!r}")
    clip = self.max_grad_norm
    if clip is not None and (not _is_real(clip) or clip <= 0):
      raise ValueError(f"TrainConfig.max_grad_norm must be a finite number > 0, or None for no "
                       f"clipping; got {clip!r}")
    warmup = self.warmup_steps
    if warmup is not None and (not checks.is_int(warmup) or warmup < 0):
      raise ValueError(f"TrainConfig.warmup_steps must be an integer >= 0, or None for "
                       f"warmup_ratio x num_steps; got {warmup!r}")
    if not checks.is_int(self.seed) or not 0 <= self.seed < 2**32:
      raise ValueError(f"TrainConfig.seed must be an integer in [0, 2**32) (larger seeds wrap "
                       f"around); got {self.seed!r}")

  @property
  def data_paths(self) -> list[str]:
    files = [self.data_files] if isinstance(self.data_files, str) else list(self.data_files)
    return [os.path.abspath(os.path.expanduser(f)) for f in files]

  @property
  def num_warmup_steps(self) -> int:
    if self.warmup_steps is not None:
      return self.warmup_steps
    return int(math.ceil(self.warmup_ratio * self.num_steps))


def _is_real(value) -> bool:
  """A finite int or float, not a bool."""
  return checks.is_real(value) and math.isfinite(value)


# ----------------------------------------------------------------------------- params <-> model

def _str_keys(tree):
  return {str(k): _str_keys(v) if isinstance(v, dict) else v for k, v in tree.items()}


def _int_keys(tree):
  return {(int(k) if isinstance(k, str) and k.isdigit() else k):
          (_int_keys(v) if isinstance(v, dict) else v) for k, v in tree.items()}


def params_of(model: Transformer) -> dict:
  """The model's parameters as a nested dict with string keys (NNX paths)."""
  return _str_keys(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def build_model(config: ModelConfig, params: dict, *, dtype, remat: bool = False) -> Transformer:
  """A Transformer computing in ``dtype`` whose parameters are ``params`` (cast to ``dtype``)."""
  graphdef, state = nnx.split(
      nnx.eval_shape(lambda: Transformer(config, dtype=dtype, rngs=nnx.Rngs(0), remat=remat)))
  cast = jax.tree.map(lambda x: x.astype(dtype), params)
  nnx.replace_by_pure_dict(state, _int_keys(cast))
  return nnx.merge(graphdef, state)


def init_params(config: ModelConfig, *, dtype, seed: int) -> dict:
  """Random parameters of a new model (the initialisers of ``fdllm_jax.model``)."""
  return params_of(Transformer(config, dtype=dtype, rngs=nnx.Rngs(seed)))


def resize_vocab(config: ModelConfig, params: dict, new_vocab: int) -> tuple[ModelConfig, dict]:
  """Grows the embedding (and untied LM head) to ``new_vocab`` rows.

  New rows are the mean of the existing ones (a neutral start for MASK and other added
  tokens); existing rows are unchanged. Host numpy arrays in, host numpy arrays out.
  """
  old = config.vocab_size
  if new_vocab <= old:
    return config, params
  params = jax.tree.map(lambda x: x, params)  # new containers, same leaves
  embedding = np.asarray(params["embed_tokens"]["embedding"])
  extra = np.broadcast_to(embedding.mean(axis=0, keepdims=True), (new_vocab - old,
                                                                   embedding.shape[1]))
  params["embed_tokens"]["embedding"] = np.concatenate([embedding, extra.astype(embedding.dtype)])
  if "lm_head" in params:
    kernel = np.asarray(params["lm_head"]["kernel"])  # [D, V]
    extra = np.broadcast_to(kernel.mean(axis=1, keepdims=True), (kernel.shape[0], new_vocab - old))
    params["lm_head"]["kernel"] = np.concatenate([kernel, extra.astype(kernel.dtype)], axis=1)
  return dataclasses.replace(config, vocab_size=new_vocab), params


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


# ----------------------------------------------------------------------------- optimizer

def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
  """Linear warmup from 0 to ``learning_rate``, then constant, cosine or linear decay."""
  peak, warmup = config.learning_rate, config.num_warmup_steps
  decay_steps = max(config.num_steps - warmup, 1)
  end = peak * config.min_lr_ratio
  if config.schedule == "constant":
    after = optax.constant_schedule(peak)
  elif config.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.min_lr_ratio)
  else:
    after = optax.linear_schedule(peak, end, decay_steps)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
  adamw = optax.adamw(learning_rate_schedule(config), b1=config.adam_b1, b2=config.adam_b2,
                      eps=config.adam_eps, weight_decay=config.weight_decay, mask=decay_mask)
  if config.max_grad_norm is not None:
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)
  return adamw


# ----------------------------------------------------------------------------- data checkpoints

class DataStateHandler(ocp.CheckpointHandler):
  """Orbax handler for data iterator states: one JSON file per process, merged on restore.

  Saving takes a snapshot (a dict) rather than the live iterator, so an asynchronous save
  cannot record a state the loop has already moved past. Restoring reads every process's file
  and merges their rows, so a run may resume with another process count.
  """

  def save(self, directory: epath.Path, args: "DataStateSave"):
    index, count = jax.process_index(), jax.process_count()
    path = epath.Path(directory) / f"process_{index}-of-{count}.json"
    path.write_text(json.dumps(args.state))

  def restore(self, directory: epath.Path, args: "DataStateRestore | None" = None):
    files = sorted(glob.glob(os.path.join(os.fspath(directory), "process_*.json")))
    if not files:
      raise FileNotFoundError(f"{directory}: no data iterator state (process_*.json)")
    return data_lib.merge_row_states([json.loads(epath.Path(f).read_text()) for f in files])

  def metadata(self, directory):
    return None

  def finalize(self, directory):
    pass

  def close(self):
    pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: dict


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


class IncompatibleCheckpointError(ValueError):
  """The workdir holds checkpoints of a run that differs in model, data or batch layout."""


# ----------------------------------------------------------------------------- trainer

def check_batch_layout(config: TrainConfig, mesh) -> None:
  """The global batch must split evenly over the batch-parallel devices and micro-batches."""
  batch_devices = sharding_lib.batch_axis_size(mesh)
  if config.global_batch_size % (batch_devices * config.grad_accum_steps):
    raise ValueError(
        f"global_batch_size={config.global_batch_size} must be divisible by the batch-parallel "
        f"devices (data x fsdp = {batch_devices}) times grad_accum_steps="
        f"{config.grad_accum_steps}")


class TrainProgram:
  """The sharded state layout and the jitted train step of a (config, model, mesh): no data.

  ``Trainer`` drives it with real batches; ``benchmarks/train_speed.py`` with random ones.
  """

  def __init__(self, config: TrainConfig, model_config: ModelConfig, mesh, *,
               mask_id: int | None):
    if config.objective == "block_diffusion" and (mask_id is None or
                                                  not 0 <= mask_id < model_config.vocab_size):
      raise ValueError(f"MASK id {mask_id} is outside the model's vocabulary "
                       f"({model_config.vocab_size})")
    check_batch_layout(config, mesh)
    self.config, self.model_config, self.mesh, self.mask_id = config, model_config, mesh, mask_id
    self.param_dtype = _DTYPES[config.param_dtype]
    self.compute_dtype = _DTYPES[config.compute_dtype]
    self.optimizer = make_optimizer(config)
    abstract_params = params_of(nnx.eval_shape(
        lambda: Transformer(model_config, dtype=self.param_dtype, rngs=nnx.Rngs(0))))
    self.param_shardings = self._strict_param_shardings(abstract_params)
    abstract_opt = jax.eval_shape(self.optimizer.init, abstract_params)
    self.opt_shardings = sharding_lib.tree_shardings(abstract_opt, mesh)
    self.batch_sharding = sharding_lib.batch_sharding(mesh)
    self.replicated = sharding_lib.replicated(mesh)
    self.abstract_state = {
        "params": _with_shardings(abstract_params, self.param_shardings),
        "opt_state": _with_shardings(abstract_opt, self.opt_shardings),
    }
    self.batch_shape = (config.global_batch_size, config.seq_len)
    self.train_step = self._make_train_step()

  def _strict_param_shardings(self, abstract_params):
    def one(path, leaf):
      name = "/".join(sharding_lib._key_str(k) for k in path)
      return jax.sharding.NamedSharding(self.mesh,
                                        sharding_lib.spec_for(name, leaf.shape, self.mesh))
    return jax.tree_util.tree_map_with_path(one, abstract_params)

  def init_state(self, host_params: dict | None = None) -> dict:
    """Sharded params (random from ``seed``, or ``host_params``) and fresh optimizer state."""
    if host_params is None:
      init = jax.jit(lambda: init_params(self.model_config, dtype=self.param_dtype,
                                         seed=self.config.seed),
                     out_shardings=self.param_shardings)
      params = init()
    else:
      params = jax.tree.map(
          lambda host, sharding: _host_to_global(np.asarray(host, self.param_dtype), sharding),
          host_params, self.param_shardings)
    opt_state = jax.jit(self.optimizer.init, out_shardings=self.opt_shardings)(params)
    return {"params": params, "opt_state": opt_state}

  def _loss_sums(self, params, input_ids, labels, view_a, view_b, loss_a, loss_b):
    """(objective summed over label tokens, (label-token count, AR replay CE sum))."""
    config = self.config
    model = build_model(self.model_config, params, dtype=self.compute_dtype, remat=config.remat)
    ar_ce = jnp.zeros((), jnp.float32)
    if config.objective == "autoregressive":
      ce, count = objective_lib.autoregressive_loss_sums(
          model, input_ids, labels, attention_impl=config.attention_impl,
          loss_chunk_size=config.loss_chunk_size)
      return ce, (count, ar_ce)
    ce, count = objective_lib.block_diffusion_loss_sums(
        model, input_ids, labels, view_a, view_b, block_size=config.block_size,
        mask_id=self.mask_id, attention_impl=config.attention_impl,
        loss_chunk_size=config.loss_chunk_size, share_clean_stream=config.share_clean_stream,
        loss_masks=None if config.mask_loss == "masked" else (loss_a, loss_b),
        masked_input_weight=config.masked_input_loss_weight,
        focal_gamma=config.diffusion_focal_gamma)
    if config.ar_loss_weight:
      ar_ce, _ = objective_lib.autoregressive_loss_sums(
          model, input_ids, labels, attention_impl=config.attention_impl,
          loss_chunk_size=config.loss_chunk_size)
    return ce + config.ar_loss_weight * ar_ce, (count, ar_ce)

  def _make_train_step(self):
    config, accum = self.config, self.config.grad_accum_steps
    grad_fn = jax.value_and_grad(self._loss_sums, has_aux=True)
    micro_sharding = self.batch_sharding

    def step_fn(params, opt_state, input_ids, labels, step):
      rng = jax.random.fold_in(jax.random.key(config.seed), step)
      # the pattern picks the sampler; _loss_sums applies the loss masks if mask_loss asks
      view_a = view_b = loss_a = loss_b = jnp.zeros(labels.shape, bool)
      if config.objective == "block_diffusion" and config.mask_pattern == "sub_block":
        view_a, view_b, loss_a, loss_b = objective_lib.sample_sub_block_views(
            rng, labels, config.block_size, config.mask_sub_block_size,
            mask_ratio_range=tuple(config.mask_ratio_range),
            complementary=config.complementary_masks)
      elif config.objective == "block_diffusion":
        view_a, view_b = objective_lib.sample_view_masks(
            rng, labels, config.block_size, mask_ratio_range=tuple(config.mask_ratio_range),
            complementary=config.complementary_masks)
      if accum == 1:
        (objective_sum, (count, ar_ce_sum)), grad_sum = grad_fn(
            params, input_ids, labels, view_a, view_b, loss_a, loss_b)
      else:
        def split(x):  # micro-batch m = rows m, m + accum, ...: every device keeps its share
          x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
          return jax.lax.with_sharding_constraint(
              x, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(
                  None, *micro_sharding.spec)))

        def body(carry, micro):
          (objective, (n, ar_ce)), g = grad_fn(params, *micro)
          return jax.tree.map(jnp.add, carry, (g, objective, n, ar_ce)), None

        zero = jnp.zeros((), jnp.float32)
        (grad_sum, objective_sum, count, ar_ce_sum), _ = jax.lax.scan(
            body, (jax.tree.map(jnp.zeros_like, params), zero, zero, zero),
            tuple(split(x) for x in (input_ids, labels, view_a, view_b, loss_a, loss_b)))
      denom = jnp.maximum(count, 1.0)
      grads = jax.tree.map(lambda g: g / denom, grad_sum)
      grad_norm = _global_norm(grads)
      updates, opt_state = self.optimizer.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      # "loss" is the objective the optimizer sees; with AR replay, "ar_loss" is its AR part
      # (unweighted) and "diffusion_loss" the rest, comparable with runs without replay
      metrics = {"loss": objective_sum / denom, "grad_norm": grad_norm,
                 "num_label_tokens": count, "lr": learning_rate_schedule(config)(step)}
      if config.ar_loss_weight:
        metrics["ar_loss"] = ar_ce_sum / denom
        metrics["diffusion_loss"] = (objective_sum - config.ar_loss_weight * ar_ce_sum) / denom
      return params, opt_state, metrics

    return jax.jit(
        step_fn,
        in_shardings=(self.param_shardings, self.opt_shardings, self.batch_sharding,
                      self.batch_sharding, self.replicated),
        out_shardings=(self.param_shardings, self.opt_shardings, self.replicated),
        donate_argnums=(0, 1))


class Trainer:
  """Builds everything a run needs; ``run()`` trains to ``num_steps`` and returns the metrics."""

  def __init__(self, config: TrainConfig, workdir: str, *, mesh=None):
    config.validate()
    self.config = config
    self.workdir = os.path.abspath(workdir)
    self.mesh = mesh if mesh is not None else sharding_lib.make_mesh(config.mesh_shape)
    check_batch_layout(config, self.mesh)
    self.is_main = jax.process_index() == 0
    self.source = data_lib.JsonlSource(config.data_paths)
    self.tokenizer = load_tokenizer(config.tokenizer or config.checkpoint)
    self.mask_id = self.tokenizer.mask_id
    self.model_config, self._host_params = self._initial_model()
    self.program = TrainProgram(config, self.model_config, self.mesh, mask_id=self.mask_id)
    self.abstract_state = self.program.abstract_state
    self.batch_sharding = self.program.batch_sharding
    self.train_step = self.program.train_step
    self.batch_shape = self.program.batch_shape
    self.rows = sharding_lib.process_rows(self.batch_sharding, self.batch_shape)
    self.checkpoints = ocp.CheckpointManager(
        os.path.join(self.workdir, "checkpoints"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=config.keep_checkpoints, create=True,
            enable_async_checkpointing=config.async_checkpointing))
    self.metrics_path = os.path.join(self.workdir, "metrics.jsonl")
    self.export_dir = os.path.join(self.workdir, "export")

  # -- model

  def _initial_model(self) -> tuple[ModelConfig, dict | None]:
    config, tok_size = self.config, self.tokenizer.vocab_size
    if config.init == "scratch":
      fields = dict(config.model)
      fields.setdefault("vocab_size", _round_up(tok_size, config.vocab_multiple))
      model_config = ModelConfig(**fields)
      host_params = None
    else:
      # Host arrays only: init_state shards them, so no device ever holds the whole model.
      model = load_model(config.checkpoint, dtype=config.param_dtype, place=keep_on_host)
      model_config = model.config
      host_params = jax.tree.map(np.asarray, params_of(model))
      del model
      if tok_size > model_config.vocab_size:  # e.g. MASK added to a vocabulary without a free row
        new_vocab = _round_up(tok_size, config.vocab_multiple)
        _log.warning("tokenizer has %d ids but the checkpoint's vocabulary only %d rows: growing "
                     "the embedding%s to %d rows (new rows = mean of the old ones)", tok_size,
                     model_config.vocab_size, "" if model_config.tie_word_embeddings else
                     " and LM head", new_vocab)
        model_config, host_params = resize_vocab(model_config, host_params, new_vocab)
    if tok_size > model_config.vocab_size:
      raise ValueError(f"the tokenizer has {tok_size} ids but the model's vocab_size is only "
                       f"{model_config.vocab_size}")
    return model_config, host_params

  def initial_state(self) -> dict:
    """Fresh params (sharded) and optimizer state."""
    state = self.program.init_state(self._host_params)
    self._host_params = None
    return state

  def device_batch(self, batch: dict[str, np.ndarray]) -> tuple[jax.Array, jax.Array]:
    """Global arrays from this process's rows of a batch."""
    return tuple(sharding_lib.global_array(batch[k], self.rows, self.batch_sharding,
                                           self.batch_shape) for k in ("input_ids", "labels"))

  def data_iterator(self) -> data_lib.BatchIterator:
    config = self.config
    return data_lib.BatchIterator(
        self.source, self.tokenizer, global_batch_size=config.global_batch_size,
        seq_len=config.seq_len, block_size=config.block_size,
        pad_mask_token=config.pad_mask_token and config.objective == "block_diffusion",
        seed=config.seed, shuffle=config.shuffle, rows=self.rows,
        end_at_last_label=config.end_at_last_label and config.objective == "block_diffusion")

  # -- checkpoints

  def fingerprint(self) -> dict[str, Any]:
    """What must not change between a run and its resumption."""
    config = self.config
    return _json_normal({
        "version": FINGERPRINT_VERSION,
        "objective": config.objective,
        "model_config": dataclasses.asdict(self.model_config),
        "param_dtype": config.param_dtype,
        "data_files": config.data_paths,
        "tokenizer_size": self.tokenizer.vocab_size,
        "mask_id": self.mask_id,
        "seq_len": config.seq_len,
        "block_size": config.block_size,
        "global_batch_size": config.global_batch_size,
        "pad_mask_token": config.pad_mask_token,
        # only when set, so that checkpoints written before the option still resume
        **({"end_at_last_label": True} if config.end_at_last_label else {}),
        "shuffle": config.shuffle,
        "seed": config.seed,
        # the optimiser state's structure
        "optimizer": "clip+adamw" if config.max_grad_norm is not None else "adamw",
    })

  def run_settings(self) -> dict[str, Any]:
    """Settings a resumed run may change (a warning names them): schedule, layout, speed."""
    config = self.config
    return _json_normal({name: getattr(config, name) for name in (
        "num_steps", "learning_rate", "warmup_steps", "warmup_ratio", "schedule", "min_lr_ratio",
        "weight_decay", "adam_b1", "adam_b2", "adam_eps", "max_grad_norm", "grad_accum_steps",
        "mesh_shape", "compute_dtype", "remat", "attention_impl", "loss_chunk_size",
        "mask_ratio_range", "complementary_masks", "mask_pattern", "mask_sub_block_size",
        "mask_loss", "ar_loss_weight", "masked_input_loss_weight", "diffusion_focal_gamma",
        "share_clean_stream")})

  def _check_fingerprint(self, step: int, saved: dict) -> None:
    saved = dict(saved)
    saved_settings = saved.pop("settings", {})
    current = self.fingerprint()
    diffs = [f"{key}: checkpoint {saved.get(key)!r} != this run {current.get(key)!r}"
             for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]
    changed = {k: (saved_settings.get(k), v) for k, v in self.run_settings().items()
               if k in saved_settings and saved_settings[k] != v}
    if changed and not diffs:
      _log.warning("resuming step %d with changed settings (checkpoint -> now): %s", step,
                   ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    if diffs:
      raise IncompatibleCheckpointError(
          f"{self.workdir} holds a checkpoint (step {step}) of a different run; use a new "
          f"--workdir or delete {os.path.join(self.workdir, 'checkpoints')}. Differences:\n  "
          + "\n  ".join(diffs))

  def restore_or_init(self, data_iter: data_lib.BatchIterator) -> tuple[dict, int]:
    step = self.checkpoints.latest_step()
    if step is None:
      return self.initial_state(), 0
    try:
      saved = self.checkpoints.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 - reported as the user's problem to act on
      raise IncompatibleCheckpointError(
          f"{self.workdir}: checkpoint step {step} is not a checkpoint of this trainer "
          f"({type(e).__name__}: {e}); use a new --workdir") from None
    self._check_fingerprint(step, saved["run"])
    restored = self.checkpoints.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(self.abstract_state), data=DataStateRestore()))
    data_iter.set_state(restored["data"])
    self._host_params = None
    _log.info("resumed from %s step %d", self.workdir, step)
    return dict(restored["state"]), step

  def save(self, step: int, state: dict, data_iter: data_lib.BatchIterator) -> None:
    self.checkpoints.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=DataStateSave(data_iter.get_state()),
        run=ocp.args.JsonSave({**self.fingerprint(), "settings": self.run_settings()})),
        force=True)

  # -- loop

  def run(self) -> list[dict[str, Any]]:
    """Trains (resuming when possible) to ``num_steps``; returns the metrics of this call."""
    config = self.config
    os.makedirs(self.workdir, exist_ok=True)
    data_iter = self.data_iterator()
    state, start = self.restore_or_init(data_iter)
    if self.is_main:
      _truncate_metrics(self.metrics_path, start)
      with open(os.path.join(self.workdir, "config.gin"), "w") as f:
        f.write(gin.config_str())
    tokens_per_step = config.global_batch_size * config.seq_len
    report = self.is_main and config.progress_bar
    bar = _progress_bar(config, start, enabled=report and _interactive())
    log_every = (config.log_every or max(1, config.num_steps // 20)) if report else 0
    history, pending, last_time = [], None, time.perf_counter()
    params, opt_state = state["params"], state["opt_state"]
    # The mesh context lets shard_map-based attention (splash on TPU) find the mesh.
    mesh_context = jax.set_mesh(self.mesh) if hasattr(jax, "set_mesh") else contextlib.nullcontext()
    try:
      mesh_context.__enter__()
      for step in range(start, config.num_steps):
        input_ids, labels = self.device_batch(next(data_iter))
        params, opt_state, metrics = self.train_step(params, opt_state, input_ids, labels,
                                                     np.int32(step))
        if pending is not None:  # fetch the previous step while this one runs
          last_time = self._record(pending, last_time, tokens_per_step, history, bar, log_every)
        pending = (step + 1, metrics, step == start)
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.num_steps:
          self.save(step + 1, {"params": params, "opt_state": opt_state}, data_iter)
      if pending is not None:
        self._record(pending, last_time, tokens_per_step, history, bar, log_every)
      self.checkpoints.wait_until_finished()
    finally:
      mesh_context.__exit__(None, None, None)
      if bar is not None:
        bar.close()
    self.final_state = {"params": params, "opt_state": opt_state}
    if config.export:
      self.export(params)
    return history

  def _record(self, pending, last_time, tokens_per_step, history, bar, log_every) -> float:
    step, metrics, includes_compile = pending
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    now = time.perf_counter()
    seconds = now - last_time
    record = {"step": step, **values, "step_time_s": seconds,
              "tokens_per_s": tokens_per_step / seconds if seconds > 0 else None,
              "includes_compile": includes_compile}
    history.append(record)
    if self.is_main:
      with open(self.metrics_path, "a") as f:
        f.write(json.dumps(record) + "\n")
      if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}",
                        gnorm=f"{values['grad_norm']:.3f}",
                        tok_s=f"{record['tokens_per_s'] or 0:.0f}")
      elif log_every and (step % log_every == 0 or step == self.config.num_steps):
        _log.info("step %d/%d: loss %.4f, lr %.2e, grad norm %.3f, %.2f s/step, %.0f tokens/s",
                  step, self.config.num_steps, values["loss"], values["lr"],
                  values["grad_norm"], seconds, record["tokens_per_s"] or 0.0)
    return now

  # -- export

  def export(self, params: dict, directory: str | None = None) -> str | None:
    """Writes the model (``save_hf``) and tokenizer to ``directory`` (default workdir/export)."""
    directory = directory or self.export_dir
    dtype = _DTYPES[self.config.export_dtype or self.config.param_dtype]
    host = jax.tree.map(lambda x: _to_host(x).astype(dtype), params)  # every process gathers
    if not self.is_main:
      return None
    export_config = self.model_config
    if self.config.objective == "block_diffusion" and export_config.model_type == "qwen2":
      export_config = dataclasses.replace(export_config, model_type="Fast_dLLM_Qwen",
                                          bd_size=self.config.block_size)
    elif self.config.objective == "block_diffusion":
      export_config = dataclasses.replace(export_config, bd_size=self.config.block_size)
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: Transformer(export_config, dtype=dtype, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, _int_keys(host))
    save_hf(nnx.merge(graphdef, state), directory)
    self.tokenizer.save(directory)
    return directory

  def close(self):
    self.checkpoints.close()


# ----------------------------------------------------------------------------- helpers

def _global_norm(tree):
  tree_utils = getattr(optax, "tree", None)
  if tree_utils is not None and hasattr(tree_utils, "norm"):
    return tree_utils.norm(tree)
  return optax.global_norm(tree)


def _with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def _host_to_global(host: np.ndarray, sharding) -> jax.Array:
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _to_host(x: jax.Array) -> np.ndarray:
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _json_normal(value):
  return json.loads(json.dumps(value))


def _truncate_metrics(path: str, last_step: int) -> None:
  """Drops lines past ``last_step`` (left by a killed run) so each step is logged once."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  kept = [line for line in lines if json.loads(line).get("step", 0) <= last_step]
  with open(path + ".tmp", "w") as f:
    f.writelines(kept)
  os.replace(path + ".tmp", path)


def _interactive() -> bool:
  """Whether a progress bar can redraw in place: stderr is a terminal, or a notebook kernel
  runs (tqdm.auto draws a widget there); in a log file every redraw would be appended."""
  if "ipykernel" in sys.modules:
    return True
  isatty = getattr(sys.stderr, "isatty", None)
  return bool(isatty and isatty())


def _progress_bar(config: TrainConfig, start: int, *, enabled: bool):
  if not enabled:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=config.num_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of ``workdir/metrics.jsonl`` (the last one per step)."""
  by_step = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      if line.strip():
        record = json.loads(line)
        by_step[record["step"]] = record
  return [by_step[s] for s in sorted(by_step)]


def train(workdir: str, config: TrainConfig | None = None) -> list[dict[str, Any]]:
  """Runs one training job (``TrainConfig()`` from gin bindings when not given)."""
  trainer = Trainer(config or TrainConfig(), workdir)
  try:
    return trainer.run()
  finally:
    trainer.close()
