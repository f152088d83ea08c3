"""Imports a script of ``benchmarks/`` (not a package) as a module, for its test module."""

import importlib.util
import os

BENCHMARKS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "benchmarks")


def load(name: str):
  """The module ``benchmarks/<name>.py``, executed once per call."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS_DIR, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
