"""compute_logits input checks (numerics are covered by test_model's parity tests)."""

import numpy as np
import pytest

import fdllm_jax


def test_one_dimensional_input_gets_a_batch_axis(tiny_qwen_dir):
  model = fdllm_jax.load_model(tiny_qwen_dir)
  logits = fdllm_jax.compute_logits(model, [1, 2, 3])
  assert logits.shape == (1, 3, 517) and logits.dtype == np.float32


@pytest.mark.parametrize("ids,message", [
    ([[1, 517, 3]], "token id 517 at index \\(0, 1\\) is outside the vocabulary \\[0, 517\\)"),
    ([[-1]], "token id -1"),
    ([[]], "non-empty integer array"),
    ([[0.5, 1.0]], "non-empty integer array"),
])
def test_bad_ids(tiny_qwen_dir, ids, message):
  model = fdllm_jax.load_model(tiny_qwen_dir)
  with pytest.raises(ValueError, match=message):
    fdllm_jax.compute_logits(model, np.array(ids))


def test_bad_attention_name(tiny_qwen_dir):
  model = fdllm_jax.load_model(tiny_qwen_dir)
  with pytest.raises(ValueError, match="attention='full'"):
    fdllm_jax.compute_logits(model, [[1, 2]], attention="full")
