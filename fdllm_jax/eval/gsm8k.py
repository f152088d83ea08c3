"""GSM8K: the reference's chat prompt; our own answer extraction and scoring.

Prompt (spec section 5): the question, a newline, then
"Please reason step by step, and put your final answer within \\boxed{}." as the user turn.

``extract_answer`` reads the model's final answer: the last non-empty ``\\boxed{...}`` (nested
braces allowed), else the number after the last ``#### ``, else the last number in the text.
Numbers are normalised: ``$``, thousands separators (``,``, ``\\,``, ``{,}``), units and a
trailing ``.`` dropped, the Unicode minus read as ``-``, ``3.0`` -> ``3``, ``3.50`` -> ``3.5``,
``\\frac{1}{2}`` and ``1/2`` -> ``0.5`` (``1/3`` stays a fraction). Scientific notation is not
read (``7.1e+07`` -> ``7.1``).

The reference's script scores with lm-evaluation-harness's gsm8k filters ("strict-match": the
number after ``#### ``; "flexible-extract": the last number), which miss boxed answers followed
by text, ``42.0`` and fractions: accuracies from here are not directly comparable with the
paper's (usually higher for the same outputs).
"""

from __future__ import annotations

import decimal
import fractions
import re

SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."

_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")
# A number: optional minus, digits with optional thousands groups, optional decimals; or ".5".
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+(?![\d])|\d+)(?:\.\d+)?|-?\.\d+")
# A number, or a fraction a/b of a number and a plain decimal (not a date or a path: 1/2/3).
_NUMBER_OR_FRACTION = re.compile(r"(" + _NUMBER.pattern + r")(?:\s*/\s*(\d+(?:\.\d+)?)(?![\d/]))?")
# A thin space, \text{,} or {,} between digit groups: a thousands separator.
_GROUP_SEPARATOR = re.compile(r"(?<=\d)(?:\\,|\\text\s*\{,\}|\{,\})(?=\d{3}(?!\d))")
_TEXT_MACRO = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*"
                         r"\{([^{}]*)\}")
_FRAC = re.compile(r"(?:(?<![\d.])(\d+)\s*)?\\[dt]?frac\s*\{\s*(-?[\d.,]+)\s*\}\s*"
                   r"\{\s*(-?[\d.,]+)\s*\}")
_PLAIN_FRACTION = re.compile(r"\s*(-?)\s*(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)\s*")
_LATEX_NOISE = (("\u2212", "-"),  # the Unicode minus
                ("\\$", "$"), ("\\%", "%"), ("{,}", ","), ("\\!", ""), ("\\,", " "),
                ("\\;", " "), ("\\:", " "), ("\\ ", " "), ("\\left", ""), ("\\right", ""),
                ("^\\circ", ""), ("^{\\circ}", ""), ("\\circ", ""), ("\\cdot", "*"),
                ("\\times", "*"), ("\\approx", "="))


def build_messages(question: str, system_prompt: str | None = None) -> list[dict]:
  """Chat messages of one GSM8K question (an optional system turn, then the user turn)."""
  messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
  messages.append({"role": "user", "content": f"{question.strip()}\n{SUFFIX}"})
  return messages


def row_messages(row: dict, system_prompt: str | None = None) -> list[dict]:
  """Prompt messages of a row: ``build_messages(question)``, or for a chat row
  (``{"messages": [...], "answer": N}``) its turns before the first assistant turn, verbatim
  (``system_prompt`` is added in front when the row has no system turn)."""
  if "messages" not in row:
    return build_messages(row["question"], system_prompt)
  messages = []
  for message in row["messages"]:
    if message["role"] == "assistant":
      break
    messages.append({"role": message["role"], "content": message["content"]})
  if system_prompt and not any(m["role"] == "system" for m in messages):
    messages.insert(0, {"role": "system", "content": system_prompt})
  return messages


def boxed_contents(text: str) -> list[str]:
  """Contents of every complete ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, in order.

  Braces nest (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``); ``\\{`` and ``\\}`` do not count.
  A box left open (a truncated generation) is ignored. A box inside a box is listed after it.
  """
  found = []
  for match in _BOX_START.finditer(text):
    depth, j = 1, match.end()
    while j < len(text) and depth:
      char = text[j]
      if char == "\\":
        j += 2
        continue
      depth += {"{": 1, "}": -1}.get(char, 0)
      j += 1
    if depth == 0:
      found.append(text[match.end():j - 1])
  return found


def normalize_number(token: str) -> str | None:
  """Canonical text of a number token: no commas, no trailing zeros, ``-0`` -> ``0``."""
  token = token.replace(",", "").strip()
  if token.startswith("-."):
    token = "-0" + token[1:]
  elif token.startswith("."):
    token = "0" + token
  try:
    value = decimal.Decimal(token)
  except decimal.InvalidOperation:
    return None
  if not value.is_finite():
    return None
  if value == value.to_integral_value():
    return str(int(value))
  return format(value.normalize(), "f")


def _fraction_text(numerator: fractions.Fraction, denominator: fractions.Fraction) -> str | None:
  if denominator == 0:
    return None
  value = numerator / denominator
  q = value.denominator
  while q % 2 == 0:
    q //= 2
  while q % 5 == 0:
    q //= 5
  if q == 1:  # a terminating decimal
    exact = decimal.Decimal(value.numerator) / decimal.Decimal(value.denominator)
    return normalize_number(str(exact))
  return f"{value.numerator}/{value.denominator}"


def _to_fraction(token: str) -> fractions.Fraction | None:
  try:
    return fractions.Fraction(token.replace(",", ""))
  except (ValueError, ZeroDivisionError):
    return None


def _replace_frac(match: re.Match) -> str:
  whole, top, bottom = match.group(1), _to_fraction(match.group(2)), _to_fraction(match.group(3))
  if top is None or bottom is None or bottom == 0:
    return match.group(0)
  value = top / bottom + (int(whole) if whole else 0)
  text = _fraction_text(value, fractions.Fraction(1))
  if text is None:
    return match.group(0)
  before = match.string[match.start() - 1] if match.start() else " "
  return (" " if before.isalnum() else "") + text + " "


def clean_latex(text: str) -> str:
  """Plain text of a LaTeX-ish answer: unwraps ``\\text{}``, evaluates numeric ``\\frac``,
  removes ``$``, ``%``, thin spaces, ``\\left``/``\\right`` and degree signs."""
  text = _GROUP_SEPARATOR.sub(",", text)
  for _ in range(3):  # nested \text{\textbf{..}}
    text = _TEXT_MACRO.sub(r" \1 ", text)
  for old, new in _LATEX_NOISE:
    text = text.replace(old, new)
  text = _FRAC.sub(_replace_frac, text)
  return text.replace("$", "").replace("%", "")


def find_numbers(text: str) -> list[str]:
  """Normalised numbers of plain ``text`` in order; a ``-`` glued to a word or digit (as in
  ``5-3`` or ``x-2``) is a dash, not a sign; ``a/b`` is one number (``1/5`` -> ``0.2``)."""
  numbers = []
  for match in _NUMBER_OR_FRACTION.finditer(text):
    token, denominator, start = match.group(1), match.group(2), match.start()
    if start > 0 and (text[start - 1].isalnum() or text[start - 1] in "._/"):
      if not token.startswith("-"):
        continue  # the tail of a word or of a longer token (x2, v1.2.3)
      token = token[1:]
    number = normalize_number(token)
    if number is not None and denominator is not None:
      number = _fraction_text(fractions.Fraction(number), fractions.Fraction(denominator))
    if number is not None:
      numbers.append(number)
  return numbers


def _answer_of_box(content: str) -> str | None:
  text = clean_latex(content)
  if "=" in text:
    text = text.rsplit("=", 1)[1]
  whole = _PLAIN_FRACTION.fullmatch(text)
  if whole:
    sign, top, bottom = whole.groups()
    value = _fraction_text(fractions.Fraction(sign + top), fractions.Fraction(bottom))
    if value is not None:
      return value
  numbers = find_numbers(text)
  if numbers:
    return numbers[0]
  text = " ".join(text.replace("{", " ").replace("}", " ").split()).strip(" .")
  return text or None


def extract_answer(text: str | None) -> str | None:
  """The final answer of a model's output, normalised; None when there is none.

  Order: the last non-empty ``\\boxed{...}`` (its first number after the last ``=``, or its
  cleaned text if it holds no number), then the first number after the last ``####``, then
  the last number anywhere.
  """
  if not text:
    return None
  boxes = [c for c in boxed_contents(text) if c.strip()]
  if boxes:
    return _answer_of_box(boxes[-1])
  marker = text.rfind("####")
  if marker >= 0:
    numbers = find_numbers(clean_latex(text[marker + 4:].split("\n", 1)[0]))
    if numbers:
      return numbers[0]
  numbers = find_numbers(clean_latex(text))
  return numbers[-1] if numbers else None


def gold_answer(answer: str | int | float) -> str:
  """The reference answer of a GSM8K row: what follows the last ``####``, normalised (a
  number as such: a chat row's ``"answer": 1e16``)."""
  if isinstance(answer, (int, float)) and not isinstance(answer, bool):
    number = normalize_number(repr(answer))
    if number is not None:
      return number
  tail = str(answer).rsplit("####", 1)[-1].strip()
  numbers = find_numbers(clean_latex(tail))
  return numbers[0] if numbers else tail


def is_correct(predicted: str | None, gold: str) -> bool:
  """Exact match of normalised answers, or equal as rational numbers (``0.5`` == ``1/2``)."""
  if predicted is None:
    return False
  if predicted == gold:
    return True
  a, b = _to_fraction(predicted), _to_fraction(gold)
  return a is not None and b is not None and a == b


def score(row: dict, output: str) -> dict:
  """Scores one model output against a GSM8K row."""
  gold = gold_answer(row["answer"])
  extracted = extract_answer(output)
  return {"extracted": extracted, "gold": gold, "correct": is_correct(extracted, gold)}
