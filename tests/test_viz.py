"""Step traces (HTML and ANSI) and the accuracy/speed plot (fdllm_jax.viz)."""

import collections
import html.parser
import os
import re

import pytest

import fdllm_jax
from fdllm_jax import viz

TOKENIZER_DIR = os.path.join(os.path.dirname(fdllm_jax.__file__), "training", "sample_data",
                             "tokenizer")
# Markup-like text, quotes, runs of spaces, newlines (one ending a token, one inside the text),
# a tab and a multi-byte character that byte-level BPE splits across tokens.
TEXT = 'Ben has <b>5</b> & "7" \'apples\'.\n\n  x  =  12\tok\ncafé → done'
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="module")
def tokenizer():
  return fdllm_jax.load_tokenizer(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def known_output(tokenizer):
  """A fixed output: tokens of TEXT and steps where several tokens share a step."""
  tokens = tokenizer.encode(TEXT)
  assert tokenizer.decode(tokens) == TEXT
  # 1, 2, 2, 2, 3, 5, 5, 6, 6, 6, 6, ... : groups of 1..4 tokens, a gap in the step numbers
  steps, step, size = [], 1, 1
  while len(steps) < len(tokens):
    steps += [step] * size
    step += 2 if step == 3 else 1
    size = size % 4 + 1
  return tokens, steps[:len(tokens)]


class TraceParser(html.parser.HTMLParser):
  """Collects the generated tokens' boxes (text per data-i) and the legend's step boxes."""

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.tokens = collections.OrderedDict()  # i -> dict(step, title, text, colour)
    self.text = []  # the generated text as shown (newlines outside the boxes included)
    self.strip = {}  # step -> tokens, from the legend
    self.tags = collections.Counter()
    self.text_tags = collections.Counter()  # tags inside the generated text
    self._stack = []  # per open tag: ("tok", i) / ("in_text",) / other
    self._in_text = 0
    self._in_style = False

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    self.tags[tag] += 1
    if tag in ("meta", "br"):  # void elements: no end tag
      return
    if self._in_text:
      self.text_tags[tag] += 1
    cls = (attrs.get("class") or "").split()
    entry = (tag,)
    if "text" in cls:
      self._in_text += 1
      entry = ("in_text",)
    elif "tok" in cls and "cont" not in cls:
      i = int(attrs["data-i"])
      assert i not in self.tokens, f"token {i} rendered twice"
      colour = re.search(r"background:(#[0-9a-f]{6})", attrs["style"]).group(1)
      self.tokens[i] = dict(step=int(attrs["data-step"]), title=attrs["title"], text="",
                            colour=colour, conf=attrs.get("data-conf"), newlines=0,
                            run=attrs.get("data-run"))
      entry = ("tok", i)
    elif "cont" in cls:
      entry = ("tok", int(attrs["data-of"]))
    elif "nl" in cls and self._in_text:  # a newline's arrow: in the token's box (the "\n" after)
      owner = next(e for e in reversed(self._stack) if e[0] == "tok")
      self.tokens[owner[1]]["newlines"] += 1
    elif "sw" in cls:
      self.strip[int(attrs["data-step"])] = int(re.search(r"flex-grow:(\d+)",
                                                          attrs["style"]).group(1))
    elif tag == "style":
      self._in_style = True
    self._stack.append(entry)

  def handle_endtag(self, tag):
    entry = self._stack.pop()
    assert entry[0] in (tag, "tok", "in_text"), (tag, entry)
    if entry[0] == "in_text":
      self._in_text -= 1
    if tag == "style":
      self._in_style = False

  def handle_data(self, data):
    if self._in_style or not self._in_text:
      return
    self.text.append(data)
    owner = next((e for e in reversed(self._stack) if e[0] == "tok"), None)
    if owner is not None:
      self.tokens[owner[1]]["text"] += data
    else:
      assert set(data) <= {"\n"}, f"text outside every token box: {data!r}"


def parse(page):
  parser = TraceParser()
  parser.feed(page)
  parser.close()
  return parser


def assert_labels_fit(trace, pieces, steps):
  """Every label starts a run and names its step; labels on one line are their width apart;
  a run that starts where the previous label has ended is labelled."""
  runs = [i for i in range(len(steps)) if i == 0 or steps[i] != steps[i - 1]]
  labelled = [i for i, box in trace.tokens.items() if box["run"] is not None]
  assert labelled and labelled[0] == 0 and set(labelled) <= set(runs)
  assert all(box["run"] in (None, str(box["step"])) for box in trace.tokens.values())
  column, free_from = 0, 0
  for i, piece in enumerate(pieces):
    if i in runs:
      assert (i in labelled) == (column >= free_from), (i, column, free_from)
      if i in labelled:
        free_from = column + viz.label_columns(steps[i])
    column, free_from = ((len(piece.split("\n")[-1]), 0) if "\n" in piece
                         else (column + len(piece), free_from))


def test_html_labels_of_one_character_runs_do_not_collide(tokenizer):
  tokens = tokenizer.encode(" 1234567890 x 9876543210")
  steps = list(range(20, 20 + len(tokens)))  # every token its own two-digit step
  pieces = viz.token_pieces(tokenizer, tokens)
  trace = parse(viz.render_steps_html(tokenizer, tokens, steps))
  labelled = [i for i, box in trace.tokens.items() if box["run"] is not None]
  assert 1 < len(labelled) < len(tokens)  # some runs are too short for their label
  assert_labels_fit(trace, pieces, steps)
  assert viz.label_columns(5) == 1 and viz.label_columns(21) == 2 and viz.label_columns(321) == 3


def test_html_every_token_once_with_its_step(tokenizer, known_output):
  tokens, steps = known_output
  confidences = [0.5 + 0.5 * (i % 7) / 7 for i in range(len(tokens))]
  page = viz.render_steps_html(tokenizer, tokens, steps, confidences=confidences)
  trace = parse(page)
  assert list(trace.tokens) == list(range(len(tokens)))  # every token once, in order
  pieces = viz.token_pieces(tokenizer, tokens)
  for i, box in trace.tokens.items():
    assert box["step"] == steps[i]
    assert f"step {steps[i]}" in box["title"] and f"confidence {confidences[i]:.3f}" in box["title"]
    assert float(box["conf"]) == pytest.approx(confidences[i], abs=1e-4)
    assert box["text"] == pieces[i].replace("\n", "")
    assert box["newlines"] == pieces[i].count("\n")
  # the text, escaped and whitespace intact, reads back exactly; markup in it stays text
  assert "".join(trace.text) == TEXT
  assert set(trace.text_tags) == {"span"} and "<b>5</b>" not in page
  # a byte fragment (é split) is an empty box; the token completing the character holds it
  assert any(box["text"] == "" for box in trace.tokens.values())
  # labels sit only on the first token of a run of one step, name its step, never overlap
  assert_labels_fit(trace, pieces, steps)
  # tokens of one step share a colour; consecutive steps differ
  by_step = collections.defaultdict(set)
  for box in trace.tokens.values():
    by_step[box["step"]].add(box["colour"])
  assert all(len(c) == 1 for c in by_step.values())
  ordered = [by_step[s].pop() for s in sorted(by_step)]
  assert all(a != b for a, b in zip(ordered, ordered[1:]))
  # the legend: one box per step, as wide as the number of tokens it fixed
  assert trace.strip == dict(collections.Counter(steps))
  distinct = len(set(steps))
  assert f"{len(tokens)} tokens in {distinct} steps" in page
  assert f"{len(tokens) / distinct:.2f} tokens per step" in page


def test_html_options_and_errors(tokenizer, known_output):
  tokens, steps = known_output
  prompt = tokenizer.apply_chat_template([{"role": "user", "content": "a < b?"}])
  page = viz.render_steps_html(tokenizer, tokens, steps, prompt_tokens=prompt,
                               title="T & <i>", legend=False, label_steps=False,
                               standalone=True)
  assert page.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in page
  assert "T &amp; &lt;i&gt;" in page and "a &lt; b?" in page
  assert 'class="strip"' not in page and "data-conf" not in page and "data-run=" not in page
  assert "confidence" not in parse(page).tokens[0]["title"]
  assert "<html>" not in viz.render_steps_html(tokenizer, tokens, steps)
  with pytest.raises(ValueError, match=r"tokens \(3\) and steps \(2\)"):
    viz.render_steps_html(tokenizer, tokens[:3], steps[:2])
  with pytest.raises(ValueError, match=r"confidences \(1\) and tokens \(3\)"):
    viz.render_steps_html(tokenizer, tokens[:3], steps[:3], confidences=[0.5])
  empty = viz.render_steps_html(tokenizer, [], [])
  assert parse(empty).tokens == {}


def test_ansi_colours_each_token_by_its_step(tokenizer, known_output):
  tokens, steps = known_output
  text = viz.render_steps_ansi(tokenizer, tokens, steps)
  body, legend = text.rsplit("\n", 1)
  assert ANSI.sub("", body) == TEXT
  distinct = len(set(steps))
  assert f"{len(tokens)} tokens in {distinct} steps" in legend
  coloured = re.findall(r"\x1b\[38;5;(\d+)m(.*?)\x1b\[0m", body, flags=re.S)
  shown = [(p, s) for p, s in zip(viz.token_pieces(tokenizer, tokens), steps) if p]
  assert [(piece, int(c)) for c, piece in coloured] == [
      (p, viz.step_colour(s)) for p, s in shown]
  assert ANSI.sub("", viz.render_steps_ansi(tokenizer, tokens, steps, legend=False)) == TEXT
  with pytest.raises(ValueError, match="differ in length"):
    viz.render_steps_ansi(tokenizer, tokens, steps[:-1])


POINTS = [
    {"kind": "ar", "series": "AR base", "accuracy": 0.80, "tokens_per_s": 100.0,
     "panel": "batch size 1"},
    *({"series": "Fast-dLLM v2", "threshold": t, "accuracy": a, "tokens_per_s": s,
       "tokens_per_forward": f, "panel": "batch size 1"}
      for t, a, s, f in ((1.0, 0.80, 60.0, 1.0), (0.9, 0.79, 150.0, 2.6), (0.5, 0.70, 220.0, 4.1))),
    {"kind": "ar", "accuracy": 0.80, "tokens_per_s": 500.0, "panel": "batch size 8"},
    {"threshold": 0.9, "accuracy": 0.78, "tokens_per_s": 900.0, "panel": "batch size 8"},
]


def test_plot_accuracy_vs_speed(tmp_path):
  path = tmp_path / "sub" / "plot.png"
  fig = viz.plot_accuracy_vs_speed(POINTS, str(path), title="demo")
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  axes = fig.get_axes()
  assert [ax.get_title() for ax in axes] == ["batch size 1", "batch size 8"]
  labels = [t.get_text() for t in axes[0].get_legend().get_texts()]
  assert labels == ["Fast-dLLM v2", "AR base"]
  # the threshold series is drawn from high to low threshold, labelled with tokens per forward
  line = next(l for l in axes[0].get_lines() if l.get_label() == "Fast-dLLM v2")
  assert list(line.get_xdata()) == [60.0, 150.0, 220.0]
  assert list(line.get_ydata()) == pytest.approx([80.0, 79.0, 70.0])
  assert "0.9, 2.6 tpf" in [t.get_text() for t in axes[0].texts]
  # no path: a figure only; no panel key: one plot without a title
  fig = viz.plot_accuracy_vs_speed([{k: v for k, v in p.items() if k != "panel"}
                                    for p in POINTS if p["panel"] == "batch size 8"])
  assert len(fig.get_axes()) == 1 and fig.get_axes()[0].get_title() == ""


def test_plot_errors():
  with pytest.raises(ValueError, match="at least one point"):
    viz.plot_accuracy_vs_speed([])
  with pytest.raises(ValueError, match=r"point 1 has no \['tokens_per_s'\]"):
    viz.plot_accuracy_vs_speed([POINTS[0], {"accuracy": 0.5}])
