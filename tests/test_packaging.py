"""The built wheel holds the package data that code locates next to its modules."""

import os
import subprocess
import sys
import zipfile

import pytest

from fdllm_jax.training import make_sample_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", [make_sample_data.CHAT_FILE,
                                  os.path.join(make_sample_data.TOKENIZER_DIR, "tokenizer.json")],
                         ids=["chat.jsonl", "tokenizer.json"])
def test_sample_data_is_in_the_wheel(path, tmp_path_factory):
  wheel = _built_wheel(tmp_path_factory)
  name = os.path.relpath(path, ROOT).replace(os.sep, "/")
  assert name.startswith("fdllm_jax/training/sample_data/")
  with zipfile.ZipFile(wheel) as archive:
    assert name in archive.namelist(), sorted(n for n in archive.namelist() if "sample" in n)


_WHEEL = {}


def _built_wheel(tmp_path_factory):
  if "path" not in _WHEEL:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(out), ROOT], check=True,
                   capture_output=True)
    (wheel,) = [f for f in os.listdir(out) if f.endswith(".whl")]
    _WHEEL["path"] = os.path.join(out, wheel)
  return _WHEEL["path"]
