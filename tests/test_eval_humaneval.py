"""HumanEval prompt, code extraction, program assembly and sandboxed checks
(fdllm_jax.eval.humaneval)."""

import pytest

from fdllm_jax.eval import data, humaneval


@pytest.fixture(scope="module")
def problems():
  return {row["task_id"]: row for row in data.load_humaneval()}


def test_prompt_is_evalplus_style(problems):
  problem = problems["HumanEval/0"]
  messages = humaneval.build_messages(problem)
  assert messages == [{"role": "user", "content": (
      "Please provide a self-contained Python script that solves the following problem in a "
      "markdown code block:\n```\n" + problem["prompt"].strip() + "\n```\n")}]
  assert humaneval.ASSISTANT_PREFIX.endswith("passes corresponding tests:\n```python\n")
  assert humaneval.build_messages(problem, "sys")[0] == {"role": "system", "content": "sys"}


@pytest.mark.parametrize("output,expected", [
    ("def f():\n    return 1\n```\nThis works because...", "def f():\n    return 1\n"),
    ("def f():\n    return 1\n", "def f():\n    return 1\n"),  # truncated: no closing fence
    ("```\n\nHere it is:\n```python\ndef g():\n    pass\n```\n", "def g():\n    pass\n"),
    # the pre-filled fence opened again; a fence inside a string does not end the code
    ("```python\ndef f():\n    return 1\n```\nDone.", "def f():\n    return 1\n"),
    ("```python\ndef f():\n    return 1\n```", "def f():\n    return 1\n"),
    ("def f():\n    return 'a ``` b'\n```\n", "def f():\n    return 'a ``` b'\n"),
    ("", ""),
])
def test_extract_code(output, expected):
  assert humaneval.extract_code(output) == expected


def test_strip_script_drops_demo_code():
  code = ("import math\n\n@staticmethod\ndef f(x):\n    return min(x, LIMIT)\n\nprint(f(1))\n"
          "assert f(2) == 3\nif __name__ == '__main__':\n    f(input())\nLIMIT = BASE + 1\n"
          "BASE = 2\nvalue = input()\nexample = f(5)\n")
  kept = humaneval.strip_script(code)
  assert "print" not in kept and "assert" not in kept and "__main__" not in kept
  assert "import math" in kept and "@staticmethod\ndef f(x)" in kept
  # assignments the definitions read (also through each other) stay, the rest go: as EvalPlus
  assert "LIMIT = BASE + 1" in kept and "BASE = 2" in kept
  assert "input()" not in kept and "example" not in kept
  # a parameter or local of the same name is not a use of the global
  kept = humaneval.strip_script("def g(value):\n    total = value\n    return total\n"
                                "value = input()\ntotal = 0\n")
  assert "input()" not in kept and "total = 0" not in kept
  assert humaneval.strip_script("def broken(:\n") == "def broken(:\n"


def test_canonical_solutions_pass_as_body_and_as_script(problems):
  # HumanEval/10 and /38 use helper functions defined in the prompt; /162 imports hashlib.
  for task_id in ("HumanEval/0", "HumanEval/10", "HumanEval/38", "HumanEval/162"):
    problem = problems[task_id]
    body = problem["canonical_solution"]
    assert humaneval.check(problem, body, timeout_s=5), task_id
    script = (problem["prompt"] + body + "\n\nif __name__ == '__main__':\n    print(input())\n"
              "print('demo')\n")
    assert humaneval.check(problem, script, timeout_s=5), task_id


def test_a_body_cut_skips_unindented_lines_inside_strings(problems):
  """HumanEval's stop rule (the first non-indented line) does not cut inside a string."""
  problem = problems["HumanEval/0"]
  body = ('    note = """\nfirst column inside a string\n"""\n'
          "    return any(abs(a - b) < threshold for i, a in enumerate(numbers)\n"
          "               for j, b in enumerate(numbers) if i != j)\n"
          "print(has_close_elements([1.0], 0.5))\n")
  program = humaneval.build_program(problem, body)
  assert "first column inside a string" in program and "print(has_close" not in program
  assert humaneval.check(problem, body, timeout_s=5)


def test_only_the_target_function_is_needed(problems):
  # the model rewrites just the entry point; imports and helpers come from the prompt
  problem = problems["HumanEval/10"]
  completion = ("def make_palindrome(string: str) -> str:\n"
                "    for i in range(len(string) + 1):\n"
                "        if is_palindrome(string[i:]):\n"
                "            return string + string[:i][::-1]\n")
  assert humaneval.check(problem, completion, timeout_s=5)


def test_wrong_solutions_fail(problems):
  problem = problems["HumanEval/0"]
  assert not humaneval.check(problem, "    return True\n", timeout_s=5)
  assert not humaneval.check(problem, "def has_close_elements(numbers, threshold):\n"
                                      "    return False\n", timeout_s=5)
  assert not humaneval.check(problem, "def has_close_elements(:\n", timeout_s=5)
  assert not humaneval.check(problem, "", timeout_s=5)


def test_hazards_are_stopped_and_checking_carries_on(problems, tmp_path):
  """An infinite loop, a 10 GiB allocation, a write outside the working directory and a socket
  connection in a row: each gives False (quickly), then a correct solution still passes."""
  problem = problems["HumanEval/0"]
  outside = tmp_path / "escaped.txt"
  header = "def has_close_elements(numbers, threshold):\n"
  hazards = {
      "loop": header + "    while True:\n        pass\n",
      "memory": header + "    x = bytearray(10 * 2**30)\n    return True\n",
      "write": header + f"    open({str(outside)!r}, 'w').write('x')\n    return True\n",
      "socket": header + ("    import socket\n"
                          "    socket.create_connection(('1.1.1.1', 53), timeout=1)\n"
                          "    return True\n"),
  }
  results = {name: humaneval.run_check(problem, code, timeout_s=1.5, memory_mb=1024)
             for name, code in hazards.items()}
  assert results["loop"].status == "timeout"
  assert results["memory"].status == "failed" and "MemoryError" in results["memory"].detail
  assert results["write"].status == "failed" and not outside.exists()
  assert results["socket"].status == "failed"
  assert not any(r.passed for r in results.values())
  assert humaneval.check(problem, problem["canonical_solution"], timeout_s=5)


def test_score_row(problems):
  problem = problems["HumanEval/0"]
  output = problem["prompt"] + problem["canonical_solution"] + "```\nExplanation: ..."
  scored = humaneval.score(problem, output, timeout_s=5)
  assert scored["correct"] is True and scored["status"] == "passed"
  assert scored["extracted"].startswith("from typing import List")
  failed = humaneval.score(problem, "    return None\n```", timeout_s=5)
  assert failed["correct"] is False and failed["status"] == "failed"
  assert failed["detail"].startswith("AssertionError")


@pytest.mark.slow
def test_every_canonical_solution_passes(problems):
  failures = [task_id for task_id, problem in problems.items()
              if not humaneval.check(problem, problem["canonical_solution"], timeout_s=10)]
  assert not failures
