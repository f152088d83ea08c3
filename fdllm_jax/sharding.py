"""Meshes, partition rules and multi-host start-up.

The mesh has three axes:

* ``data``: pure data parallelism (parameters replicated);
* ``fsdp``: data parallelism with parameters and optimizer state sharded (ZeRO-3 style: the
  batch is split over ``data`` x ``fsdp``, every weight matrix is split over ``fsdp`` on its
  ``hidden_size`` side and gathered by XLA when used);
* ``tensor``: Megatron-style tensor parallelism (attention heads, MLP hidden units and the
  vocabulary are split over it).

Partition rules map the flat parameter names of ``fdllm_jax.training.trainer`` (the NNX paths
joined by "/", e.g. ``layers/3/self_attn/q_proj/kernel``) to ``PartitionSpec``s. Every Qwen2 /
Llama parameter has a rule (``spec_for`` raises on an unknown name). A dimension that the mesh
axis does not divide is replicated instead (logged once), so odd test sizes still run.
Optimizer-state leaves carry the parameter name at the end of their path and get the same
spec; scalars (step counts) are replicated.
"""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fdllm_jax import checks

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both

# (regex on the parameter name, spec). Kernels are [in, out] (NNX layout), embedding [V, D].
PARTITION_RULES: tuple[tuple[str, P], ...] = (
    (r"(^|/)embed_tokens/embedding$", P("tensor", "fsdp")),
    (r"(^|/)lm_head/kernel$", P("fsdp", "tensor")),
    (r"(^|/)self_attn/(q_proj|k_proj|v_proj)/kernel$", P("fsdp", "tensor")),
    (r"(^|/)self_attn/(q_proj|k_proj|v_proj)/bias$", P("tensor")),
    (r"(^|/)self_attn/o_proj/kernel$", P("tensor", "fsdp")),
    (r"(^|/)mlp/(gate_proj|up_proj)/kernel$", P("fsdp", "tensor")),
    (r"(^|/)mlp/down_proj/kernel$", P("tensor", "fsdp")),
    (r"(^|/)(input_layernorm|post_attention_layernorm)/weight$", P()),
    (r"(^|/)norm/weight$", P()),
)

_log = logging.getLogger(__name__)
_warned: set = set()


# ----------------------------------------------------------------------------- meshes

def check_mesh_shape(mesh_shape: Sequence[int]) -> None:
  """Raises unless ``mesh_shape`` is 3 integers (data, fsdp, tensor), each positive or one -1."""
  if isinstance(mesh_shape, (str, bytes)) or not isinstance(mesh_shape, Sequence):
    raise ValueError(f"mesh_shape must be 3 integers (data, fsdp, tensor); got {mesh_shape!r}")
  if len(mesh_shape) != 3:
    raise ValueError(f"mesh_shape must have 3 entries (data, fsdp, tensor); got {mesh_shape}")
  if (not all(checks.is_int(s) for s in mesh_shape) or list(mesh_shape).count(-1) > 1
      or any(s == 0 or s < -1 for s in mesh_shape)):
    raise ValueError(f"mesh_shape {tuple(mesh_shape)}: entries must be positive integers, with "
                     f"at most one -1 (inferred)")


def make_mesh(mesh_shape: Sequence[int] = (-1, 1, 1), devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh over ``devices`` (default: all devices of all processes).

  One entry of ``mesh_shape`` may be -1: it takes whatever the other two leave.
  """
  devices = list(jax.devices() if devices is None else devices)
  check_mesh_shape(mesh_shape)
  shape = [int(s) for s in mesh_shape]
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"mesh_shape {tuple(mesh_shape)}: {len(devices)} devices are not a "
                       f"multiple of {known}")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh_shape {tuple(mesh_shape)} (data, fsdp, tensor) needs "
                     f"{math.prod(shape)} devices, but {len(devices)} are available "
                     f"({jax.process_count()} process(es)); make the product equal the device "
                     f"count or use -1 for one axis")
  try:
    from jax.experimental import mesh_utils
    device_array = mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # unusual topologies: plain order (processes stay contiguous)
    device_array = np.asarray(devices, dtype=object).reshape(shape)
  return _mesh(device_array)


def _mesh(device_array) -> Mesh:
  try:  # jax >= 0.6 has axis types; Auto keeps GSPMD propagation whatever the default becomes
    from jax.sharding import AxisType
    return Mesh(device_array, AXES, axis_types=(AxisType.Auto,) * len(AXES))
  except (ImportError, TypeError):
    return Mesh(device_array, AXES)


def batch_axis_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[batch, seq] arrays: batch split over (data, fsdp), replicated over tensor."""
  return NamedSharding(mesh, P(BATCH_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# ----------------------------------------------------------------------------- rules

def spec_for(name: str, shape: Sequence[int], mesh: Mesh | None = None,
             rules=PARTITION_RULES) -> P:
  """The PartitionSpec of parameter ``name``; axes the mesh does not divide are dropped."""
  for pattern, spec in rules:
    if re.search(pattern, name):
      break
  else:
    raise KeyError(f"no partition rule matches parameter {name!r}; add one to "
                   f"fdllm_jax.sharding.PARTITION_RULES")
  if len(spec) > len(shape):
    raise ValueError(f"partition rule {spec} has more dimensions than parameter {name!r} "
                     f"{tuple(shape)}")
  if mesh is None:
    return spec
  fitted = []
  for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    size = 1 if axis is None else math.prod(mesh.shape[a] for a in _as_tuple(axis))
    if axis is not None and dim % size:
      key = (name, axis, dim)
      if key not in _warned:
        _warned.add(key)
        _log.info("replicating dim %d of %s: mesh axis %s (size %d) does not divide it",
                  dim, name, axis, size)
      axis = None
    fitted.append(axis)
  return P(*fitted)


def place_on_mesh(mesh: Mesh, rules=PARTITION_RULES):
  """A ``load_model(place=...)`` that puts each parameter straight into its sharding on
  ``mesh`` (the partition rules' ``spec_for``): each device receives only its shards, on every
  process of a multi-host run (each reads the whole tensor from the checkpoint and keeps the
  slices its devices own)."""
  def place(name: str, host: np.ndarray) -> jax.Array:
    sharding = NamedSharding(mesh, spec_for(name, host.shape, mesh, rules))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  return place


def _as_tuple(axis) -> tuple:
  return axis if isinstance(axis, tuple) else (axis,)


def param_shardings(shapes: Mapping[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
  """{name: NamedSharding} for a flat dict of parameter arrays or ShapeDtypeStructs."""
  return {name: NamedSharding(mesh, spec_for(name, leaf.shape, mesh))
          for name, leaf in shapes.items()}


def tree_shardings(tree, mesh: Mesh):
  """Shardings of any pytree whose array leaves end in a parameter name (e.g. optax state).

  A leaf's path is joined with "/"; the rule of the parameter name it ends with applies.
  Scalars and leaves no rule matches are replicated.
  """
  def leaf_sharding(path, leaf):
    shape = getattr(leaf, "shape", ())
    if not shape:
      return replicated(mesh)
    name = "/".join(_key_str(k) for k in path)
    try:
      return NamedSharding(mesh, spec_for(name, shape, mesh))
    except KeyError:
      return replicated(mesh)
  return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def _key_str(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


# ----------------------------------------------------------------------------- multi-host

def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           *, auto: bool = False, cpu_collectives: str = "gloo") -> None:
  """Starts ``jax.distributed`` when more than one process is asked for (or ``auto``).

  ``auto`` lets JAX detect the cluster (SLURM, Cloud TPU, Kubernetes, ...). On CPU the
  cross-process collectives use ``cpu_collectives`` (gloo). Must run before any other JAX call.
  """
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"num_processes must be >= 1; got {num_processes}")
  if not auto and (num_processes is None or num_processes <= 1):
    return
  if not auto:
    if coordinator_address is None or process_id is None:
      raise ValueError("multi-process training needs coordinator_address, num_processes and "
                       f"process_id; got {coordinator_address!r}, {num_processes!r}, "
                       f"{process_id!r}")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"process_id {process_id} is outside [0, {num_processes})")
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if cpu_collectives and (platforms == "" or "cpu" in platforms.split(",")):
    try:
      jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    except (AttributeError, ValueError, KeyError):
      pass  # option renamed or removed: the backend's default applies
  if auto:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)


def process_rows(sharding: NamedSharding, global_shape: Sequence[int]) -> list[int]:
  """Indices along axis 0 of the global array that this process's devices hold."""
  rows = set()
  for index in sharding.addressable_devices_indices_map(tuple(global_shape)).values():
    rows.update(range(*index[0].indices(global_shape[0])))
  return sorted(rows)


def global_array(local_rows: np.ndarray, rows: Sequence[int], sharding: NamedSharding,
                 global_shape: Sequence[int]) -> jax.Array:
  """A global jax.Array from the rows ``rows`` (this process's) of a [batch, ...] array."""
  position = {r: i for i, r in enumerate(rows)}

  def fetch(index):
    wanted = range(*index[0].indices(global_shape[0]))
    return local_rows[[position[r] for r in wanted]][(slice(None),) + tuple(index[1:])]

  return jax.make_array_from_callback(tuple(global_shape), sharding, fetch)
