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

_DEFINITIONS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_ASSIGNMENTS = (ast.Assign, ast.AnnAssign)


def build_messages(problem: dict, system_prompt: str | None = None) -> list[dict]:
  """Chat messages of one HumanEval problem (the assistant pre-fill is ``ASSISTANT_PREFIX``)."""
  messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
  messages.append({"role": "user",
                   "content": f"{INSTRUCTION_PREFIX}\n```\n{problem['prompt'].strip()}\n```\n"})
  return messages


def extract_code(output: str) -> str:
  """The code of a generation that started inside a ```` ```python ```` fence.

  The first non-blank fenced block: the lines up to the first line that starts with
  ```` ``` ```` (a fence inside a line, e.g. in a string, does not end it). Before any code, a
  fence with a language (```` ```python ````: the model opened the pre-filled fence again)
  continues the block and a bare one closes it (the next fence opens a new block). An unclosed
  block (a truncated generation) runs to the end.
  """
  blocks, current, inside = [], [], True
  for line in output.split("\n"):
    fence = line.strip()
    if fence.startswith("```"):
      if not inside:
        inside = True
      elif "\n".join(current).strip():
        blocks.append("\n".join(current))
        inside = False
      elif fence == "```":
        inside = False
      current = []
      continue
    if inside:
      current.append(line)
  if inside:
    blocks.append("\n".join(current))
  code = next((block for block in blocks if block.strip()), "")
  return code + "\n" if code and not code.endswith("\n") else code


def _defines(code: str, name: str) -> bool:
  try:
    tree = ast.parse(code)
  except SyntaxError:
    return re.search(rf"^(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.M) is not None
  return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name
             for node in tree.body)


def strip_script(code: str) -> str:
  """Top-level imports and definitions of ``code``, and the top-level assignments they use
  (directly or through other kept assignments); demo calls, prints, asserts, ``input()``,
  other assignments and ``if __name__ == "__main__"`` blocks are dropped (as EvalPlus'
  sanitizer does). Code that does not parse is returned as is."""
  try:
    tree = ast.parse(code)
  except SyntaxError:
    return code
  kept = {id(node) for node in tree.body if isinstance(node, _DEFINITIONS)}
  used = set().union(*(_names_read(node) for node in tree.body if id(node) in kept))
  changed = True
  while changed:  # an assignment a kept one reads is kept too
    changed = False
    for node in tree.body:
      if (isinstance(node, _ASSIGNMENTS) and id(node) not in kept
          and _names_bound(node) & used):
        kept.add(id(node))
        used |= _names_read(node)
        changed = True
  lines = code.splitlines()
  parts = []
  for node in tree.body:
    if id(node) in kept:
      first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
      parts.append("\n".join(lines[first - 1:node.end_lineno]))
  return "\n\n".join(parts) + "\n"


def _names_read(node: ast.AST) -> set[str]:
  """Global names ``node`` may read: names loaded, less a function's parameters and locals."""
  loaded = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
  if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
    return loaded
  local = {a.arg for a in ast.walk(node.args) if isinstance(a, ast.arg)}
  local |= {n.id for n in ast.walk(node)
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
  declared_global = {name for n in ast.walk(node) if isinstance(n, ast.Global) for name in n.names}
  return loaded - (local - declared_global)


def _names_bound(node: ast.AST) -> set[str]:
  targets = node.targets if isinstance(node, ast.Assign) else [node.target]
  return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}


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


def _body_only(prompt: str, completion: str) -> str:
  """A function-body completion up to its first non-indented line (HumanEval's stop rule) that
  is not inside a string: the first such cut after which the prompt and body parse (the first
  cut at all when none does)."""
  lines = completion.splitlines()
  cuts = [i for i, line in enumerate(lines) if line.strip() and not line[0].isspace()]
  for cut in cuts:
    body = "\n".join(lines[:cut]) + "\n"
    try:
      ast.parse(prompt + body)
      return body
    except SyntaxError:
      continue
  return "\n".join(lines[:cuts[0]] if cuts else lines) + "\n"


def build_program(problem: dict, completion: str) -> str:
  """The program that ``check`` runs: the solution, the task's tests, ``check(entry_point)``.

  ``completion`` is either code that defines ``entry_point`` (demo code around it is dropped)
  or a function body to append to the HumanEval prompt.
  """
  entry = problem["entry_point"]
  if _defines(completion, entry):
    solution = _prompt_with_stub(problem["prompt"]) + "\n\n" + strip_script(completion)
  else:
    solution = problem["prompt"] + _body_only(problem["prompt"], completion)
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
