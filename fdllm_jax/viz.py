"""Visual traces of parallel decoding (which step fixed each token) and the accuracy/speed plot.

``render_steps_ansi`` (a terminal, ``decode.py --show_steps``) and ``render_steps_html`` (a
notebook or a file) colour every generated token by the denoising step that fixed it
(``GenerateOutput.step_of_token``). Tokens sharing a colour were fixed by the same forward
pass: long runs of one colour are where parallel decoding paid off.

``plot_accuracy_vs_speed`` draws accuracy against tokens per second for a threshold sweep and
the autoregressive baseline (the notebook, the evaluation harness and the benchmarks).
"""

from __future__ import annotations

import collections
import html
import math
import os
from typing import Iterable, Mapping, Sequence

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


# ------------------------------------------------------------------------------------- HTML

# Light backgrounds, dark text on each; consecutive entries far apart in hue.
HTML_PALETTE = ("#ffd8a8", "#a5d8ff", "#b2f2bb", "#fcc2d7", "#ffec99", "#d0bfff", "#99e9f2",
                "#d8f5a2", "#eebefa")

_CSS = """
.fdllm-trace{font:14px/1.9 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;color:#1a1a1a;
  background:#fff;padding:10px 12px;border:1px solid #ddd;border-radius:6px;max-width:100%}
.fdllm-trace .text{white-space:pre-wrap;word-break:break-word;margin:0;padding-top:6px;
  line-height:2.15}
.fdllm-trace .tok{border-radius:3px;padding:2px 0;box-shadow:inset -1px 0 0 #fff;cursor:default}
.fdllm-trace .tok:hover{outline:2px solid #333;outline-offset:-1px}
.fdllm-trace .run{position:relative}
.fdllm-trace .run::before{content:attr(data-run);position:absolute;left:0;top:-1.05em;
  font:9px/1 system-ui,sans-serif;color:#777;white-space:nowrap;pointer-events:none}
.fdllm-trace .frag{display:inline-block;width:.4em;height:1.1em;vertical-align:text-bottom}
.fdllm-trace .nl::before{content:"\\21B5";color:#777;font-size:85%}
.fdllm-trace .prompt{color:#777;white-space:pre-wrap;word-break:break-word;margin:0 0 6px;
  padding-bottom:6px;border-bottom:1px dashed #ccc}
.fdllm-trace .head{font:13px/1.4 system-ui,sans-serif;margin:0 0 8px}
.fdllm-trace .legend{font:12px/1.4 system-ui,sans-serif;color:#444;margin-top:10px}
.fdllm-trace .strip{display:flex;gap:1px;margin:4px 0;height:20px}
.fdllm-trace .sw{flex-basis:0;min-width:3px;border-radius:2px;font-size:11px;line-height:20px;
  text-align:center;overflow:hidden;color:#1a1a1a}
"""


def label_columns(step: int) -> int:
  """Text columns (14 px monospace, 8.4 px each) that the 9 px label of ``step`` covers.

  A digit of the label is about 5 px wide, plus 3 px of space before the next label; a run
  shorter than that gets no label (its hover text still names the step), so labels of
  one-character runs never print over each other.
  """
  return math.ceil((5 * len(str(step)) + 3) / 8.4)


def _html_text(piece: str) -> str:
  """Escaped text with newlines made visible (a CSS arrow, not part of the copied text)."""
  return '<span class="nl"></span>\n'.join(html.escape(part, quote=False)
                                            for part in piece.split("\n"))


def render_steps_html(tokenizer, tokens: Sequence[int], steps: Sequence[int], *,
                      confidences: Sequence[float] | None = None,
                      prompt_tokens: Sequence[int] | None = None, title: str | None = None,
                      legend: bool = True, label_steps: bool = True,
                      standalone: bool = False) -> str:
  """Self-contained HTML of the decoded text, each token on the colour of the step that fixed it.

  Tokens fixed by the same forward pass share a background colour, so runs of one colour are
  tokens decoded in parallel. Colours follow the order of the steps and repeat every
  ``len(HTML_PALETTE)`` steps; consecutive steps always differ. Hovering a token shows its
  index, step, id, text (and confidence when given). Every generated token is one
  ``<span class="tok" data-i=.. data-step=..>``; a token that ends inside a multi-byte
  character (its text goes to the next token) is a thin empty box of its colour.
  Whitespace and newlines are kept (a newline is marked with a grey arrow).

  Args:
    tokenizer: anything with ``decode(ids) -> str`` (a ``fdllm_jax.Tokenizer``).
    tokens: generated ids of one row (``GenerateOutput.tokens[row]``).
    steps: the matching ``GenerateOutput.step_of_token[row]``.
    confidences: optional, the confidence of each token when it was fixed (hover text).
    prompt_tokens: optional prompt ids, shown in grey above the generated text.
    title: optional heading.
    label_steps: write the step number in small grey type above the first token of every
      run of tokens fixed by one step (CSS text: not part of the copied text), except where
      the previous label on the line still covers that column (``label_columns``).
    legend: add the summary line and a strip with one box per step, as wide as the number of
      tokens the step fixed.
    standalone: a whole HTML document (for a file) instead of a fragment (for a notebook).
  """
  tokens = [int(t) for t in tokens]
  steps = [int(s) for s in steps]
  if len(tokens) != len(steps):
    raise ValueError(f"tokens ({len(tokens)}) and steps ({len(steps)}) differ in length")
  if confidences is not None:
    confidences = [float(c) for c in confidences]
    if len(confidences) != len(tokens):
      raise ValueError(f"confidences ({len(confidences)}) and tokens ({len(tokens)}) differ in "
                       "length")
  order = {step: rank for rank, step in enumerate(sorted(set(steps)))}
  colour = lambda step: HTML_PALETTE[order[step] % len(HTML_PALETTE)]

  parts = [f"<style>{_CSS}</style>", '<div class="fdllm-trace">']
  if title:
    parts.append(f'<div class="head"><b>{html.escape(title)}</b></div>')
  if prompt_tokens is not None and len(prompt_tokens):
    prompt_text = tokenizer.decode([int(t) for t in prompt_tokens])
    parts.append(f'<div class="prompt" title="prompt">{_html_text(prompt_text)}</div>')
  spans = []
  column, label_free_from = 0, 0  # text column of this token; first column a new label may use
  for i, (token, piece, step) in enumerate(zip(tokens, token_pieces(tokenizer, tokens), steps)):
    hover = f"token {i} · step {step} · id {token} · {piece!r}"
    if confidences is not None:
      hover += f" · confidence {confidences[i]:.3f}"
    conf_attr = f' data-conf="{confidences[i]:.4f}"' if confidences is not None else ""
    attrs = f'style="background:{colour(step)}" title="{html.escape(hover, quote=True)}"'
    # A newline ends the coloured box (its arrow stays inside) and is written between boxes,
    # so no empty sliver of colour starts the next line; text after it is a continuation box.
    lines = piece.split("\n")
    for k, line in enumerate(lines):
      last = k == len(lines) - 1
      if last and not line and k > 0:
        break
      inner = html.escape(line, quote=False) + ("" if last else '<span class="nl"></span>')
      if k == 0:
        cls = "tok" if piece else "tok frag"
        run = ""
        new_run = i == 0 or steps[i - 1] != step
        if label_steps and new_run and column >= label_free_from:  # room for its step label
          cls += " run"
          run = f' data-run="{step}"'
          label_free_from = column + label_columns(step)
        spans.append(f'<span class="{cls}" data-i="{i}" data-step="{step}"{run}{conf_attr} '
                     f'{attrs}>{inner}</span>')
      else:
        spans.append(f'<span class="tok cont" data-of="{i}" {attrs}>{inner}</span>')
      if not last:
        spans.append("\n")
    if "\n" in piece:
      column, label_free_from = len(lines[-1]), 0
    else:
      column += len(piece)
  parts.append(f'<div class="text">{"".join(spans)}</div>')
  if legend and steps:
    counts = collections.Counter(steps)
    distinct = len(counts)
    most = max(counts.values())
    parts.append('<div class="legend">')
    parts.append(f"<b>{len(tokens)} tokens in {distinct} steps</b> "
                 f"({len(tokens) / distinct:.2f} tokens per step, up to {most} in one step). "
                 "Background colour" + (" and small grey number" if label_steps else "") +
                 " = the denoising step (forward pass) that fixed the token: one colour run = "
                 "tokens decoded in parallel. Hover a token for details.")
    parts.append('<div class="strip" title="one box per step, as wide as the tokens it fixed">')
    for step in sorted(counts):
      n = counts[step]
      parts.append(f'<span class="sw" data-step="{step}" style="flex-grow:{n};'
                   f'background:{colour(step)}" title="step {step}: {n} token'
                   f'{"s" if n > 1 else ""}">{n if n > 1 else ""}</span>')
    parts.append("</div>")
    first, last = min(counts), max(counts)
    parts.append(f"<div>steps {first} &rarr; {last}, left to right; the number in a box is the "
                 f"tokens that step fixed.</div></div>")
  parts.append("</div>")
  body = "\n".join(parts)
  if not standalone:
    return body
  head_title = html.escape(title or "Fast-dLLM v2 step trace")
  return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{head_title}</title>'
          f'</head><body style="margin:16px;background:#fafafa">\n{body}\n</body></html>\n')


# ------------------------------------------------------------------------------------- plot

def plot_accuracy_vs_speed(points: Iterable[Mapping], path: str | None = None, *,
                           title: str | None = None, x: str = "tokens_per_s",
                           xlabel: str | None = None, dpi: int = 120):
  """Accuracy against speed (the shape of the paper's Figure 1); returns the matplotlib Figure.

  Draws on an Agg canvas (never a display, no pyplot state), so it works headless. Each point
  is a mapping with:

  - ``accuracy``: a fraction in [0, 1] (drawn as %), and the ``x`` key (``tokens_per_s``);
  - ``kind`` (optional): ``"ar"`` draws a star per point (the autoregressive baseline); any
    other value joins the points of a series into a line, ordered by ``threshold`` from high
    to low (else by x);
  - ``series`` (optional): the legend label (default "autoregressive" / "block diffusion");
  - ``threshold``, ``tokens_per_forward`` (optional): the label next to the point;
  - ``panel`` (optional): one subplot per distinct value (e.g. "batch size 8"), in order.

  Args:
    points: the measurements (dicts such as the benchmarks' JSON rows).
    path: save a PNG there too (directories created).
    title: figure title.
    x: key of the horizontal value; ``xlabel`` its axis label.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  points = list(points)
  if not points:
    raise ValueError("plot_accuracy_vs_speed needs at least one point; got none")
  for i, p in enumerate(points):
    missing = [k for k in ("accuracy", x) if k not in p]
    if missing:
      raise ValueError(f"point {i} has no {missing}; keys present: {sorted(p)} (each point needs "
                       f"'accuracy' and '{x}')")
  panels = list(dict.fromkeys(p.get("panel") for p in points))
  fig = Figure(figsize=(6.4 * len(panels), 4.6))
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  series_names = list(dict.fromkeys(_series(p) for p in points if p.get("kind") != "ar"))
  colours = {name: f"C{k}" for k, name in enumerate(series_names)}
  for ax, panel in zip(axes, panels):
    mine = [p for p in points if p.get("panel") == panel]
    for name in series_names:
      series = [p for p in mine if p.get("kind") != "ar" and _series(p) == name]
      if not series:
        continue
      if all(p.get("threshold") is not None for p in series):
        series.sort(key=lambda p: -float(p["threshold"]))
      else:
        series.sort(key=lambda p: float(p[x]))
      xs = [float(p[x]) for p in series]
      ys = [100 * float(p["accuracy"]) for p in series]
      ax.plot(xs, ys, "o-", color=colours[name], label=name)
      for p, px, py in zip(series, xs, ys):
        label = _point_label(p)
        if label:
          ax.annotate(label, (px, py), textcoords="offset points", xytext=(5, 4), fontsize=7,
                      color=colours[name])
    ar_labels = set()
    for p in (p for p in mine if p.get("kind") == "ar"):
      name = _series(p)
      ax.plot([float(p[x])], [100 * float(p["accuracy"])], "*", markersize=15, color="black",
              zorder=3, label=None if name in ar_labels else name)
      ar_labels.add(name)
    ys = [100 * float(p["accuracy"]) for p in mine]
    pad = max(2.0, 0.15 * (max(ys) - min(ys)))
    ax.set_ylim(max(-1.0, min(ys) - pad), min(101.0, max(ys) + pad))
    ax.set_xlabel(xlabel or ("generated tokens / s (wall clock)" if x == "tokens_per_s" else x))
    ax.set_ylabel("accuracy (%)")
    if panel is not None:
      ax.set_title(str(panel), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
  labelled = any(p.get("threshold") is not None for p in points)
  suptitle = title or "accuracy vs speed"
  if labelled:
    suptitle += "\n(labels: threshold" + (", tokens per forward" if any(
        p.get("tokens_per_forward") is not None for p in points) else "") + ")"
  fig.suptitle(suptitle, fontsize=10)
  fig.tight_layout()
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
  return fig


def _series(point: Mapping) -> str:
  if point.get("series"):
    return str(point["series"])
  return "autoregressive" if point.get("kind") == "ar" else "block diffusion"


def _point_label(point: Mapping) -> str:
  parts = []
  if point.get("threshold") is not None:
    parts.append(f"{float(point['threshold']):g}")
  if point.get("tokens_per_forward") is not None:
    parts.append(f"{float(point['tokens_per_forward']):.1f} tpf")
  return ", ".join(parts)
