"""Mosaic GPU kernels compiled for a Hopper GPU on a machine without one: ptxas' report.

Lowering (``lower_for_hopper``) checks a kernel's layouts and shared memory on any machine;
whether ptxas accepts the result, how many registers it takes and whether it spills is only
known after compiling it, which JAX does when it builds a GPU executable. This module runs that
compiler directly: ``MosaicGpuCompile``, exported by JAX's CUDA plugin, turns a lowered Mosaic
GPU module into PTX and runs ptxas on it; it asks the CUDA driver only for the device's compute
capability first, so a stand-in driver (``scripts/fake_libcuda.c``) that reports 9.0 and
refuses to load the binary is enough. The compiler's own dumps (``MOSAIC_GPU_DUMP_PTX``,
``MOSAIC_GPU_DUMP_PTXAS``) give the PTX and ptxas' resource line.

The toolchain (the plugin at this jaxlib's version, ptxas, the stand-in driver) lives in a
directory of its own, off ``sys.path`` (JAX would otherwise load the plugin as a backend):

    bash scripts/get_sm90_toolchain.sh DIR
    python -m pallas_kernels.ptxas_report --toolchain DIR    # or FDLLM_SM90_TOOLCHAIN=DIR

Each module compiles in a subprocess (the plugin is 300 MB of native code, and a compiler
error may abort the process). What this cannot tell: speed, and anything the driver decides
at load time. Needs JAX >= 0.11 (checked with 0.11.2 and 0.12.0.1).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import functools
import os
import pathlib
import re
import subprocess
import sys
import tempfile
from typing import Any, Callable, Sequence

import jax

TOOLCHAIN_ENV = "FDLLM_SM90_TOOLCHAIN"
SETUP_COMMAND = "bash scripts/get_sm90_toolchain.sh DIR"
MOSAIC_CUSTOM_CALLS = ("mosaic_gpu_v2", "mosaic_gpu")
H100 = "NVIDIA H100 80GB HBM3"


@dataclasses.dataclass(frozen=True)
class Toolchain:
  """The files ``compile_for_sm90`` needs (``find_toolchain`` locates them)."""

  compiler: pathlib.Path   # JAX's CUDA plugin, which exports MosaicGpuCompile
  runtime: pathlib.Path    # libmosaic_gpu_runtime.so, linked into every kernel
  cuda_root: pathlib.Path  # holds bin/ptxas
  driver: pathlib.Path     # the stand-in libcuda.so.1


@dataclasses.dataclass(frozen=True)
class KernelReport:
  """ptxas' resource line for one compiled kernel, and what its PTX shows.

  ``registers`` is the per-thread allocation at launch; warpgroups that call
  ``set_max_registers`` run with the counts in ``register_limits`` (PTX ``setmaxnreg``).
  """

  kernel: str
  target: str
  registers: int
  barriers: int
  stack_frame_bytes: int
  spill_store_bytes: int
  spill_load_bytes: int
  wgmma_instructions: int
  tma_copies: int
  register_limits: tuple[int, ...]
  warnings: tuple[str, ...] = ()  # e.g. "Potential Performance Loss: wgmma ... serialized"

  @property
  def spills(self) -> bool:
    return bool(self.spill_store_bytes or self.spill_load_bytes)


def find_toolchain(root: str | os.PathLike | None = None) -> Toolchain:
  """The toolchain under ``root`` (default: ``$FDLLM_SM90_TOOLCHAIN``); FileNotFoundError
  naming what is missing and the command that installs it."""
  root = root if root is not None else os.environ.get(TOOLCHAIN_ENV)
  if not root:
    raise FileNotFoundError(f"no sm_90 toolchain: pass its directory or set {TOOLCHAIN_ENV}; "
                            f"install one with `{SETUP_COMMAND}`")
  root = pathlib.Path(root)
  found = {
      "compiler": _first(root.glob("jax_plugins/xla_cuda*/xla_cuda_plugin.so")),
      "runtime": _first(root.glob("jax_cuda*_plugin/libmosaic_gpu_runtime.so")),
      "cuda_root": root / "nvidia" / "cuda_nvcc",
      "driver": root / "fake_driver" / "libcuda.so.1",
  }
  missing = [name for name, path in found.items()
             if path is None or not (path / "bin" / "ptxas" if name == "cuda_root"
                                     else path).exists()]
  if missing:
    raise FileNotFoundError(f"sm_90 toolchain at {root} lacks {', '.join(missing)}; "
                            f"(re)install it with `{SETUP_COMMAND}`")
  return Toolchain(**found)


def _first(paths):
  return next(iter(sorted(paths)), None)


def lower_for_hopper(fn: Callable[..., Any], *args) -> jax.stages.Lowered:
  """``fn`` jitted and lowered for CUDA from any machine (an H100 where JAX >= 0.11 asks which
  GPU to lower for): runs the Pallas lowerings, Mosaic GPU's layout inference and its
  shared-memory check included."""
  def lower():
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  try:
    return lower()
  except RuntimeError as e:
    if "GPU" not in str(e):
      raise
  h100 = jax.sharding.AbstractDevice(device_kind=H100, num_cores=132, platform="gpu")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",),
                                                                abstract_device=h100)):
    return lower()


def mosaic_modules(lowered: jax.stages.Lowered) -> list[bytes]:
  """The serialized Mosaic GPU modules of ``lowered``'s custom calls, in program order."""
  modules = []

  def visit(op):
    for region in op.regions:
      for block in region.blocks:
        for inner in block.operations:
          visit(inner.operation)
    if op.name != "stablehlo.custom_call":
      return
    target = op.attributes["call_target_name"].value
    if target in MOSAIC_CUSTOM_CALLS:
      config = op.attributes["mhlo.backend_config"]  # api_version 4: a dictionary
      modules.append(bytes(config["module"].value_bytes))

  visit(lowered.compiler_ir("stablehlo").operation)
  return modules


_RESOURCES = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")


def parse_ptxas_info(text: str) -> dict[str, Any]:
  """ptxas ``-v`` output of one entry function as numbers, and its warnings (wgmma
  serialization is reported so); ValueError when a line is missing."""
  entry, resources, spills = (p.search(text) for p in (_ENTRY, _RESOURCES, _SPILLS))
  if not (entry and resources and spills):
    raise ValueError(f"not a ptxas -v report of an entry function:\n{text}")
  warnings = tuple(line.strip() for line in text.splitlines()
                   if "warning" in line.lower() or "performance loss" in line.lower())
  return dict(kernel=entry[1], target=entry[2], registers=int(resources[1]),
              barriers=int(resources[2] or 0), stack_frame_bytes=int(spills[1]),
              spill_store_bytes=int(spills[2]), spill_load_bytes=int(spills[3]),
              warnings=warnings)


def ptx_features(ptx: str) -> dict[str, Any]:
  """What the PTX shows of the Hopper paths: wgmma and TMA instructions, setmaxnreg limits."""
  limits = sorted({int(n) for n in re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32 (\d+)", ptx)})
  return dict(wgmma_instructions=len(re.findall(r"\bwgmma\.mma_async\b", ptx)),
              tma_copies=len(re.findall(r"\bcp\.async\.bulk\.tensor\b", ptx)),
              register_limits=tuple(limits))


def compile_for_sm90(module: bytes, toolchain: Toolchain, *,
                     timeout_s: float = 600.0) -> KernelReport:
  """Compiles one serialized Mosaic GPU module for sm_90a in a subprocess; RuntimeError with
  the compiler's output when no ptxas report comes out."""
  if jax.__version_info__ < (0, 11):
    # 0.10.2's compiler returns without compiling under the stand-in driver (not looked into).
    raise NotImplementedError(f"compiling without a GPU needs JAX >= 0.11 (checked with 0.11.2 "
                              f"and 0.12.0.1); this is {jax.__version__}")
  with tempfile.TemporaryDirectory(prefix="ptxas_report_") as work:
    work = pathlib.Path(work)
    (work / "module.mlirbc").write_bytes(module)
    dump = work / "dump"
    dump.mkdir()
    env = dict(os.environ, MOSAIC_GPU_RUNTIME_LIB_PATH=str(toolchain.runtime),
               MOSAIC_GPU_CUDA_ROOT=str(toolchain.cuda_root), MOSAIC_GPU_DUMP_TO=str(dump),
               MOSAIC_GPU_DUMP_PTX="1", MOSAIC_GPU_DUMP_PTXAS="1", FAKE_CUDA_CC="9.0")
    env["PATH"] = f"{toolchain.cuda_root / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(
        [sys.executable, "-m", "pallas_kernels.ptxas_report", "--compile-worker",
         str(work / "module.mlirbc"), str(toolchain.driver), str(toolchain.compiler)],
        env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    reports, ptxs = sorted(dump.glob("*.ptxas")), sorted(dump.glob("*.ptx"))
    if len(reports) != 1 or len(ptxs) != 1:
      output = (done.stdout + done.stderr)[-4000:]
      raise RuntimeError(f"Mosaic GPU's compiler gave no ptxas report (exit status "
                         f"{done.returncode}); its output ends with:\n{output}")
    return KernelReport(**parse_ptxas_info(reports[0].read_text()),
                        **ptx_features(ptxs[0].read_text()))


def _compile_worker(module_path: str, driver: str, compiler: str) -> None:
  """Subprocess side of ``compile_for_sm90``: the stand-in driver first, under its soname,
  so that the plugin's dlopen("libcuda.so.1") finds it; then the compiler. Loading the binary
  fails by design (no device), after the dumps are written."""
  ctypes.CDLL(driver, mode=ctypes.RTLD_GLOBAL)
  compile_fn = ctypes.CDLL(compiler).MosaicGpuCompile
  compile_fn.argtypes = [ctypes.c_char_p, ctypes.c_int]
  compile_fn.restype = ctypes.POINTER(ctypes.c_void_p)
  module = pathlib.Path(module_path).read_bytes()
  compile_fn(module, len(module))


def report(fn: Callable[..., Any], *args, toolchain: Toolchain | None = None) -> list[KernelReport]:
  """ptxas' report of every Mosaic GPU kernel ``fn(*args)`` runs, compiled for sm_90a."""
  toolchain = toolchain or find_toolchain()
  modules = mosaic_modules(lower_for_hopper(fn, *args))
  if not modules:
    raise ValueError("the function runs no Mosaic GPU kernel (nothing to compile)")
  return [compile_for_sm90(m, toolchain) for m in modules]


# (batch, window, query heads, KV heads): Qwen2.5-1.5B's decode windows of the sweep in
# benchmarks/gpu_decode_sweep.py (12 / 2 heads of 128), and Qwen2.5-7B's widest (28 / 4: 224
# packed rows, so 128-row tiles of two compute warpgroups).
DECODE_SHAPES = ((8, 32, 12, 2), (8, 8, 12, 2), (1, 32, 12, 2), (8, 1, 12, 2), (8, 32, 28, 4))


def decode_window_reports(toolchain: Toolchain, *, num_stages: Sequence[int] = (2, 3),
                          shapes=DECODE_SHAPES, max_len: int = 16384):
  """(shape, stages, row tile, report) of ``mosaic_window_attention`` at each decode shape."""
  import jax.numpy as jnp
  from pallas_kernels import mosaic_window as mw
  rows = []
  for shape in shapes:
    batch, window, heads, kv_heads = shape
    q = jax.ShapeDtypeStruct((batch, window, heads, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((batch, max_len, kv_heads, 128), jnp.bfloat16)
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
    tile_r = mw.mosaic_plan(batch, window, heads, kv_heads, 128, max_len).tile_r
    for stages in num_stages:
      kernel = lambda q, k, v, n, s=stages: mw.mosaic_window_attention(q, k, v, n, num_stages=s)
      (kernel_report,) = report(kernel, q, kv, kv, lengths, toolchain=toolchain)
      rows.append((shape, stages, tile_r, kernel_report))
  return rows


# (kind, T, with the backward): Qwen2.5-1.5B's training mask at 8k tokens (2L; forward, dQ
# and dK/dV) and a 2k-token block-causal prefill (the forward alone).
BLOCK_SHAPES = (("training", 8192, True), ("block_causal", 2048, False))
BLOCK_KERNELS = ("forward", "dQ", "dK/dV")   # their order in a forward + backward program


def block_reports(toolchain: Toolchain, *, num_stages: Sequence[int] = (2, 3),
                  shapes=BLOCK_SHAPES):
  """(shape, stages, kernel name, report) of ``mosaic_block_attention``'s kernels."""
  import jax.numpy as jnp
  from pallas_kernels import mosaic_block as mb
  rows = []
  for shape in shapes:
    kind, t, with_backward = shape
    q = jax.ShapeDtypeStruct((1, t, 12, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, t, 2, 128), jnp.bfloat16)
    for stages in num_stages:
      def program(q, k, v, s=stages):
        fn = functools.partial(mb.mosaic_block_attention, kind=kind, block_size=32,
                               num_stages=s)
        if not with_backward:
          return fn(q, k, v)
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(out)
      for name, kernel_report in zip(BLOCK_KERNELS, report(program, q, kv, kv,
                                                          toolchain=toolchain)):
        rows.append((shape, stages, name, kernel_report))
  return rows


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ["--compile-worker"]:
    _compile_worker(*argv[1:])
    return 0
  parser = argparse.ArgumentParser(
      prog="python -m pallas_kernels.ptxas_report",
      description="Compile the Mosaic GPU kernels for sm_90a without a GPU and print ptxas' "
                  "registers and spills: the decode kernel at Qwen2.5-1.5B's decode shapes, "
                  "the block-attention kernels at its training and prefill shapes; exit "
                  "status 1 when the decode kernel spills.")
  parser.add_argument("--toolchain", default=None,
                      help=f"directory from `{SETUP_COMMAND}` (default: ${TOOLCHAIN_ENV})")
  args = parser.parse_args(argv)
  if jax.__version_info__ < (0, 11):
    parser.error(f"compiling without a GPU needs JAX >= 0.11; this is {jax.__version__} (a "
                 f"Python 3.12+ environment takes it)")
  try:
    toolchain = find_toolchain(args.toolchain)
  except FileNotFoundError as e:
    parser.error(str(e))
  import jaxlib
  print(f"mosaic_window_attention over 16384 keys, bf16, head_dim 128; jaxlib "
        f"{jaxlib.__version__}, compiled for sm_90a on {os.uname().machine} without a GPU")
  print("batch window heads stages rows | target  registers  limits   spills(B)  wgmma  tma")
  spilled = False
  for (batch, window, heads, kv_heads), stages, tile_r, r in decode_window_reports(toolchain):
    spilled |= r.spills
    limits = "/".join(map(str, r.register_limits)) or "-"
    print(f"{batch:5d} {window:6d} {heads:2d}/{kv_heads:<2d} {stages:6d} {tile_r:4d} | "
          f"{r.target}  {r.registers:9d}  {limits:7s}  "
          f"{r.spill_store_bytes + r.spill_load_bytes:9d}  {r.wgmma_instructions:5d}  "
          f"{r.tma_copies:3d}")
  print("\nmosaic_block_attention, 12 / 2 heads of 128, bf16")
  print("kind          tokens kernel stages | target  registers  limits   spills(B)  wgmma")
  for (kind, t, _), stages, name, r in block_reports(toolchain):
    limits = "/".join(map(str, r.register_limits)) or "-"
    print(f"{kind:13s} {t:6d} {name:6s} {stages:6d} | {r.target}  {r.registers:9d}  "
          f"{limits:7s}  {r.spill_store_bytes + r.spill_load_bytes:9d}  "
          f"{r.wgmma_instructions:5d}")
  return 1 if spilled else 0   # (the decode kernel's: the block backward's spills are known)


if __name__ == "__main__":
  sys.exit(main())
