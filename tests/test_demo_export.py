"""fdllm_jax.demo.export: copies both stages as HF checkpoints, under a size limit."""

import json
import os
import subprocess
import sys

import pytest

from fdllm_jax.demo import export

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(REPO, "models", "demo")


def _export(tmp_path, **kw):
  return export.export(os.path.join(BUNDLE, "ar_base"), os.path.join(BUNDLE, "fast_dllm"),
                       str(tmp_path / "out"), **kw)


def test_export_copies_both_stages_and_edits_the_adapted_config(tmp_path):
  paths = _export(tmp_path)
  assert float(paths["total_mib"]) <= 20
  with open(os.path.join(paths["fast_dllm"], "config.json")) as f:
    config = json.load(f)
  assert config["model_type"] == "Fast_dLLM_Qwen" and config["bd_size"]
  assert config["auto_map"] == export.REFERENCE_AUTO_MAP
  assert isinstance(config["mask_token_id"], int)
  for d in (paths["ar_base"], paths["fast_dllm"]):
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(d))


def test_size_limit_names_the_size_and_can_be_raised(tmp_path):
  with pytest.raises(ValueError, match=r"take \d+\.\d MiB; the bundle must stay under 1 MiB"):
    _export(tmp_path, max_bytes=2**20)
  out = tmp_path / "cli"
  cmd = [sys.executable, "-m", "fdllm_jax.demo.export", "--ar", os.path.join(BUNDLE, "ar_base"),
         "--adapted", os.path.join(BUNDLE, "fast_dllm"), "--out", str(out)]
  failed = subprocess.run(cmd + ["--max_mib", "1"], cwd=REPO, capture_output=True, text=True)
  assert failed.returncode != 0 and "must stay under 1 MiB" in failed.stderr
  done = subprocess.run(cmd + ["--max_mib", "4096"], cwd=REPO, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-2000:]
  assert json.loads(done.stdout)["fast_dllm"] == str(out / "fast_dllm")


def test_scale_builds_lift_the_bundle_limit():
  """The GPU scale test's larger models (74 MiB at 384 wide) are not bundled: its build
  passes a larger limit through build_demo.sh to the export."""
  with open(os.path.join(REPO, "scripts", "demo_scale_gpu.sh")) as f:
    assert "EXPORT_MAX_MIB=" in f.read()
  with open(os.path.join(REPO, "scripts", "build_demo.sh")) as f:
    assert '--max_mib "$EXPORT_MAX_MIB"' in f.read()


def test_an_export_never_deletes_its_own_input(tmp_path):
  """--out holding a stage (the default models/demo with --ar models/demo/ar_base) is refused
  before anything is written; so is a stage of the wrong kind."""
  import shutil
  out = tmp_path / "bundle"
  shutil.copytree(os.path.join(BUNDLE, "ar_base"), out / "ar_base")
  before = sorted(os.listdir(out / "ar_base"))
  with pytest.raises(ValueError, match="would be overwritten by the export"):
    export.export(str(out / "ar_base"), os.path.join(BUNDLE, "fast_dllm"), str(out))
  assert sorted(os.listdir(out / "ar_base")) == before
  with pytest.raises(ValueError, match="expected a Fast_dLLM_Qwen model with bd_size; got "
                     "model_type='qwen2'"):
    export.export(os.path.join(BUNDLE, "ar_base"), os.path.join(BUNDLE, "ar_base"),
                  str(tmp_path / "other"))
  assert not (tmp_path / "other").exists()
  code = export.main(["--ar", str(out / "ar_base"), "--adapted",
                      os.path.join(BUNDLE, "fast_dllm"), "--out", str(out)])
  assert code == 2 and sorted(os.listdir(out / "ar_base")) == before
  with pytest.raises(SystemExit):
    export.main(["--ar", "a", "--adapted", "b", "--max_mib", "nan"])
