"""pallas_kernels.triton_window: launch logic on CPU; the kernel in Triton's interpreter when
triton is installed (not in the CPU CI image); the jax-triton call on a GPU only."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import triton_window as tw
from pallas_kernels import window_kernel as wk

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("batch,window,hq,hkv,smax", [(1, 32, 12, 2, 16384), (3, 5, 7, 1, 100),
                                                     (8, 64, 16, 2, 4096)])
def test_launch_grid_covers_every_program_once(batch, window, hq, hkv, smax):
  plan = wk.decode_plan(batch, window, hq, hkv, 128, smax)
  grid = tw.launch_grid(plan)
  assert len(grid) == 3 and all(g >= 1 for g in grid) and grid[1] < 65536 and grid[2] < 65536
  assert int(np.prod(grid)) == plan.num_programs
  coords = {tw.program_coords(pid, plan) for pid in range(grid[0])}
  assert coords == {(r, s) for r in range(plan.num_row_tiles) for s in range(plan.num_splits)}


def test_kernel_meta_matches_plan():
  plan = wk.decode_plan(2, 32, 12, 2, 100, 300)
  meta = tw.kernel_meta(plan, 0.125, jnp.bfloat16)
  assert meta["D"] == 128 and meta["ROWS_PAD"] == plan.rows_pad == 192
  assert meta["TILE_R"] * meta["NRT"] == meta["ROWS_PAD"]
  assert meta["CHUNK"] * meta["NSPLIT"] >= meta["SMAX"] == 300
  assert meta["PRECISION"] == "tf32"
  assert tw.kernel_meta(plan, 0.125, jnp.float32)["PRECISION"] == "ieee"
  assert tw.kernel_meta(plan, 0.125, jnp.float32, cache_len=512)["SMAX"] == 512


def _has(module):
  try:
    __import__(module)
    return True
  except Exception:  # noqa: BLE001  (any import failure means: not usable here)
    return False


_INTERPRETER_SCRIPT = textwrap.dedent("""
    import numpy as np, torch, jax, jax.numpy as jnp
    import triton.runtime.interpreter as interp
    # triton 3.6's interpreter converts 1-element arrays with int(), which numpy >= 2.4 rejects.
    _orig = interp._patch_lang_tensor
    def _patched(tensor, scope):
      _orig(tensor, scope)
      scope.set_attr(tensor, "__index__",
                     lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))
    interp._patch_lang_tensor = _patched
    from pallas_kernels import triton_window as tw, window_kernel as wk
    kernel = tw.build_kernel()
    cases = [(3, 5, 4, 2, 32, 100, [1, 100, 37], 16, 3), (2, 8, 7, 1, 16, 64, [64, 17], 16, 2),
             (2, 32, 6, 2, 64, 200, [200, 65], 64, 2)]
    for seed, (b, w, hq, hkv, d, smax, lengths, tile_k, splits) in enumerate(cases):
      rng = np.random.default_rng(seed)
      q = rng.standard_normal((b, w, hq, d)).astype(np.float32)
      k = rng.standard_normal((b, smax, hkv, d)).astype(np.float32)
      v = rng.standard_normal((b, smax, hkv, d)).astype(np.float32)
      beyond = (np.arange(smax)[None, :] >= np.asarray(lengths)[:, None])[:, :, None, None]
      plan = wk.decode_plan(b, w, hq, hkv, d, smax, tile_k=tile_k, num_splits=splits)
      o = torch.full((b, hkv, plan.num_splits, plan.rows_pad, plan.head_dim_pad), float("nan"))
      lse = torch.full((b, hkv, plan.num_splits, plan.rows_pad), float("nan"))
      qp = torch.from_numpy(np.array(wk.pack_queries(jnp.asarray(q), plan)))
      kernel[tw.launch_grid(plan)](
          torch.tensor(lengths, dtype=torch.int32), qp,
          torch.from_numpy(np.where(beyond, np.nan, k).astype(np.float32)),
          torch.from_numpy(np.where(beyond, np.nan, v).astype(np.float32)), o, lse,
          **tw.kernel_meta(plan, d ** -0.5, jnp.float32))
      assert torch.isfinite(o).all() and not torch.isnan(lse).any(), "unwritten partials"
      out = wk.combine_partials(jnp.asarray(o.numpy()), jnp.asarray(lse.numpy()), q.shape,
                                jnp.float32)
      ref = wk.window_attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                          jnp.asarray(lengths))
      rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
      assert rel <= 1e-5, (seed, rel)
      print("case", seed, "rel", rel)
    """)


@pytest.mark.skipif(not (_has("triton") and _has("torch")),
                    reason="Triton's interpreter needs triton (GPU image only) and torch")
def test_kernel_in_triton_interpreter():
  """float32 only: triton 3.6's interpreter computes bf16 dots wrongly (seen here)."""
  env = dict(os.environ, TRITON_INTERPRET="1", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert proc.stdout.count("case") == 3


def _gpu_with_jax_triton():
  if jax.default_backend() != "gpu":
    return False
  try:
    tw.import_jax_triton()
    return True
  except ImportError:
    return False


@pytest.mark.skipif(not _gpu_with_jax_triton(),
                    reason="jax-triton runs only on a GPU backend with jax_triton installed")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_triton_window_attention_on_gpu(dtype):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
  b, w, hq, hkv, d, smax = 3, 32, 12, 2, 128, 1000
  q = jax.random.normal(kq, (b, w, hq, d), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (b, smax, hkv, d), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (b, smax, hkv, d), jnp.float32).astype(dtype)
  lengths = jnp.asarray([1, 1000, 333], jnp.int32)
  out = jax.jit(tw.triton_window_attention)(q, k, v, lengths)
  ref = wk.window_attention_reference(q.astype(jnp.float32), k.astype(jnp.float32),
                                      v.astype(jnp.float32), lengths)
  rel = float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
  assert rel <= (1e-4 if dtype == jnp.float32 else 1e-2)   # Triton f32 dots: IEEE


def test_import_error_is_actionable(monkeypatch):
  if _has("jax_triton"):
    pytest.skip("jax_triton is installed here")
  with pytest.raises(ImportError, match="jax-triton"):
    tw.import_jax_triton()
