"""fdllm-jax: Fast-dLLM v2 block-diffusion language models in JAX / Flax NNX."""

from fdllm_jax.checkpoints import load_model, save_hf
from fdllm_jax.config import ModelConfig
from fdllm_jax.generate import DecodeConfig, GenerateOutput, generate, generate_ar
from fdllm_jax.model import Transformer
from fdllm_jax.scoring import compute_logits
from fdllm_jax.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "ModelConfig", "Transformer", "Tokenizer", "compute_logits", "load_model", "load_tokenizer",
    "save_hf", "generate", "generate_ar", "DecodeConfig", "GenerateOutput",
]
