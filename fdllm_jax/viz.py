"""Visual traces of parallel decoding: which step fixed each token.

``render_steps_ansi`` colours every generated token by the denoising step that fixed it
(``GenerateOutput.step_of_token``), for a terminal. Tokens sharing a colour were fixed by the
same forward pass: long runs of one colour are where parallel decoding paid off.
"""

from __future__ import annotations

from typing import Sequence

# 256-colour foregrounds readable on dark and light backgrounds, neighbours well apart.
PALETTE = (196, 33, 40, 214, 129, 37, 202, 27, 70, 163, 172, 31)
RESET = "\x1b[0m"
_REPLACEMENT = "\ufffd"


def token_pieces(tokenizer, tokens: Sequence[int], context: int = 6) -> list[str]:
  """The text each token adds, such that ``"".join(pieces) == tokenizer.decode(tokens)``.

  Decodes each token with a few tokens of left context (byte-level BPE splits characters
  across tokens); a token that ends inside a character contributes "" and the character is
  given to the token that completes it.
  """
  pieces, emitted_upto = [], 0  # tokens[:emitted_upto] are accounted for
  for i in range(len(tokens)):
    start = max(0, emitted_upto - context)
    before = tokenizer.decode(list(tokens[start:emitted_upto]))
    text = tokenizer.decode(list(tokens[start:i + 1]))
    if text.endswith(_REPLACEMENT) and i + 1 < len(tokens):
      pieces.append("")  # an incomplete character: wait for the next token
      continue
    pieces.append(text[len(before):] if text.startswith(before) else text)
    emitted_upto = i + 1
  return pieces


def step_colour(step: int) -> int:
  return PALETTE[step % len(PALETTE)]


def render_steps_ansi(tokenizer, tokens: Sequence[int], steps: Sequence[int], *,
                      legend: bool = True) -> str:
  """The decoded text with each token coloured (ANSI 256 colours) by the step that fixed it.

  Args:
    tokenizer: anything with ``decode(ids) -> str`` (a ``fdllm_jax.Tokenizer``).
    tokens: generated ids of one row (``GenerateOutput.tokens[row]``).
    steps: the matching ``GenerateOutput.step_of_token[row]``.
    legend: append a line with the number of steps and tokens per step.
  """
  if len(tokens) != len(steps):
    raise ValueError(f"tokens ({len(tokens)}) and steps ({len(steps)}) differ in length")
  out = []
  for piece, step in zip(token_pieces(tokenizer, tokens), steps):
    if piece:
      out.append(f"\x1b[38;5;{step_colour(int(step))}m{piece}{RESET}")
  text = "".join(out)
  if legend and steps:
    distinct = len(set(int(s) for s in steps))
    text += (f"\n{RESET}[colour = step that fixed the token: {len(tokens)} tokens in "
             f"{distinct} steps, {len(tokens) / distinct:.2f} tokens per step]")
  return text
