"""GSM8K prompt, answer extraction and scoring (fdllm_jax.eval.gsm8k)."""

import pytest

from fdllm_jax.eval import gsm8k

# (model output, expected extracted answer): hand-written, covering the formats and model mistakes.
EXTRACTION_CASES = [
    # \boxed{...}
    ("So she makes 9 * 2 = 18 dollars.\n\\boxed{18}", "18"),
    ("The answer is $\\boxed{18}$.", "18"),
    ("\\boxed{\\$18}", "18"),
    ("\\boxed{18 \\text{ dollars}}", "18"),
    ("\\boxed{\\text{18}}", "18"),
    ("\\boxed{1,200}", "1200"),
    ("\\boxed{1{,}200}", "1200"),
    ("\\boxed{3.0}", "3"),
    ("\\boxed{3.50}", "3.5"),
    ("\\boxed{-7}", "-7"),
    ("\\boxed{0.25}", "0.25"),
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{\\dfrac{10}{4}}", "2.5"),
    ("\\boxed{\\frac{1}{3}}", "1/3"),
    ("\\boxed{-\\frac{3}{4}}", "-0.75"),
    ("\\boxed{2\\frac{1}{2}}", "2.5"),
    ("\\boxed{25\\%}", "25"),
    ("\\boxed{x = 42}", "42"),
    # thousands as LaTeX thin spaces or \text{,}; the Unicode minus
    ("\\boxed{34\\,663}", "34663"),
    ("\\boxed{5\\text{,}000}", "5000"),
    ("\\boxed{\u221210}", "-10"),
    ("\\boxed{2\\,5}", "2"),  # not a thousands group
    ("\\boxed{ 7 }.", "7"),
    # several boxes: the last one wins; an empty or unclosed box is ignored
    ("First I thought \\boxed{10}, but correcting: \\boxed{12}", "12"),
    ("Put it in \\boxed{}. The total is 5 + 6 = 11.", "11"),
    ("\\boxed{4} ... so the final answer is \\boxed{8", "4"),
    ("\\boxed{\\boxed{5}}", "5"),
    ("\\boxed{{{6}}}", "6"),
    ("\\fbox{9}", "9"),
    # a box with no number keeps its text
    ("\\boxed{\\text{Tuesday}}", "Tuesday"),
    # #### N
    ("Janet sells 16 - 3 - 4 = 9 eggs.\n#### 18", "18"),
    ("#### $1,000.", "1000"),
    ("#### 18\nThe answer was 20 in the other case.", "18"),
    # last number, with units, money, negatives and decimals
    ("She makes $18 every day.", "18"),
    ("The temperature drops to -5 degrees.", "-5"),
    ("It costs $5-$3 = $2.", "2"),
    ("Total: 1,234.50 kg.", "1234.5"),
    ("He runs 3.0 miles", "3"),
    ("That is .5 of the cake", "0.5"),
    ("Between 2023-2024 there were 7 games.", "7"),
    # a fraction a/b is one number, a date is not
    ("The answer is 1/5.", "0.2"),
    ("Each gets 1/3 of the pie", "1/3"),
    ("#### \\frac{1}{3}", "1/3"),
    ("so 24/2 = 12 apples", "12"),
    ("On 1/2/2020 he had 5 apples", "5"),
    # no answer at all
    ("I don't know.", None),
    ("", None),
    (None, None),
]


@pytest.mark.parametrize("text,expected", EXTRACTION_CASES)
def test_extract_answer(text, expected):
  assert gsm8k.extract_answer(text) == expected


def test_enough_hand_written_cases():
  assert len(EXTRACTION_CASES) >= 25


def test_boxed_contents_nested_and_escaped_braces():
  assert gsm8k.boxed_contents("a \\boxed{\\frac{1}{2}} b \\boxed{\\{1\\}}") == [
      "\\frac{1}{2}", "\\{1\\}"]
  assert gsm8k.boxed_contents("\\boxed{open") == []


@pytest.mark.parametrize("token,expected", [
    ("3.0", "3"), ("-0", "0"), ("1,000", "1000"), ("0.50", "0.5"), (".5", "0.5"), ("-.5", "-0.5"),
    ("007", "7"), ("12.3400", "12.34"),
])
def test_normalize_number(token, expected):
  assert gsm8k.normalize_number(token) == expected


def test_gold_answer_and_is_correct():
  assert gsm8k.gold_answer("Step...\n#### 1,200") == "1200"
  assert gsm8k.gold_answer("42") == "42"
  # a chat row's numeric answer, read as the number it is
  assert [gsm8k.gold_answer(a) for a in (42, -3, 1e16, 1e-05, 2.5)] == [
      "42", "-3", "10000000000000000", "0.00001", "2.5"]
  assert gsm8k.is_correct("18", "18")
  assert gsm8k.is_correct("0.5", "1/2")
  assert gsm8k.is_correct("18.0", "18")
  assert not gsm8k.is_correct("17", "18")
  assert not gsm8k.is_correct(None, "18")
  assert not gsm8k.is_correct("Tuesday", "18")


def test_score_row():
  row = {"question": "q", "answer": "reasoning\n#### 18"}
  assert gsm8k.score(row, "so \\boxed{18}.") == {"extracted": "18", "gold": "18", "correct": True}
  assert gsm8k.score(row, "no idea")["correct"] is False


def test_build_messages_uses_reference_suffix():
  messages = gsm8k.build_messages("  What is 2+2? ")
  assert messages == [{"role": "user", "content": "What is 2+2?\n" + gsm8k.SUFFIX}]
  assert gsm8k.SUFFIX == ("Please reason step by step, and put your final answer within "
                          "\\boxed{}.")
  with_system = gsm8k.build_messages("q", system_prompt="sys")
  assert with_system[0] == {"role": "system", "content": "sys"}


def test_chat_rows_are_used_verbatim():
  row = {"messages": [{"role": "user", "content": "Mia has 3 apples. " + gsm8k.SUFFIX},
                      {"role": "assistant", "content": "The answer is \\boxed{3}."}],
         "answer": 3}
  assert gsm8k.row_messages(row) == row["messages"][:1]
  assert gsm8k.row_messages(row, "sys") == [{"role": "system", "content": "sys"},
                                            row["messages"][0]]
  assert gsm8k.score(row, "so \\boxed{3}")["correct"] is True
  assert gsm8k.row_messages({"question": "q", "answer": "#### 1"}) == gsm8k.build_messages("q")


def test_every_bundled_reference_solution_extracts_to_its_gold():
  from fdllm_jax.eval import data
  rows = data.load_gsm8k()
  assert all(gsm8k.extract_answer(r["answer"]) == gsm8k.gold_answer(r["answer"]) for r in rows)
