"""Fused attention kernels for Fast-dLLM v2, each module beside its pure-jnp reference.

* ``block_kernel``: ``block_attention`` (flash attention for the causal, block-causal and
  training masks, x_t ++ x_0 or x_t^A ++ x_t^B ++ x_0; forward, dQ and dK/dV kernels; hidden
  tiles skipped) and ``block_attention_reference``.
* ``window_kernel``: ``window_attention`` (a decode window over a ragged KV cache,
  flash-decoding split over the keys) and ``window_attention_reference``.
* ``triton_window``: ``triton_window_attention``, the same decode step as a Triton kernel
  called through jax-triton (imported lazily; GPU only).
* ``mosaic_window``: ``mosaic_window_attention``, the same decode step with its split kernel on
  Hopper's wgmma through Pallas' Mosaic GPU backend (bf16 / f16, D a multiple of 64).
* ``mosaic_block``: ``mosaic_block_attention``, ``block_attention``'s forward, dQ and dK/dV
  kernels on Hopper's wgmma through Pallas' Mosaic GPU backend.
* ``ptxas_report``: Mosaic GPU kernels compiled for sm_90a on a machine without a GPU
  (registers, spills, ptxas' warnings); a tool, not imported here.

The Pallas kernels of ``block_kernel`` and ``window_kernel`` lower to Triton on GPU and run in
Pallas' interpreter with ``interpret=True`` (CPU tests); ``mosaic_window`` lowers to Mosaic
GPU and runs in Mosaic GPU's interpreter (JAX >= 0.11), as does ``mosaic_block``.
"""

from pallas_kernels.block_kernel import (KINDS, Tiling, block_attention,
                                         block_attention_reference, default_tiling,
                                         key_tile_segments, mask_allowed,
                                         query_tile_segments, visited_key_tiles,
                                         visited_tiles)
from pallas_kernels.mosaic_block import mosaic_block_attention
from pallas_kernels.mosaic_window import mosaic_plan, mosaic_window_attention
from pallas_kernels.triton_window import triton_window_attention
from pallas_kernels.window_kernel import (DecodePlan, decode_plan, split_tiles,
                                          window_attention, window_attention_reference)

__all__ = [
    "KINDS", "Tiling", "block_attention", "block_attention_reference", "default_tiling",
    "key_tile_segments", "mask_allowed", "query_tile_segments", "visited_key_tiles",
    "visited_tiles",
    "DecodePlan", "decode_plan", "split_tiles", "window_attention", "window_attention_reference",
    "triton_window_attention", "mosaic_plan", "mosaic_window_attention", "mosaic_block_attention",
]
