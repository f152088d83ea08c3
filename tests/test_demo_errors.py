"""benchmarks/demo_errors.py: each kind of error on hand-made answers, and a run on the bundled
models whose counts add up to their wrong answers."""

import pytest

from tests import benchmark_modules

errors = benchmark_modules.load("demo_errors")

SOLUTION = ("Ava starts with 9.\n"
            "After giving 3 to Sam, Ava has 9 - 3 = 6.\n"
            "After buying 4 more, Ava has 6 + 4 = 10.\n"
            "The answer is \\boxed{10}.")
SHARED = ("Lily has 3 * 4 = 12.\n"
          "Each friend gets 12 / 2 = 6.\n"
          "The answer is \\boxed{6}.")


def _replace_line(text, index, line):
  lines = text.split("\n")
  lines[index] = line
  return "\n".join(lines)


@pytest.mark.parametrize("generated,expected", [
    # the step before repeated where the answer line belongs
    (_replace_line(SOLUTION, 3, "After buying 4 more, Ava has 10 + 4 = 14.") +
     "\nThe answer is \\boxed{14}.", ("extra_step", 3)),
    # a garbled line that starts like the answer's but is a step
    (_replace_line(SOLUTION, 3, "The buying 4 more, Ava has 10 + 4 = 14.") +
     "\nThe answer is \\boxed{14}.", ("extra_step", 3)),
    # a step in place of the share line
    (_replace_line(SHARED, 1, "After doubling, Lily has 12 * 2 = 24."), ("extra_step", 1)),
    # every line right, then one more
    (SOLUTION + "\nThe answer is \\boxed{11}.", ("extra_step", 4)),
    ("Ava starts with 9.\nAfter giving 3 to Sam, Ava has 9 - 3 = 6.\nThe answer is \\boxed{6}.",
     ("missing_step", 2)),
    (_replace_line(SOLUTION, 2, "After buying 4 more, Ava has 6 + 4 = 11."), ("arithmetic", 2)),
    (_replace_line(SOLUTION, 2, "After buying 4 more, Ava has 7 + 4 = 11."),
     ("wrong_number", 2)),
    (_replace_line(SHARED, 1, "Each friend gets 12 / 5 = 2."), ("arithmetic", 1)),
    (_replace_line(SOLUTION, 1, "After giving 3 to Max, Ava has 9 - 3 = 6."), ("wording", 1)),
    ("Ava starts with 9.\nAfter giving 3 to Sam, Ava has", ("unfinished", 1)),
    ("Ava starts with 9.", ("unfinished", 1)),
])
def test_classify_names_the_first_line_that_differs(generated, expected):
  assert errors.classify(generated, SOLUTION if "Ava" in generated else SHARED) == expected


def test_classify_matching_answer_is_no_error():
  assert errors.classify(SOLUTION, SOLUTION) is None
  assert errors.classify("  " + SOLUTION + "\n", SOLUTION) is None


def test_summary_counts_every_kind_and_keeps_examples():
  wrong = _replace_line(SOLUTION, 2, "After buying 4 more, Ava has 6 + 4 = 11.")
  records = [("arithmetic", 2, wrong, SOLUTION)] * 3 + [("unfinished", 1, "Ava starts with 9.",
                                                         SOLUTION)]
  summary = errors.summarize(records, num_examples=2)
  assert summary["errors"] == {"extra_step": 0, "missing_step": 0, "arithmetic": 3,
                               "wrong_number": 0, "wording": 0, "unfinished": 1}
  assert len(summary["examples"]["arithmetic"]) == 2
  example = summary["examples"]["arithmetic"][0]
  assert example["generated"] == "After buying 4 more, Ava has 6 + 4 = 11."
  assert example["expected"] == "After buying 4 more, Ava has 6 + 4 = 10."
  assert summary["examples"]["unfinished"][0]["generated"] is None
  assert set(summary["examples"]) == {"arithmetic", "unfinished"}


@pytest.mark.parametrize("engine_args", [[], ["--ar", "models/demo/ar_base"]])
def test_bundled_models_count_every_wrong_answer_once(tmp_path, engine_args):
  out = tmp_path / "errors.json"
  report = errors.main(["--num_problems", "16", "--threshold", "0.5", "--out", str(out),
                        *engine_args])
  assert out.exists() and report["num_problems"] == 16
  assert report["engine"] == ("generate_ar" if engine_args else "generate")
  assert sum(report["errors"].values()) == report["wrong"]
  assert report["wrong"] == round(16 * (1 - report["accuracy"]))
  if engine_args:
    assert report["tokens_per_row_forward"] == pytest.approx(1.0)  # one token per AR step
  else:  # threshold 0.5 fixes several tokens per forward
    assert report["tokens_per_row_forward"] > 2
  for kind, shown in report["examples"].items():
    assert 0 < len(shown) <= min(3, report["errors"][kind])


def test_bad_arguments_are_named():
  with pytest.raises(SystemExit):
    errors.parse_args(["--num_problems", "0"])
  with pytest.raises(SystemExit):
    errors.parse_args(["--examples", "-1"])
