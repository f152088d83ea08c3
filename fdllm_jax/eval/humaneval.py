"""HumanEval: EvalPlus-style chat prompt, code extraction, and sandboxed unit tests.

Prompt (the instruct-model prompting of EvalPlus, which the reference uses for code tasks): the
user turn asks for a self-contained script and quotes the HumanEval prompt in a code fence; the
assistant turn is pre-filled with a one-line preamble and an opening ```` ```python ```` fence,
so the model writes code straight away:

  user:      Please provide a self-contained Python script that solves the following problem
             in a markdown code block:
             ```
             <HumanEval prompt, stripped>
             ```
  assistant: Below is a Python script with a self-contained function that solves the problem
             and passes corresponding tests:
             ```python
             <generation starts here>

``extract_code`` keeps the text up to the closing fence. ``build_program`` accepts either a
whole function (the usual answer to that prompt) or just a body (the original HumanEval
completion format) and appends the task's tests. ``check`` runs the program in
``fdllm_jax.eval.sandbox`` and returns whether every test passed.
"""

from __future__ import annotations

import ast
import re

from fdllm_jax.eval import sandbox

INSTRUCTION_PREFIX = ("Please provide a self-contained Python script that solves the following "
                      "problem in a markdown code block:")
RESPONSE_PREFIX = ("Below is a Python script with a self-contained function that solves the "
                   "problem and passes corresponding tests:")
ASSISTANT_PREFIX = f"{RESPONSE_PREFIX}\n```python\n"

_KEEP_TOP_LEVEL = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef,
                   ast.ClassDef, ast.Assign, ast.AnnAssign)
_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|$)", re.S)


def build_messages(problem: dict, system_prompt: str | None = None) -> list[dict]:
  """Chat messages of one HumanEval problem (the assistant pre-fill is ``ASSISTANT_PREFIX``)."""
  messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
  messages.append({"role": "user",
                   "content": f"{INSTRUCTION_PREFIX}\n```\n{problem['prompt'].strip()}\n```\n"})
  return messages


def extract_code(output: str) -> str:
  """The code of a generation that started inside a ```` ```python ```` fence.

  Keeps the text before the first closing fence; when that is empty (the model closed the
  fence at once and opened another), takes the first fenced block after it.
  """
  head, fence, tail = output.partition("```")
  if head.strip() or not fence:
    return head
  match = _FENCE.search(tail.lstrip("`"))
  return match.group(1) if match else ""


def _defines(code: str, name: str) -> bool:
  try:
    tree = ast.parse(code)
  except SyntaxError:
    return re.search(rf"^(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.M) is not None
  return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name
             for node in tree.body)


def strip_script(code: str) -> str:
  """Top-level imports, definitions and assignments of ``code``; demo calls, prints, asserts and
  ``if __name__ == "__main__"`` blocks are dropped. Code that does not parse is returned as is."""
  try:
    tree = ast.parse(code)
  except SyntaxError:
    return code
  lines = code.splitlines()
  kept = []
  for node in tree.body:
    if isinstance(node, _KEEP_TOP_LEVEL):
      first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
      kept.append("\n".join(lines[first - 1:node.end_lineno]))
  return "\n\n".join(kept) + "\n"


def _prompt_with_stub(prompt: str) -> str:
  """The HumanEval prompt made runnable (its target function gets a ``pass`` body), so that its
  imports and helper functions exist; the model's own definitions, placed after it, win."""
  last = next((line for line in reversed(prompt.splitlines()) if line.strip()), "")
  indent = last[:len(last) - len(last.lstrip())] or "    "
  stubbed = prompt.rstrip("\n") + f"\n{indent}pass\n"
  try:
    ast.parse(stubbed)
  except SyntaxError:
    return ""
  return stubbed


def _body_only(completion: str) -> str:
  """A function-body completion up to its first non-indented line (HumanEval's stop rule)."""
  kept = []
  for line in completion.splitlines():
    if line.strip() and not line[0].isspace():
      break
    kept.append(line)
  return "\n".join(kept) + "\n"


def build_program(problem: dict, completion: str) -> str:
  """The program that ``check`` runs: the solution, the task's tests, ``check(entry_point)``.

  ``completion`` is either code that defines ``entry_point`` (demo code around it is dropped)
  or a function body to append to the HumanEval prompt.
  """
  entry = problem["entry_point"]
  if _defines(completion, entry):
    solution = _prompt_with_stub(problem["prompt"]) + "\n\n" + strip_script(completion)
  else:
    solution = problem["prompt"] + _body_only(completion)
  return f"{solution}\n\n{problem['test']}\n\ncheck({entry})\n"


def run_check(problem: dict, completion: str, timeout_s: float = 10.0,
              memory_mb: int = 2048) -> sandbox.SandboxResult:
  """Runs the problem's unit tests on ``completion`` in the sandbox; the full result."""
  return sandbox.run_python(build_program(problem, completion), timeout_s=timeout_s,
                            memory_mb=memory_mb)


def check(problem: dict, completion: str, timeout_s: float = 10.0, memory_mb: int = 2048) -> bool:
  """Whether ``completion`` passes the problem's unit tests.

  The tests run in a separate, confined process (``fdllm_jax.eval.sandbox``): time limit
  ``timeout_s``, address-space limit ``memory_mb``, no network, a throwaway working directory
  and writes elsewhere refused. Anything the program does (loops, crashes, exit) gives False.
  """
  return run_check(problem, completion, timeout_s, memory_mb).passed


def score(row: dict, output: str, timeout_s: float = 10.0, memory_mb: int = 2048) -> dict:
  """Scores one model output (text after the assistant pre-fill) against a HumanEval row."""
  code = extract_code(output)
  result = run_check(row, code, timeout_s, memory_mb)
  return {"extracted": code, "correct": result.passed, "status": result.status,
          "detail": result.detail, "check_seconds": round(result.seconds, 3)}
