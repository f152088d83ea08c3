"""notebooks/quickstart.ipynb runs end to end, headless (nbclient), against the bundled demo model.

The kernel is this interpreter: a kernel spec written to a temporary directory names
``sys.executable``, so a fresh CI virtual environment runs the notebook with its own packages
whatever kernels the machine has registered. ``FDLLM_DEMO_DIR`` (read by the notebook)
points it at another demo directory; without it the notebook uses ``models/demo``.
"""

import json
import os
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")
KERNEL_NAME = "fdllm-jax-test"
TIMEOUT_S = 600  # per cell; the whole notebook takes a few minutes at most on 2 CPU cores


def _demo_dir() -> str:
  from fdllm_jax import demo
  return os.environ.get("FDLLM_DEMO_DIR", demo.DEMO_DIR)


def _kernel_env() -> dict:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the test suite's 8 fake CPU devices are not the notebook's
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env.setdefault("TOKENIZERS_PARALLELISM", "false")
  return env


def test_notebook_is_stored_without_outputs():
  import nbformat
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for index, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, (
          f"cell {index} of {NOTEBOOK} is stored with outputs; clear them before committing")


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
  import nbclient
  import nbformat
  pytest.importorskip("ipykernel", reason="pip install -e '.[test]' installs ipykernel")

  demo_dir = _demo_dir()
  missing = [d for d in ("fast_dllm", "ar_base")
             if not os.path.isfile(os.path.join(demo_dir, d, "config.json"))]
  if missing:
    pytest.fail(f"the bundled demo model is missing: no {', '.join(missing)} under {demo_dir} "
                "(build it with `bash scripts/build_demo.sh` and commit models/demo, or point "
                "FDLLM_DEMO_DIR at a directory holding fast_dllm/ and ar_base/)")

  kernels = tmp_path / "jupyter" / "kernels" / KERNEL_NAME
  kernels.mkdir(parents=True)
  (kernels / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "fdllm-jax test kernel", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))

  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, kernel_name=KERNEL_NAME, timeout=TIMEOUT_S,
                                   resources={"metadata": {"path": REPO}})
  start = time.perf_counter()
  try:
    client.execute(env=_kernel_env())
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f"a cell of {NOTEBOOK} raised (executed copy: {tmp_path}/quickstart.executed."
                f"ipynb):\n{e}")
  finally:
    nbformat.write(nb, str(tmp_path / "quickstart.executed.ipynb"))  # to look at on failure
  seconds = time.perf_counter() - start
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
  assert "compile_seconds = 0.0" in text and "speed ratio" in text
  assert "Skipped: set RUN_RELEASED_MODEL = True" in text
  assert html.count('class="fdllm-trace"') == 2  # the two step traces
  assert "data-conf=" in html and "confidence" in html  # hover: step and confidence
  assert any("image/png" in o.get("data", {}) for o in outputs), "the sweep plot is not shown"
  print(f"notebook executed in {seconds:.1f} s")
