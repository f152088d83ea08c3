"""Meshes, partition rules, and sharded training equal to single-device training."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from fdllm_jax import sharding
from fdllm_jax.config import ModelConfig
from fdllm_jax.model import Transformer
from fdllm_jax.training import make_sample_data
from fdllm_jax.training import trainer as trainer_lib


def _names(config):
  params = trainer_lib.params_of(nnx.eval_shape(lambda: Transformer(config)))
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"/".join(sharding._key_str(k) for k in path): leaf.shape for path, leaf in flat}


@pytest.mark.parametrize("tied,model_type", [(False, "qwen2"), (True, "qwen2"),
                                             (False, "llama")])
def test_every_parameter_has_a_rule(tied, model_type):
  config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                       tie_word_embeddings=tied, model_type=model_type,
                       attention_bias=model_type != "llama")
  names = _names(config)
  for name, shape in names.items():
    spec = sharding.spec_for(name, shape)
    assert len(spec) <= len(shape)
  assert sharding.spec_for("layers/0/self_attn/q_proj/kernel", (32, 32)) == P("fsdp", "tensor")
  assert sharding.spec_for("layers/1/mlp/down_proj/kernel", (48, 32)) == P("tensor", "fsdp")
  assert sharding.spec_for("norm/weight", (32,)) == P()


def test_unknown_parameter_is_an_error():
  with pytest.raises(KeyError, match="no partition rule"):
    sharding.spec_for("layers/0/self_attn/rotary/inv_freq", (8,))


def test_indivisible_dimensions_are_replicated():
  mesh = sharding.make_mesh((2, 2, 2))
  assert sharding.spec_for("embed_tokens/embedding", (517, 96), mesh) == P(None, "fsdp")
  assert sharding.spec_for("embed_tokens/embedding", (512, 96), mesh) == P("tensor", "fsdp")


def test_make_mesh_shapes_and_errors():
  assert jax.device_count() == 8
  assert dict(sharding.make_mesh((2, 2, 2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(sharding.make_mesh((-1, 1, 2)).shape) == {"data": 4, "fsdp": 1, "tensor": 2}
  assert dict(sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]).shape)["data"] == 1
  with pytest.raises(ValueError, match="needs 12 devices, but 8 are available"):
    sharding.make_mesh((3, 2, 2))
  with pytest.raises(ValueError, match="not a multiple"):
    sharding.make_mesh((-1, 3, 1))
  with pytest.raises(ValueError, match="3 entries"):
    sharding.make_mesh((8, 1))


def test_process_rows_and_global_array():
  mesh = sharding.make_mesh((2, 2, 2))
  batch = sharding.batch_sharding(mesh)
  rows = sharding.process_rows(batch, (8, 4))
  assert rows == list(range(8))  # one process holds everything
  host = np.arange(32, dtype=np.int32).reshape(8, 4)
  array = sharding.global_array(host, rows, batch, (8, 4))
  np.testing.assert_array_equal(np.asarray(array), host)
  assert array.sharding.spec == P(("data", "fsdp"), None)
  shard = [s for s in array.addressable_shards if s.index[0].start == 2][0]
  np.testing.assert_array_equal(np.asarray(shard.data), host[2:4])


def _tiny_config(**overrides):
  fields = dict(
      data_files=make_sample_data.CHAT_FILE, tokenizer=make_sample_data.TOKENIZER_DIR,
      seq_len=32, block_size=8, init="scratch",
      model=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0),
      num_steps=5, global_batch_size=8, learning_rate=3e-3, warmup_steps=1,
      checkpoint_every=100, export=False, progress_bar=False, async_checkpointing=False)
  fields.update(overrides)
  return trainer_lib.TrainConfig(**fields)


def _losses(config, workdir, mesh):
  trainer = trainer_lib.Trainer(config, str(workdir), mesh=mesh)
  try:
    history = trainer.run()
    return np.array([h["loss"] for h in history]), trainer
  finally:
    trainer.close()


def test_mesh_2x2x2_matches_one_device(tmp_path):
  """(data 2, fsdp 2, tensor 2) on 8 simulated devices == 1 device, float32, 5 steps.

  The sharded run also chunks the LM head + CE (7 positions, not a divisor of 31) and shares
  the clean stream between the views, the reference does neither: under a mesh they change
  nothing either."""
  one = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  eight = sharding.make_mesh((2, 2, 2))
  ref, _ = _losses(_tiny_config(loss_chunk_size=None), tmp_path / "one", one)
  got, trainer = _losses(_tiny_config(loss_chunk_size=7, share_clean_stream=True),
                         tmp_path / "eight", eight)
  assert len(ref) == 5 and ref[-1] < ref[0]
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  q = trainer.final_state["params"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == P("fsdp", "tensor")
  assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (32, 32)
  mu = jax.tree.leaves(trainer.final_state["opt_state"])
  assert any(getattr(x, "sharding", None) is not None and x.ndim == 2 and
             x.sharding.spec == P("fsdp", "tensor") for x in mu)


@pytest.mark.slow
def test_grad_accumulation_on_mesh_matches_one_device(tmp_path):
  one = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  eight = sharding.make_mesh((2, 2, 2))
  ref, _ = _losses(_tiny_config(num_steps=3), tmp_path / "one", one)
  got, _ = _losses(_tiny_config(num_steps=3, grad_accum_steps=2), tmp_path / "acc", eight)
  np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_decoding_a_model_sharded_over_a_mesh_equals_one_device(tiny_qwen_dir):
  """generate (both cache modes, streamed too) and generate_ar on parameters that
  place_on_mesh split over (data 2, fsdp 2, tensor 2) give the single-device tokens and
  forwards."""
  import fdllm_jax
  from fdllm_jax import checkpoints
  mesh = sharding.make_mesh((2, 2, 2))
  sharded = checkpoints.load_model(tiny_qwen_dir, place=sharding.place_on_mesh(mesh))
  plain = checkpoints.load_model(tiny_qwen_dir)
  q_proj = sharded.layers[0].self_attn.q_proj.kernel[...]
  assert not q_proj.sharding.is_fully_replicated  # the decode really runs on shards
  for model in (sharded, plain):  # confident predictions: no near-ties that the shards' sums
    model.lm_head.kernel[...] = model.lm_head.kernel[...] * 20.0  # would break differently
  prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
  runs = [lambda m, dual=dual, rows=rows: fdllm_jax.generate(
              m, prompts, fdllm_jax.DecodeConfig(threshold=0.9, max_new_tokens=40, mask_id=516,
                                                 stop_ids=(), use_dual_cache=dual),
              max_batch_size=rows)
          for dual, rows in ((False, None), (True, None), (False, 1))]
  runs.append(lambda m: fdllm_jax.generate_ar(m, prompts, max_new_tokens=20, stop_ids=()))
  for run in runs:
    got, want = run(sharded), run(plain)
    assert got.tokens == want.tokens and got.num_forwards == want.num_forwards


def test_decoding_with_kernels_on_a_mesh_runs_them_per_shard(tiny_qwen_dir,
                                                             shard_attention_meshes):
  """A model sharded over (2, 2, 2) decodes with attention_impl="pallas" to the single-device
  tokens, its kernels inside shard_map over the parameters' mesh (without it, XLA would
  gather the cache onto every device for each kernel call)."""
  import fdllm_jax
  from fdllm_jax import checkpoints
  meshes = shard_attention_meshes
  mesh = sharding.make_mesh((2, 2, 2))
  sharded = checkpoints.load_model(tiny_qwen_dir, place=sharding.place_on_mesh(mesh))
  plain = checkpoints.load_model(tiny_qwen_dir)
  for model in (sharded, plain):
    model.lm_head.kernel[...] = model.lm_head.kernel[...] * 20.0
  config = fdllm_jax.DecodeConfig(threshold=0.9, max_new_tokens=24, mask_id=516, stop_ids=())
  prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
  for rows in (None, 1):   # one batch; rows refilled from the host
    run = lambda m, rows=rows: fdllm_jax.generate(  # noqa: E731
        m, prompts, config, attention_impl="pallas", max_batch_size=rows)
    meshes.clear()
    got = run(sharded)
    assert meshes and all(m is not None and m.size == 8 for m in meshes)
    meshes.clear()
    want = run(plain)
    assert meshes and all(m is None for m in meshes)
    assert got.tokens == want.tokens and got.num_forwards == want.num_forwards


def test_num_processes_below_one_is_an_error():
  with pytest.raises(ValueError, match="num_processes must be >= 1; got 0"):
    sharding.initialize_distributed("127.0.0.1:1234", 0, 0)
