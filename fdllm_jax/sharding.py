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
HEAD_AXIS = "tensor"           # attention heads are split over it

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


# ----------------------------------------------------------------------------- kernels on a mesh

def context_mesh():
  """The mesh set by ``jax.set_mesh`` / ``jax.sharding.use_mesh`` / ``with mesh:``, or None."""
  try:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is not None and not mesh.empty:
      return mesh
  except AttributeError:  # pragma: no cover - older jax
    pass
  try:
    from jax._src import mesh as mesh_lib  # the legacy `with mesh:` context
    mesh = mesh_lib.thread_resources.env.physical_mesh
    if not mesh.empty:
      return mesh
  except (ImportError, AttributeError):  # pragma: no cover
    pass
  return None


def _shard_map(fn, mesh, in_specs, out_specs):
  if hasattr(jax, "shard_map"):
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  from jax.experimental.shard_map import shard_map  # pragma: no cover - jax < 0.6
  return shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def _attention_batch_spec(mesh, batch: int):
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
  while axes and batch % math.prod(mesh.shape[a] for a in axes):
    axes = axes[:-1]
  if not axes:
    return None
  return axes if len(axes) > 1 else axes[0]


def _head_split(mesh, num_heads: int, num_kv_heads: int, head_axis: str):
  """(query-head axis, KV-head axis, pick one KV head per shard) for ``head_axis``."""
  n_heads = mesh.shape.get(head_axis, 1) if head_axis in mesh.axis_names else 1
  if n_heads > 1 and num_heads % n_heads == 0 and num_kv_heads % n_heads == 0:
    return head_axis, head_axis, False
  if n_heads > 1 and num_heads % n_heads == 0 and n_heads % num_kv_heads == 0:
    return head_axis, None, True
  return None, None, False


def describe_attention_sharding(mesh, batch: int, num_heads: int, num_kv_heads: int,
                                head_axis: str = HEAD_AXIS) -> dict:
  """How :func:`shard_attention` splits work on ``mesh`` (for logs and the README recipe)."""
  q_heads, kv_heads, _ = _head_split(mesh, num_heads, num_kv_heads, head_axis)
  heads = ("q and kv heads split" if kv_heads else
           "q heads split, one kv head picked per shard" if q_heads else "heads replicated")
  return {"batch_axes": _attention_batch_spec(mesh, batch), "heads": heads}


def shard_attention(local, q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, q_offset_B=None, kv_lengths_B=None,
                    *, mesh=None, head_axis: str = HEAD_AXIS):
  """``local(q, k, v, q_offset_B, kv_lengths_B)`` (an attention kernel) run on each device's
  shard: XLA's SPMD pass cannot partition a Pallas / Mosaic / Triton kernel call (it would
  gather the inputs onto every device), so under a mesh with more than one device it runs
  inside ``jax.shard_map``, batch split over the mesh's ``data`` / ``fsdp`` axes (those that
  divide it) and heads over ``head_axis``. KV heads are split the same way when the axis
  divides them, else each shard picks the KV head its query heads share (the axis size must
  then be a multiple of the KV-head count); otherwise heads stay whole. Without a mesh (or on
  one device) ``local`` runs as it is.
  """
  if mesh is None or math.prod(mesh.shape.values()) == 1:
    return local(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, q_offset_B, kv_lengths_B)
  batch, _, num_heads, _ = q_BxTxHxD.shape
  num_kv_heads = k_BxSxKxD.shape[2]
  batch_axes = _attention_batch_spec(mesh, batch)
  q_heads, kv_heads, pick_kv = _head_split(mesh, num_heads, num_kv_heads, head_axis)
  heads_per_shard = num_heads // mesh.shape[head_axis] if q_heads else num_heads
  group = num_heads // num_kv_heads

  def body(q, k, v, q_offset, kv_lengths):
    if pick_kv:
      kv_head = jax.lax.axis_index(head_axis) * heads_per_shard // group
      k = jax.lax.dynamic_slice_in_dim(k, kv_head, 1, axis=2)
      v = jax.lax.dynamic_slice_in_dim(v, kv_head, 1, axis=2)
    return local(q, k, v, q_offset, kv_lengths)

  q_spec = P(batch_axes, None, q_heads, None)
  kv_spec = P(batch_axes, None, kv_heads, None)
  args = [q_BxTxHxD, k_BxSxKxD, v_BxSxKxD]
  specs = [q_spec, kv_spec, kv_spec]
  present = []
  for extra in (q_offset_B, kv_lengths_B):
    if extra is not None:
      args.append(jax.numpy.broadcast_to(jax.numpy.asarray(extra, jax.numpy.int32), (batch,)))
      specs.append(P(batch_axes))
    present.append(extra is not None)

  def wrapped(q, k, v, *rest):
    rest = list(rest)
    q_offset = rest.pop(0) if present[0] else None
    kv_lengths = rest.pop(0) if present[1] else None
    return body(q, k, v, q_offset, kv_lengths)

  return _shard_map(wrapped, mesh, tuple(specs), q_spec)(*args)
