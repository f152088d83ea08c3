"""Hugging Face checkpoints <-> NNX models.

``load_model`` reads ``config.json`` plus ``model.safetensors`` (or a sharded index) from a local
directory, or downloads them from the hub when no such directory exists. Tensors are read one
at a time from a memory map and placed on the device, so the host never holds two full copies.
``save_hf`` writes the same layout back, loadable by transformers and the reference's code.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import struct
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from fdllm_jax.config import ModelConfig
from fdllm_jax.model import Transformer

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"

_DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64),
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_ALLOWED_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ----------------------------------------------------------------------------- HF name mapping

def hf_to_path(name: str) -> tuple[tuple, bool]:
  """HF tensor name -> (our NNX state path, whether to transpose a torch [out, in] weight)."""
  parts = name.split(".")
  if parts[0] == "model":
    parts = parts[1:]
  if parts == ["embed_tokens", "weight"]:
    return ("embed_tokens", "embedding"), False
  if parts == ["norm", "weight"]:
    return ("norm", "weight"), False
  if parts == ["lm_head", "weight"]:
    return ("lm_head", "kernel"), True
  if len(parts) >= 4 and parts[0] == "layers" and parts[1].isdigit():
    layer, rest = int(parts[1]), parts[2:]
    if rest[-1] == "weight" and rest[0].endswith("layernorm"):
      return ("layers", layer, rest[0], "weight"), False
    if rest[-1] == "weight":
      return ("layers", layer, *rest[:-1], "kernel"), True
    if rest[-1] == "bias":
      return ("layers", layer, *rest[:-1], "bias"), False
  raise KeyError(name)


def path_to_hf(path: tuple) -> tuple[str, bool]:
  """Our NNX state path -> (HF tensor name, whether to transpose)."""
  *head, leaf = [str(p) for p in path]
  if head == ["lm_head"]:
    return "lm_head.weight", True
  if head == ["embed_tokens"]:
    return "model.embed_tokens.weight", False
  name = "model." + ".".join(head) + "." + ("weight" if leaf in ("kernel", "weight") else leaf)
  return name, leaf == "kernel"


# ----------------------------------------------------------------------------- safetensors I/O

def read_safetensors_header(path: str) -> tuple[dict, int]:
  """(tensor table, byte offset of the data section) of one safetensors file."""
  with open(path, "rb") as f:
    raw_len = f.read(8)
    if len(raw_len) != 8:
      raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    (header_len,) = struct.unpack("<Q", raw_len)
    try:
      header = json.loads(f.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
  header.pop("__metadata__", None)
  return header, 8 + header_len


def read_tensor(path: str, name: str) -> np.ndarray:
  """One tensor of a safetensors file, copied out of it."""
  header, data_start = read_safetensors_header(path)
  info = header[name]
  dtype = _DTYPES[info["dtype"]]
  begin, end = info["data_offsets"]
  with open(path, "rb") as f:
    f.seek(data_start + begin)
    data = f.read(end - begin)
  return np.frombuffer(data, dtype=dtype).reshape(info["shape"]).copy()


def _skips_tied_head(files: Sequence[str], config: ModelConfig) -> bool:
  """Whether a tied checkpoint also stores ``lm_head.weight``, equal to the embedding: it is
  then skipped, as transformers does. A different one is refused: transformers unties them."""
  if not config.tie_word_embeddings:
    return False
  where = {name: file for file in files for name in read_safetensors_header(file)[0]}
  if "lm_head.weight" not in where:
    return False
  head = read_tensor(where["lm_head.weight"], "lm_head.weight")
  embed_name = "model.embed_tokens.weight"
  if embed_name in where and np.array_equal(head, read_tensor(where[embed_name], embed_name)):
    return True
  raise ValueError(f"{where['lm_head.weight']}: config.json ties the embeddings "
                   f"(tie_word_embeddings=true) but the checkpoint holds an lm_head.weight that "
                   f"differs from {embed_name} (transformers then unties them); set "
                   f"tie_word_embeddings to false in config.json to load it as its own head")


def iter_safetensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (name, read-only array view into a memory map), one tensor at a time.

  A view is valid only until the next tensor is requested: its pages are then released
  (``MADV_DONTNEED``), so reading a checkpoint never keeps the whole file resident.
  """
  header, data_start = read_safetensors_header(path)
  with open(path, "rb") as f:
    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  page = mmap.PAGESIZE
  try:
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
      if info["dtype"] not in _DTYPES:
        raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, not one of "
                         f"{sorted(_DTYPES)}")
      dtype = _DTYPES[info["dtype"]]
      begin, end = (data_start + o for o in info["data_offsets"])
      if end > len(mapped) or (end - begin) != int(np.prod(info["shape"])) * dtype.itemsize:
        raise ValueError(f"{path}: tensor {name!r} has a byte range that does not match its "
                         f"shape {info['shape']} and dtype {info['dtype']} (truncated file?)")
      array = np.frombuffer(mapped, dtype=dtype, count=(end - begin) // dtype.itemsize,
                            offset=begin).reshape(info["shape"])
      yield name, array
      del array
      if hasattr(mmap, "MADV_DONTNEED"):
        aligned = begin - begin % page
        mapped.madvise(mmap.MADV_DONTNEED, aligned, end - aligned)
  finally:
    try:
      mapped.close()
    except BufferError:  # a caller still holds a view; the map is freed with it
      pass


@dataclasses.dataclass(frozen=True)
class TensorEntry:
  """A tensor to write: its header fields, and ``fetch()`` producing the host array on demand."""

  name: str
  shape: tuple[int, ...]
  dtype: np.dtype
  fetch: Callable[[], np.ndarray]

  @classmethod
  def of(cls, name: str, array) -> "TensorEntry":
    return cls(name, tuple(array.shape), np.dtype(array.dtype), lambda: np.asarray(array))


def write_safetensors(path: str, entries: Sequence[TensorEntry],
                      metadata: dict | None = None) -> None:
  """Writes ``entries`` to ``path``, fetching one tensor at a time (atomic rename at the end)."""
  header, offset = {}, 0
  for entry in entries:
    if entry.dtype not in _DTYPE_NAMES:
      raise ValueError(f"tensor {entry.name!r}: dtype {entry.dtype} cannot be written to "
                       f"safetensors; supported: {sorted(str(d) for d in _DTYPE_NAMES)}")
    nbytes = int(np.prod(entry.shape, dtype=np.int64)) * entry.dtype.itemsize
    header[entry.name] = {"dtype": _DTYPE_NAMES[entry.dtype], "shape": list(entry.shape),
                          "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  if metadata:
    header["__metadata__"] = metadata
  header_bytes = json.dumps(header, separators=(",", ":")).encode()
  header_bytes += b" " * (-len(header_bytes) % 8)  # data section 8-byte aligned
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(header_bytes)))
    f.write(header_bytes)
    for entry in entries:
      array = np.ascontiguousarray(entry.fetch(), dtype=entry.dtype)
      if array.shape != entry.shape:
        raise ValueError(f"tensor {entry.name!r}: fetched shape {array.shape} differs from "
                         f"the declared {entry.shape}")
      f.write(array.view(np.uint8).data)  # bytes view: ml_dtypes refuse the buffer protocol
      del array
  os.replace(tmp, path)


# ----------------------------------------------------------------------------- load / save

def resolve_checkpoint_dir(name_or_path: str) -> str:
  """A local directory as given, else a hub id fetched with ``huggingface_hub``."""
  if os.path.isdir(name_or_path):
    return name_or_path
  if os.path.exists(name_or_path) or name_or_path.startswith((".", "/")):
    raise FileNotFoundError(f"{name_or_path!r} is not a directory holding a checkpoint")
  import huggingface_hub  # only for hub ids
  try:
    return huggingface_hub.snapshot_download(
        name_or_path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.py"])
  except Exception as e:  # hub unreachable, unknown repo, gated model, ...
    raise FileNotFoundError(
        f"{name_or_path!r} is neither a local directory nor a downloadable hub id: "
        f"{type(e).__name__}: {e}") from None


def safetensors_files(directory: str) -> list[str]:
  index_path = os.path.join(directory, SAFETENSORS_INDEX)
  single = os.path.join(directory, SAFETENSORS_FILE)
  if os.path.isfile(index_path):
    with open(index_path) as f:
      weight_map = json.load(f).get("weight_map")
    if not weight_map:
      raise ValueError(f"{index_path}: has no 'weight_map'")
    files = sorted(set(weight_map.values()))
    missing = [n for n in files if not os.path.isfile(os.path.join(directory, n))]
    if missing:
      raise FileNotFoundError(f"{index_path} names shards that do not exist: {missing}")
    return [os.path.join(directory, n) for n in files]
  if os.path.isfile(single):
    return [single]
  raise FileNotFoundError(f"{directory}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}")


def abstract_model(config: ModelConfig, dtype) -> Transformer:
  """The model's structure with ShapeDtypeStruct leaves: no parameter memory is allocated."""
  return nnx.eval_shape(lambda: Transformer(config, dtype=dtype, rngs=nnx.Rngs(0)))


def parameter_name(path: Sequence) -> str:
  """A parameter's NNX path as one string, e.g. "layers/0/mlp/up_proj/kernel": the names that
  ``fdllm_jax.sharding``'s partition rules match."""
  return "/".join(str(p) for p in path)


def keep_on_host(name: str, host: np.ndarray) -> np.ndarray:
  """A ``load_model`` placement that leaves every parameter a host numpy array."""
  del name
  return host


def _on_default_device(name: str, host: np.ndarray) -> jax.Array:
  del name
  return jax.device_put(host)


def load_model(name_or_path: str, *, dtype: str = "float32",
               place: Callable[[str, np.ndarray], Any] | None = None) -> Transformer:
  """Loads an HF-layout Qwen2/Llama/Fast_dLLM_Qwen checkpoint into a ``Transformer``.

  Args:
    name_or_path: a local directory with config.json and safetensors, or a hub id.
    dtype: "float32" or "bfloat16": the parameter (and compute) dtype.
    place: where each parameter goes, called as ``place(name, host)`` for each tensor as it is
      read (``name`` from ``parameter_name``; ``host`` a numpy array in the model's layout and
      dtype); its result becomes the parameter. Default: ``jax.device_put`` on the default
      device, which then holds the whole model. ``fdllm_jax.sharding.place_on_mesh(mesh)``
      puts each tensor straight into its sharding, so no device holds more than its shards;
      ``keep_on_host`` keeps numpy arrays (no device memory at all).
  """
  place = place or _on_default_device
  if dtype not in _ALLOWED_DTYPES:
    raise ValueError(f"dtype={dtype!r} is not supported; use one of {sorted(_ALLOWED_DTYPES)}")
  target_dtype = np.dtype(_ALLOWED_DTYPES[dtype])
  directory = resolve_checkpoint_dir(name_or_path)
  config_path = os.path.join(directory, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{directory}: no config.json")
  config = ModelConfig.from_json_file(config_path)
  graphdef, abstract_state = nnx.split(abstract_model(config, target_dtype))
  expected = {tuple(path): leaf for path, leaf in nnx.to_flat_state(abstract_state)}
  loaded: dict[tuple, jax.Array] = {}
  files = safetensors_files(directory)
  skip_head = _skips_tied_head(files, config)
  for file in files:
    for name, array in iter_safetensors(file):
      if skip_head and name == "lm_head.weight":
        continue
      try:
        path, transpose = hf_to_path(name)
      except KeyError:
        if name.endswith("rotary_emb.inv_freq"):
          continue  # a buffer some exporters save; recomputed from rope_theta
        raise ValueError(f"{file}: unexpected tensor {name!r} for a {config.model_type} model")
      if path not in expected:
        raise ValueError(f"{file}: tensor {name!r} does not belong to this model "
                         f"(layers={config.num_hidden_layers}, "
                         f"tie_word_embeddings={config.tie_word_embeddings})")
      want = expected[path].get_value()
      shape = tuple(reversed(array.shape)) if transpose else tuple(array.shape)
      if shape != tuple(want.shape):
        raise ValueError(f"{file}: tensor {name!r} has shape {tuple(array.shape)}; expected "
                         f"{tuple(reversed(want.shape)) if transpose else tuple(want.shape)}")
      # An owned copy: the memory-mapped view is released once the next tensor is read.
      host = np.array(array.T if transpose else array, dtype=target_dtype, order="C")
      placed = place(parameter_name(path), host)
      if tuple(np.shape(placed)) != tuple(want.shape):
        raise ValueError(f"place({parameter_name(path)!r}, ...) returned shape "
                         f"{tuple(np.shape(placed))}; the parameter's shape is {tuple(want.shape)}")
      loaded[path] = placed
      del host, array
  missing = [path_to_hf(p)[0] for p in expected if p not in loaded]
  if missing:
    raise ValueError(f"{directory}: checkpoint lacks tensors {missing[:5]}"
                     f"{' ...' if len(missing) > 5 else ''} ({len(missing)} missing)")
  state = nnx.from_flat_state([(path, expected[path].replace(loaded[path])) for path in expected])
  return nnx.merge(graphdef, state)


def model_tensors(model: Transformer) -> list[TensorEntry]:
  """One entry per parameter, in torch layout under its HF name."""
  entries = []
  for path, leaf in nnx.to_flat_state(nnx.split(model)[1]):
    name, transpose = path_to_hf(tuple(path))
    value = leaf.get_value()
    shape = tuple(reversed(value.shape)) if transpose else tuple(value.shape)
    fetch = lambda v=value, t=transpose: np.asarray(v.T if t else v)
    entries.append(TensorEntry(name, shape, np.dtype(value.dtype), fetch))
  return entries


def save_hf(model: Transformer, directory: str, *, max_shard_bytes: int | None = None) -> None:
  """Writes ``config.json`` and safetensors (sharded past ``max_shard_bytes``) to ``directory``."""
  os.makedirs(directory, exist_ok=True)
  config_dict = model.config.to_hf_dict()
  config_dict["torch_dtype"] = str(jnp.dtype(model.dtype))
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config_dict, f, indent=2)
  shards = _split_shards(model_tensors(model), max_shard_bytes)
  if len(shards) == 1:
    write_safetensors(os.path.join(directory, SAFETENSORS_FILE), shards[0], {"format": "pt"})
    return
  weight_map, total = {}, 0
  for i, shard in enumerate(shards):
    file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    write_safetensors(os.path.join(directory, file), shard, {"format": "pt"})
    for entry in shard:
      weight_map[entry.name] = file
      total += _nbytes(entry)
  with open(os.path.join(directory, SAFETENSORS_INDEX), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _nbytes(entry: TensorEntry) -> int:
  return int(np.prod(entry.shape, dtype=np.int64)) * entry.dtype.itemsize


def _split_shards(entries: list[TensorEntry], max_shard_bytes: int | None):
  if max_shard_bytes is None:
    return [entries]
  shards, current, current_bytes = [], [], 0
  for entry in entries:
    if current and current_bytes + _nbytes(entry) > max_shard_bytes:
      shards.append(current)
      current, current_bytes = [], 0
    current.append(entry)
    current_bytes += _nbytes(entry)
  shards.append(current)
  return shards
