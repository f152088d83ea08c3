"""pallas_kernels.ptxas_report: Mosaic GPU kernels compiled for sm_90a without a GPU.

Parsing, the toolchain lookup and the extraction of kernels from a lowering run everywhere. The
compile tests need the toolchain (`bash scripts/get_sm90_toolchain.sh DIR`, about 240 MB, then
FDLLM_SM90_TOOLCHAIN=DIR) and JAX >= 0.11; without them (CI) they skip.
"""

import os

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import mosaic_window as mw
from pallas_kernels import ptxas_report as pr

# ptxas' -v output for the decode kernel at 8 x 32 over 16k keys (jaxlib 0.12.0.1).
PTXAS_OUTPUT = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'anonymous_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : Function properties for anonymous_mosaic_gpu_kernel
    0 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 128 registers, used 16 barriers, 1 bytes smem
ptxas info    : Compile time = 141.573 ms
"""


def _toolchain_or_skip():
  if jax.__version_info__ < (0, 11):
    pytest.skip(f"JAX {jax.__version__}: compiling without a GPU needs JAX >= 0.11")
  try:
    return pr.find_toolchain()
  except FileNotFoundError as e:
    pytest.skip(f"no sm_90 toolchain ({e})")


def _decode_window(batch=8, window=32, heads=12, kv_heads=2, max_len=4096, **kwargs):
  q = jax.ShapeDtypeStruct((batch, window, heads, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((batch, max_len, kv_heads, 128), jnp.bfloat16)
  lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
  return (lambda q, k, v, n: mw.mosaic_window_attention(q, k, v, n, **kwargs)), (q, kv, kv,
                                                                               lengths)


def test_parse_ptxas_info():
  assert pr.parse_ptxas_info(PTXAS_OUTPUT) == dict(
      kernel="anonymous_mosaic_gpu_kernel", target="sm_90a", registers=128, barriers=16,
      stack_frame_bytes=0, spill_store_bytes=8, spill_load_bytes=12, warnings=())
  serialized = ("ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async "
                "instructions are serialized due to insufficient register resources")
  info = pr.parse_ptxas_info(PTXAS_OUTPUT + serialized + "\n")
  assert info["warnings"] == (serialized,)
  assert pr.KernelReport(**info, wgmma_instructions=1, tma_copies=0, register_limits=()).spills
  with pytest.raises(ValueError, match="not a ptxas -v report"):
    pr.parse_ptxas_info(PTXAS_OUTPUT.replace("Used 128 registers", "Used many registers"))


def test_ptx_features():
  ptx = ("\tsetmaxnreg.dec.sync.aligned.u32 40;\n\tsetmaxnreg.inc.sync.aligned.u32 232;\n"
         "\twgmma.fence.sync.aligned;\n\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16\n"
         "\twgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16\n"
         "\tcp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [x];\n")
  assert pr.ptx_features(ptx) == dict(wgmma_instructions=2, tma_copies=1,
                                      register_limits=(40, 232))


def test_find_toolchain_names_what_is_missing(tmp_path, monkeypatch):
  monkeypatch.delenv(pr.TOOLCHAIN_ENV, raising=False)
  with pytest.raises(FileNotFoundError, match="FDLLM_SM90_TOOLCHAIN.*get_sm90_toolchain.sh"):
    pr.find_toolchain()
  (tmp_path / "fake_driver").mkdir()
  (tmp_path / "fake_driver" / "libcuda.so.1").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="lacks compiler, runtime, cuda_root;"):
    pr.find_toolchain(tmp_path)


def test_cli_without_toolchain_or_new_jax_is_a_usage_error(monkeypatch, capsys):
  monkeypatch.delenv(pr.TOOLCHAIN_ENV, raising=False)
  with pytest.raises(SystemExit) as exit_info:
    pr.main([])
  assert exit_info.value.code == 2
  expected = "get_sm90_toolchain.sh" if jax.__version_info__ >= (0, 11) else "needs JAX >= 0.11"
  assert expected in capsys.readouterr().err


def test_mosaic_modules_are_the_kernels_of_the_lowering():
  fn, args = _decode_window()
  (module,) = pr.mosaic_modules(pr.lower_for_hopper(fn, *args))
  assert module.startswith(b"ML\xefR")   # MLIR bytecode, as Mosaic GPU's compiler takes it
  assert pr.mosaic_modules(pr.lower_for_hopper(lambda x: x * 2, jnp.zeros(3))) == []


def test_report_refuses_a_function_without_kernels():
  toolchain = pr.Toolchain(*(4 * [None]))   # not reached
  with pytest.raises(ValueError, match="no Mosaic GPU kernel"):
    pr.report(lambda x: x + 1, jnp.zeros(3), toolchain=toolchain)


@pytest.mark.parametrize("window,heads,kv_heads,limits,p_from_registers,max_spill", [
    (32, 12, 2, (40, 152), None, 0),    # 192 rows: three compute warpgroups
    (32, 28, 4, (40, 232), None, 0),    # 224 rows in 128-row tiles: two
    (8, 12, 2, (40, 256), None, 0),     # 48 rows: one
    # P through shared memory adds a second accumulator: at 152 registers ptxas spills 36
    # bytes a thread (jaxlib 0.12.0.1, ptxas 12.9), still without serializing the wgmmas.
    (32, 12, 2, (40, 152), False, 64),
    (8, 12, 2, (40, 256), False, 0)])
def test_decode_kernel_compiles_for_sm90(window, heads, kv_heads, limits, p_from_registers,
                                         max_spill):
  toolchain = _toolchain_or_skip()
  fn, args = _decode_window(window=window, heads=heads, kv_heads=kv_heads,
                            p_from_registers=p_from_registers)
  (kernel,) = pr.report(fn, *args, toolchain=toolchain)
  assert kernel.target == "sm_90a"
  assert kernel.spill_store_bytes + kernel.spill_load_bytes <= max_spill
  assert not any("serialized" in w for w in kernel.warnings)   # ptxas says so when it does
  assert kernel.register_limits == limits   # mosaic_window's set_max_registers, as ptxas saw
  assert kernel.wgmma_instructions > 0 and kernel.tma_copies > 0


@pytest.mark.skipif(jax.__version_info__ >= (0, 11), reason="JAX >= 0.11 compiles")
def test_old_jax_is_refused_with_its_version():
  with pytest.raises(NotImplementedError, match="needs JAX >= 0.11"):
    pr.compile_for_sm90(b"", pr.Toolchain(*(4 * [None])))


@pytest.mark.parametrize("kind,t,max_spills", [
    # spilled bytes a thread (stores + loads) of forward, dQ, dK/dV, ptxas 12.9: training 0 /
    # 0 / 156-192, causal 0 / 0 / 76-272 (jaxlib 0.12.0.1 / 0.11.2): dK/dV's two [64, 128]
    # float32 accumulators exceed 232 registers a little. With the mask evaluated per tile
    # element (before session 20) dQ spilled 76-84 and dK/dV 768-784 bytes at training.
    ("training", 2048, (0, 0, 384)), ("causal", 1024, (0, 0, 384))])
def test_block_kernels_compile_for_sm90(kind, t, max_spills):
  """mosaic_block's three kernels at Qwen2.5-1.5B's heads, under jax.vjp."""
  from pallas_kernels import mosaic_block as mb
  toolchain = _toolchain_or_skip()
  q = jax.ShapeDtypeStruct((1, t, 12, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, t, 2, 128), jnp.bfloat16)

  def fwd_bwd(*args):
    out, vjp = jax.vjp(lambda *a: mb.mosaic_block_attention(*a, kind=kind, block_size=32),
                       *args)
    return out, vjp(out)

  kernels = pr.report(fwd_bwd, q, kv, kv, toolchain=toolchain)
  assert len(kernels) == 3
  for kernel, max_spill in zip(kernels, max_spills):
    assert kernel.target == "sm_90a" and kernel.register_limits == (40, 232)
    assert kernel.spill_store_bytes + kernel.spill_load_bytes <= max_spill
    assert not any("serialized" in w for w in kernel.warnings)
    assert kernel.wgmma_instructions > 0


def test_a_broken_module_is_reported_with_the_compiler_output():
  toolchain = _toolchain_or_skip()
  with pytest.raises(RuntimeError, match="no ptxas report"):
    pr.compile_for_sm90(b"ML\xefR not a module", toolchain, timeout_s=120)
