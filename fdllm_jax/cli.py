"""What the command-line tools (``train.py``, ``decode.py``) share: gin parsing, error reports."""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

# Mistakes of the person at the keyboard (a bad flag, path or value): one line, no traceback.
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, OSError)


def run_reporting_errors(run: Callable[[object], int], args) -> int:
  """``run(args)``; a user error prints ``error: ...`` on stderr and returns exit status 2.

  ``args.traceback`` (the tools' ``--traceback`` flag) re-raises it instead.
  """
  try:
    return run(args)
  except USER_ERRORS as e:
    if args.traceback:
      raise
    print(f"error: {e}", file=sys.stderr)
    return 2


def parse_gin(files: Sequence[str], bindings: Sequence[str]) -> None:
  """Parses gin files, then bindings; a missing file or any gin error becomes a ValueError-
  family error that names it (gin raises many types; all are configuration mistakes)."""
  import gin

  for path in files:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"gin file {path!r} does not exist")
  try:
    gin.parse_config_files_and_bindings(files, bindings)
  except Exception as e:
    raise ValueError(f"bad gin configuration: {type(e).__name__}: {e}") from None
