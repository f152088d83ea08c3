"""HF checkpoint loading and saving: formats, round trips, and errors that name the culprit."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

import fdllm_jax
from fdllm_jax import checkpoints
from tests import hf_models


def _flat(model):
  return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.split(model)[1])}


def _copy(src, tmp_path, name):
  dst = str(tmp_path / name)
  shutil.copytree(src, dst)
  return dst


def _edit_config(directory, **changes):
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    config = json.load(f)
  config.update(changes)
  with open(path, "w") as f:
    json.dump(config, f)


def test_fast_dllm_config_loads(tiny_qwen_dir, tmp_path):
  directory = _copy(tiny_qwen_dir, tmp_path, "fast")
  _edit_config(directory, model_type="Fast_dLLM_Qwen", bd_size=32,
               architectures=["Fast_dLLM_QwenForCausalLM"],
               auto_map={"AutoConfig": "configuration.Fast_dLLM_QwenConfig",
                         "AutoModelForCausalLM": "modeling.Fast_dLLM_QwenForCausalLM"})
  model = fdllm_jax.load_model(directory)
  assert model.config.model_type == "Fast_dLLM_Qwen" and model.config.bd_size == 32
  plain = fdllm_jax.load_model(tiny_qwen_dir)
  ids = np.arange(20)[None] % 517
  np.testing.assert_array_equal(fdllm_jax.compute_logits(model, ids),
                                fdllm_jax.compute_logits(plain, ids))


@pytest.mark.parametrize("max_shard_bytes", [None, 200_000])
def test_save_then_load_is_bit_exact(tiny_qwen_dir, tmp_path, max_shard_bytes):
  model = fdllm_jax.load_model(tiny_qwen_dir)
  out = str(tmp_path / "saved")
  fdllm_jax.save_hf(model, out, max_shard_bytes=max_shard_bytes)
  sharded = os.path.exists(os.path.join(out, checkpoints.SAFETENSORS_INDEX))
  assert sharded == (max_shard_bytes is not None)
  again = fdllm_jax.load_model(out)
  before, after = _flat(model), _flat(again)
  assert before.keys() == after.keys()
  for path in before:
    np.testing.assert_array_equal(before[path], after[path], err_msg=str(path))


def test_saved_checkpoint_loads_in_transformers(tiny_qwen_dir, tmp_path):
  import transformers
  model = fdllm_jax.load_model(tiny_qwen_dir)
  out = str(tmp_path / "for_torch")
  fdllm_jax.save_hf(model, out)
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  ids = np.random.RandomState(0).randint(0, 517, (1, 30))
  np.testing.assert_allclose(hf_models.torch_logits(torch_model, ids),
                             fdllm_jax.compute_logits(model, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("head", ["equal", "different"])
def test_tied_checkpoint_that_also_stores_the_head(tmp_path, head):
  """transformers ties an lm_head.weight equal to the embedding and unties a different one."""
  import safetensors.numpy
  config = hf_models.tiny_config(tie_word_embeddings=True)
  directory = str(tmp_path / "tied")
  hf_models.random_torch_model(config).save_pretrained(directory)
  path = os.path.join(directory, "model.safetensors")
  tensors = safetensors.numpy.load_file(path)
  embed = tensors["model.embed_tokens.weight"]
  tensors["lm_head.weight"] = embed.copy() if head == "equal" else embed[::-1].copy()
  safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
  if head == "different":
    with pytest.raises(ValueError, match="differs from model.embed_tokens.weight.*"
                       "tie_word_embeddings to false"):
      fdllm_jax.load_model(directory)
    return
  import transformers
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
  ids = np.random.RandomState(0).randint(0, 517, (1, 12))
  np.testing.assert_allclose(hf_models.torch_logits(torch_model, ids),
                             fdllm_jax.compute_logits(fdllm_jax.load_model(directory), ids),
                             rtol=1e-4, atol=1e-4)


def test_bfloat16_save_load_round_trip(tiny_qwen_dir, tmp_path):
  model = fdllm_jax.load_model(tiny_qwen_dir, dtype="bfloat16")
  out = str(tmp_path / "bf16")
  fdllm_jax.save_hf(model, out)
  header, _ = checkpoints.read_safetensors_header(os.path.join(out, "model.safetensors"))
  assert {v["dtype"] for v in header.values()} == {"BF16"}
  again = fdllm_jax.load_model(out, dtype="bfloat16")
  for path, value in _flat(model).items():
    np.testing.assert_array_equal(value, _flat(again)[path])


def test_hub_id_goes_through_snapshot_download(tiny_qwen_dir, monkeypatch):
  import huggingface_hub
  calls = []

  def fake_download(repo_id, **kwargs):
    calls.append(repo_id)
    return tiny_qwen_dir

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
  model = fdllm_jax.load_model("Efficient-Large-Model/Fast_dLLM_v2_1.5B")
  assert calls == ["Efficient-Large-Model/Fast_dLLM_v2_1.5B"]
  assert model.config.vocab_size == 517


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
  import huggingface_hub

  def offline(repo_id, **kwargs):
    raise OSError("no network")

  monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
  with pytest.raises(FileNotFoundError, match="neither a local directory nor a downloadable"):
    fdllm_jax.load_model("someone/missing-model")


def test_directory_without_config(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no config.json"):
    fdllm_jax.load_model(str(tmp_path / "empty"))


def test_unsupported_model_type(tiny_qwen_dir, tmp_path):
  directory = _copy(tiny_qwen_dir, tmp_path, "mistral")
  _edit_config(directory, model_type="mistral")
  with pytest.raises(ValueError, match="model_type 'mistral' is not supported"):
    fdllm_jax.load_model(directory)


def _rewrite_tensors(src_dir, dst_dir, edit):
  entries = []
  for name, array in checkpoints.iter_safetensors(os.path.join(src_dir, "model.safetensors")):
    array = edit(name, np.array(array))
    if array is not None:
      entries.append(checkpoints.TensorEntry.of(name, array))
  checkpoints.write_safetensors(os.path.join(dst_dir, "model.safetensors"), entries)


def test_wrong_shape_names_the_tensor(tiny_qwen_dir, tmp_path):
  directory = _copy(tiny_qwen_dir, tmp_path, "badshape")
  bad = "model.layers.1.mlp.up_proj.weight"
  _rewrite_tensors(tiny_qwen_dir, directory,
                   lambda n, a: a[:-1] if n == bad else a)
  with pytest.raises(ValueError, match=f"{bad}.*has shape \\(159, 96\\); expected \\(160, 96\\)"):
    fdllm_jax.load_model(directory)


def test_missing_tensor_is_named(tiny_qwen_dir, tmp_path):
  directory = _copy(tiny_qwen_dir, tmp_path, "missing")
  gone = "model.layers.0.self_attn.k_proj.bias"
  _rewrite_tensors(tiny_qwen_dir, directory, lambda n, a: None if n == gone else a)
  with pytest.raises(ValueError, match=f"lacks tensors.*{gone}"):
    fdllm_jax.load_model(directory)


def test_unknown_dtype_argument(tiny_qwen_dir):
  with pytest.raises(ValueError, match="dtype='float16' is not supported"):
    fdllm_jax.load_model(tiny_qwen_dir, dtype="float16")


def test_safetensors_files_readable_by_the_safetensors_library(tiny_qwen_dir, tmp_path):
  from safetensors.numpy import load_file
  model = fdllm_jax.load_model(tiny_qwen_dir)
  out = str(tmp_path / "lib")
  fdllm_jax.save_hf(model, out)
  ours = dict(checkpoints.iter_safetensors(os.path.join(out, "model.safetensors")))
  theirs = load_file(os.path.join(out, "model.safetensors"))
  assert ours.keys() == theirs.keys()
  for name in ours:
    np.testing.assert_array_equal(ours[name], theirs[name])


def test_hf_names_round_trip():
  config = fdllm_jax.ModelConfig(vocab_size=11, hidden_size=8, intermediate_size=12,
                                 num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=1, head_dim=4)
  model = checkpoints.abstract_model(config, np.float32)
  for path, _ in nnx.to_flat_state(nnx.split(model)[1]):
    name, transpose = checkpoints.path_to_hf(tuple(path))
    assert checkpoints.hf_to_path(name) == (tuple(path), transpose)


def test_parameters_can_stay_on_the_host(tiny_qwen_dir):
  """keep_on_host: numpy parameters, equal to a default load (which is on a device)."""
  on_device = checkpoints.load_model(tiny_qwen_dir)
  on_host = checkpoints.load_model(tiny_qwen_dir, place=checkpoints.keep_on_host)
  host_leaves = [v.get_value() for _, v in nnx.to_flat_state(nnx.split(on_host)[1])]
  assert host_leaves and all(type(x) is np.ndarray for x in host_leaves)
  assert all(isinstance(v.get_value(), jax.Array)
             for _, v in nnx.to_flat_state(nnx.split(on_device)[1]))
  want, got = _flat(on_device), _flat(on_host)
  assert want.keys() == got.keys()
  for path in want:
    np.testing.assert_array_equal(got[path], want[path])


def test_place_receives_each_parameter_by_its_sharding_name(tiny_qwen_dir):
  seen = {}

  def record(name, host):
    seen[name] = host.shape
    return host

  model = checkpoints.load_model(tiny_qwen_dir, place=record)
  flat = _flat(model)
  assert set(seen) == {checkpoints.parameter_name(p) for p in flat}
  assert "layers/0/mlp/up_proj/kernel" in seen
  assert all(seen[checkpoints.parameter_name(p)] == v.shape for p, v in flat.items())


def test_place_on_mesh_loads_each_tensor_into_its_sharding(tiny_qwen_dir):
  """8 devices as (data 2, fsdp 2, tensor 2): every parameter arrives with the sharding the
  partition rules give it, holds the checkpoint's values, and the model computes as before."""
  from fdllm_jax import sharding
  import jax.numpy as jnp
  assert jax.device_count() == 8, "the test suite runs with 8 simulated CPU devices"
  mesh = sharding.make_mesh((2, 2, 2))
  model = checkpoints.load_model(tiny_qwen_dir, place=sharding.place_on_mesh(mesh))
  reference = checkpoints.load_model(tiny_qwen_dir)
  want = _flat(reference)
  split_somewhere = False
  for path, var in nnx.to_flat_state(nnx.split(model)[1]):
    value = var.get_value()
    name = checkpoints.parameter_name(path)
    assert value.sharding == jax.sharding.NamedSharding(
        mesh, sharding.spec_for(name, value.shape, mesh)), name
    np.testing.assert_array_equal(np.asarray(value), want[tuple(path)])
    shard_shape = value.addressable_shards[0].data.shape
    split_somewhere |= shard_shape != value.shape
  assert split_somewhere   # the rules do shard this model on this mesh
  tokens = jnp.arange(12, dtype=jnp.int32)[None] % 50
  np.testing.assert_allclose(np.asarray(fdllm_jax.compute_logits(model, tokens)),
                             np.asarray(fdllm_jax.compute_logits(reference, tokens)),
                             rtol=1e-5, atol=1e-5)


def test_place_returning_another_shape_is_named(tiny_qwen_dir):
  with pytest.raises(ValueError, match=r"place\('[a-z_/0-9]+', \.\.\.\) returned shape \(1, "):
    checkpoints.load_model(tiny_qwen_dir, place=lambda name, host: host[:1])
