"""Shared fixtures: tiny random Hugging Face checkpoints built locally (no hub access)."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _use_a_fresh_compilation_cache() -> None:
  """One persistent XLA compilation cache per test run, in a new temporary directory.

  Tests build the same tiny models and kernels again in new closures, which jit's in-memory
  cache cannot see through; keyed by the lowered program, XLA compiles each once
  (tests/test_generate.py: 132 s against 167 s on 2 cores). A fresh directory keeps runs
  independent of each other; subprocesses (the CLI and multi-process tests) inherit it. A
  directory already set is used as it is.
  """
  if "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return
  directory = tempfile.mkdtemp(prefix="fdllm_jax_tests_xla_cache_")
  atexit.register(shutil.rmtree, directory, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"


_use_a_fresh_compilation_cache()

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
