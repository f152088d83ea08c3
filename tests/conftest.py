"""Shared fixtures: tiny random Hugging Face checkpoints built locally (no hub access)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from tests import hf_models  # noqa: E402


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
  """A saved random Qwen2 checkpoint (GQA 2, untied, vocab 517, hidden 96)."""
  directory = str(tmp_path_factory.mktemp("tiny_qwen"))
  hf_models.save_random_model(directory, hf_models.tiny_config("qwen2"))
  return directory


@pytest.fixture
def shard_attention_meshes(monkeypatch):
  """The mesh of every ``fdllm_jax.sharding.shard_attention`` call (how the attention kernels
  were split), recorded while the test runs."""
  from fdllm_jax import sharding
  meshes = []
  shard_attention = sharding.shard_attention

  def recording(*args, mesh=None, **kwargs):
    meshes.append(mesh)
    return shard_attention(*args, mesh=mesh, **kwargs)

  monkeypatch.setattr(sharding, "shard_attention", recording)
  return meshes
