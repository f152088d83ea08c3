"""Generates text with a Fast-dLLM v2 model (block diffusion) or autoregressively (``--ar``).

    python decode.py                      # the bundled demo: Fast-dLLM v2 against its AR base
    python decode.py --prompt "Mia has 3 bags of apples. ..."   # the demo models, your problem
    python decode.py --model PATH_OR_HUB_ID --prompt "What is 7 * 8?" --chat \\
        [--threshold 0.9] [--max_new_tokens 256] [--dual_cache] [--ar] [--show_steps] \\
        [--gin_file configs/X.gin] [--gin_param 'DecodeConfig.sub_block_size = 4']

Without ``--model`` it runs the bundled demo models (``models/demo``; ``fdllm_jax.demo``): the
adapted model with ``generate`` and its AR base with ``generate_ar`` on the same chat prompt
(a held-out problem unless ``--prompt`` is given), each timed after a compiling warm-up call,
and prints both answers with tokens/s, tokens per forward and forwards.

With ``--model`` it prints the generated text, then tokens/s, tokens per forward and forwards.
Gin binds any ``DecodeConfig`` field; explicit flags override gin. ``--prompt`` may be repeated
(one batch; with ``--max_batch_size B`` the prompts stream through B device rows, a row that
ends taking the next prompt).

Many prompts come from a file and go to one (either mode):

    python decode.py --model DIR --chat --prompts_file prompts.txt --output results.jsonl \
        --max_batch_size 8

``--prompts_file``: a ``.jsonl`` file of ``{"prompt": text}`` objects (``--chat`` and
``--system`` wrap the text as for ``--prompt``) or ``{"messages": [{"role": ..., "content":
...}, ...]}`` objects (rendered with the chat template as given), or any other file as plain
text, one prompt per non-blank line. ``--output``: one JSON line per prompt, in the file's
order, instead of printing the texts (``read_prompts_file``, ``result_rows``).
A progress bar (on a terminal) follows the generation: the device loop runs a few blocks per
call and reports in between, so there is no host round trip per step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Sequence, Union

# A prompt as given: text, or chat messages (a jsonl ``"messages"`` entry).
PromptEntry = Union[str, list]


def parse_args(argv):
  p = argparse.ArgumentParser(description="Fast-dLLM v2 decoding (block diffusion or AR).")
  p.add_argument("--model", default=None,
                 help="checkpoint directory or hub id (default: the bundled demo models)")
  p.add_argument("--tokenizer", default=None, help="tokenizer dir or hub id (default: --model)")
  p.add_argument("--prompt", action="append", default=None,
                 help="the prompt text; repeat for a batch (required with --model)")
  p.add_argument("--prompts_file", default=None,
                 help="prompts from a file: .jsonl lines {\"prompt\": text} or {\"messages\": "
                      "[...]}, otherwise one prompt per non-blank line")
  p.add_argument("--output", default=None,
                 help="write one JSON line per prompt here instead of printing the texts")
  p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
  p.add_argument("--system", default=None, help="system message for --chat")
  p.add_argument("--threshold", type=float, default=None,
                 help="confidence in (0, 1] to commit a token in parallel (DecodeConfig: 0.9)")
  p.add_argument("--max_new_tokens", type=int, default=None,
                 help="tokens to generate per prompt, at most (DecodeConfig: 256)")
  p.add_argument("--block_size", type=int, default=None,
                 help="block-diffusion block size (DecodeConfig: 32)")
  p.add_argument("--sub_block_size", type=int, default=None,
                 help="sub-block size, divides --block_size (DecodeConfig: 8)")
  p.add_argument("--temperature", type=float, default=None,
                 help="sampling temperature >= 0 (0: greedy, the default)")
  p.add_argument("--top_p", type=float, default=None,
                 help="nucleus in (0, 1] (with --temperature > 0)")
  p.add_argument("--seed", type=int, default=None, help="sampling seed (with --temperature > 0)")
  p.add_argument("--dual_cache", action="store_true", help="DualCache (sub-block K/V cache)")
  p.add_argument("--ar", action="store_true", help="autoregressive decoding (the baseline)")
  p.add_argument("--show_steps", action="store_true",
                 help="colour each token by the step that fixed it (ANSI)")
  p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                 help="parameter dtype (auto: bfloat16 on accelerators, float32 on CPU)")
  p.add_argument("--attention_impl", default=None,
                 help="attention implementation (xla, pallas, triton, mosaic, cudnn, splash; "
                      "default: the backend's)")
  p.add_argument("--gin_file", action="append", default=[], help="gin file; may be repeated")
  p.add_argument("--gin_param", action="append", default=[],
                 help="gin binding, e.g. 'DecodeConfig.threshold = 0.5'; may be repeated")
  p.add_argument("--max_batch_size", type=int, default=None,
                 help="decode at most this many prompts at a time; the others take the rows "
                      "that end (default: every --prompt in one batch)")
  p.add_argument("--blocks_per_call", type=int, default=2,
                 help="blocks decoded per device call between progress updates")
  p.add_argument("--progress", default="auto", choices=("auto", "always", "never"),
                 help="progress bar on stderr (auto: when it is a terminal)")
  p.add_argument("--traceback", action="store_true", help="show tracebacks of errors")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from fdllm_jax import cli

  return cli.run_reporting_errors(_run, args)


def _gin_bound(name: str) -> bool:
  import gin
  try:
    gin.query_parameter(f"DecodeConfig.{name}")
    return True
  except ValueError:
    return False


def decode_config(args, tokenizer):
  """DecodeConfig from gin bindings, the tokenizer's special ids, then explicit flags."""
  import gin

  import fdllm_jax
  from fdllm_jax import cli

  try:
    cli.parse_gin(args.gin_file, args.gin_param)
    try:
      config = fdllm_jax.DecodeConfig()
      # The tokenizer knows the model's MASK and stop ids, unless gin names others.
      overrides = {name: value for name, value in (("mask_id", tokenizer.mask_id),
                                                   ("stop_ids", tokenizer.stop_ids))
                   if not _gin_bound(name)}
    except Exception as e:  # gin raises many types; all are configuration mistakes
      raise ValueError(f"bad gin configuration: {type(e).__name__}: {e}") from None
  finally:
    gin.clear_config()
  for name in ("threshold", "max_new_tokens", "block_size", "sub_block_size", "temperature",
               "top_p", "seed"):
    if getattr(args, name) is not None:
      overrides[name] = getattr(args, name)
  if args.dual_cache:
    overrides["use_dual_cache"] = True
  return dataclasses.replace(config, **overrides)


def read_prompts_file(path: str) -> list[PromptEntry]:
  """The prompts of ``--prompts_file``, in the file's order.

  A ``.jsonl`` file holds one JSON object per non-blank line, either ``{"prompt": text}`` or
  ``{"messages": [{"role": str, "content": str}, ...]}`` (other keys are ignored); any other
  file is plain text, one prompt per non-blank line (a prompt with line breaks needs jsonl).
  Errors name the file and the line.
  """
  if os.path.isdir(path):
    raise ValueError(f"--prompts_file {path!r} is a directory; give a file")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--prompts_file {path!r} does not exist")
  try:
    with open(path, encoding="utf-8") as f:
      lines = [(number, line.rstrip("\r\n")) for number, line in enumerate(f, 1)]
  except UnicodeDecodeError as e:
    raise ValueError(f"--prompts_file {path!r} is not UTF-8 text ({e.reason} at byte "
                     f"{e.start})") from None
  lines = [(number, line) for number, line in lines if line.strip()]
  if path.endswith(".jsonl"):
    entries = [_jsonl_prompt(path, number, line) for number, line in lines]
  else:
    entries = [line for _, line in lines]
  if not entries:
    raise ValueError(f"--prompts_file {path!r} holds no prompt (only blank lines)")
  return entries


def _jsonl_prompt(path: str, number: int, line: str) -> PromptEntry:
  where = f"{path} line {number}"
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"{where} is not JSON ({e})") from None
  if not isinstance(obj, dict) or ("prompt" in obj) == ("messages" in obj):
    raise ValueError(f"{where} must be an object with one of the keys 'prompt' (text) or "
                     f"'messages' (chat messages); got {line[:200]!r}")
  if "prompt" in obj:
    if not isinstance(obj["prompt"], str):
      raise ValueError(f"{where}: 'prompt' must be a string; got {obj['prompt']!r}")
    return obj["prompt"]
  messages = obj["messages"]
  if not isinstance(messages, list) or not messages or not all(
      isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
      for m in messages):
    raise ValueError(f"{where}: 'messages' must be a non-empty list of objects with string "
                     f"'role' and 'content'; got {messages!r}")
  return [{"role": m["role"], "content": m["content"]} for m in messages]


def prompt_entries(args) -> list[PromptEntry] | None:
  """The prompts of ``--prompt`` or ``--prompts_file`` (not both); None when neither is given."""
  if args.prompt and args.prompts_file:
    raise ValueError("give --prompt or --prompts_file, not both")
  if args.prompts_file:
    return read_prompts_file(args.prompts_file)
  return args.prompt


def result_rows(entries: Sequence[PromptEntry], out, tokenizer, **extra_columns) -> list[dict]:
  """One dict per prompt for ``--output``: the prompt as given, the generated text, its token
  count, whether it stopped on a stop id (False: the token limit), and the row's own forward
  count when the last of its tokens was fixed (tokens of a block are fixed in any order);
  ``extra_columns`` maps a name to a function of the decoded text (e.g. the demo's answer)."""
  rows = []
  for index, (entry, tokens, steps) in enumerate(zip(entries, out.tokens, out.step_of_token)):
    text = tokenizer.decode(tokens)
    row = {"index": index, "prompt": entry, "text": text, "num_tokens": len(tokens),
           "finished": bool(out.finished[index]), "forwards": max(steps, default=0)}
    row.update({name: column(text) for name, column in extra_columns.items()})
    rows.append(row)
  return rows


def write_jsonl(path: str, rows: Sequence[dict]) -> None:
  """Writes ``rows`` as JSON lines, through a temporary file so a crash leaves no half file."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  os.replace(path + ".tmp", path)


def _check_output_flags(args) -> None:
  if args.output and args.show_steps:
    raise ValueError("--show_steps colours the printed texts and --output writes them to a file "
                     "instead: give one of them")
  if args.output and os.path.isdir(args.output):
    raise ValueError(f"--output {args.output!r} is a directory; give a file name (.jsonl)")
  parent = os.path.dirname(os.path.abspath(args.output or "."))
  while args.output and not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if args.output and not os.path.isdir(parent):
    raise ValueError(f"--output {args.output!r}: {parent!r} is a file, not a directory")


# Flags only the block-diffusion engine reads: refused with --ar, which would ignore them.
_DIFFUSION_FLAGS = ("threshold", "block_size", "sub_block_size")


def _check_flag_combinations(args) -> None:
  if args.ar:
    given = [f"--{name}" for name in _DIFFUSION_FLAGS if getattr(args, name) is not None]
    given += ["--dual_cache"] if args.dual_cache else []
    if given:
      raise ValueError(f"{', '.join(given)} set block-diffusion decoding, which --ar does not "
                       f"run; drop them or --ar")
  if args.model is None:
    for name in ("tokenizer", "system"):
      if getattr(args, name) is not None:
        raise ValueError(f"--{name} needs --model (the demo models bring their own tokenizer "
                         f"and chat format)")
  elif args.system is not None and not args.chat:
    raise ValueError("--system is a chat turn: it needs --chat")


def _check_sampling_flags(args, config) -> None:
  if config.temperature == 0 and (args.top_p is not None or args.seed is not None):
    raise ValueError("--top_p and --seed shape sampling, which needs --temperature > 0 (greedy "
                     "decoding ignores them)")


def _resolve_dtype(name: str) -> str:
  import jax
  if name == "auto":
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"
  return name


def _run(args) -> int:
  import fdllm_jax

  _check_output_flags(args)
  _check_flag_combinations(args)
  entries = prompt_entries(args)
  if args.model is None:
    return _run_demo(args, entries)
  if not entries:
    raise ValueError("--prompt or --prompts_file is required with --model (without --model the "
                     "bundled demo runs)")
  tokenizer = fdllm_jax.load_tokenizer(args.tokenizer or args.model)
  config = decode_config(args, tokenizer)
  _check_sampling_flags(args, config)
  model = fdllm_jax.load_model(args.model, dtype=_resolve_dtype(args.dtype))
  if not args.ar and model.config.model_type != "Fast_dLLM_Qwen":
    print(f"warning: {args.model} is a {model.config.model_type} model, not trained for block "
          f"diffusion (model_type Fast_dLLM_Qwen); --ar decodes it autoregressively",
          file=sys.stderr)
  system = [{"role": "system", "content": args.system}] if args.system else []

  def encode(entry: PromptEntry) -> list[int]:
    if isinstance(entry, list):  # chat messages from a jsonl file, rendered as given
      return tokenizer.apply_chat_template(entry)
    if args.chat:
      return tokenizer.apply_chat_template(system + [{"role": "user", "content": entry}])
    return tokenizer.encode(entry)

  prompts = [encode(entry) for entry in entries]
  if args.blocks_per_call < 1:
    raise ValueError(f"--blocks_per_call must be >= 1; got {args.blocks_per_call}")

  bar = _progress_bar(args, config, len(prompts))
  try:
    if args.ar:
      out = fdllm_jax.generate_ar(
          model, prompts, max_new_tokens=config.max_new_tokens, stop_ids=config.stop_ids,
          temperature=config.temperature,
          top_p=config.top_p if config.temperature > 0 else 1.0, seed=config.seed,
          max_length=config.max_length, progress=bar.update if bar else None,
          tokens_per_call=args.blocks_per_call * config.block_size if bar else None,
          attention_impl=args.attention_impl, max_batch_size=args.max_batch_size)
    else:  # without a bar, one device call for the whole generation
      out = fdllm_jax.generate(model, prompts, config, progress=bar.update if bar else None,
                               blocks_per_call=args.blocks_per_call if bar else None,
                               attention_impl=args.attention_impl,
                               max_batch_size=args.max_batch_size)
  finally:
    if bar:
      bar.close()

  if args.output:
    write_jsonl(args.output, result_rows(entries, out, tokenizer))
    print(f"wrote {len(prompts)} results to {args.output}")
  else:
    _print_texts(args, tokenizer, out)
  mode = "AR" if args.ar else (f"threshold {config.threshold}"
                               + (", DualCache" if config.use_dual_cache else ""))
  print(f"[{mode}] {out.num_tokens} tokens in {out.seconds:.2f} s: "
        f"{out.tokens_per_second:.1f} tokens/s, {out.tokens_per_row_forward:.2f} tokens/forward, "
        f"{out.num_forwards} forwards{_of_rows(out)} (compile {out.compile_seconds:.1f} s)",
        flush=True)
  return 0


def _of_rows(out) -> str:
  """' of N rows' after the forward count of a batch (tokens/forward is then per row)."""
  return f" of {out.batch_rows} rows" if (out.batch_rows or 1) > 1 else ""


def _print_texts(args, tokenizer, out) -> None:
  from fdllm_jax import viz
  for row, (tokens, steps) in enumerate(zip(out.tokens, out.step_of_token)):
    if len(out.tokens) > 1:
      print(f"--- [{row}] {'(stopped)' if out.finished[row] else '(length limit)'}")
    if args.show_steps:
      print(viz.render_steps_ansi(tokenizer, tokens, steps))
    else:
      print(tokenizer.decode(tokens))


def _run_demo(args, entries: list[PromptEntry] | None) -> int:
  """The bundled demo: the adapted model and its AR base on the same chat prompts (each text
  entry is a question; jsonl messages are rendered as given)."""
  import fdllm_jax
  from fdllm_jax import demo
  from fdllm_jax.demo import task

  for directory in (demo.FAST_DLLM_DIR, demo.AR_BASE_DIR):
    if not os.path.isfile(os.path.join(directory, "config.json")):
      raise FileNotFoundError(f"no demo model in {directory}: pass --model, or rebuild the demo "
                              "with `bash scripts/build_demo.sh`")
  if args.ar:
    raise ValueError("--ar needs --model; without --model both engines run")
  tokenizer = fdllm_jax.load_tokenizer(demo.FAST_DLLM_DIR)
  config = decode_config(args, tokenizer)
  _check_sampling_flags(args, config)
  dtype = _resolve_dtype(args.dtype)
  adapted = fdllm_jax.load_model(demo.FAST_DLLM_DIR, dtype=dtype)
  ar_base = fdllm_jax.load_model(demo.AR_BASE_DIR, dtype=dtype)
  entries = entries or [demo.DEMO_QUESTION]
  prompts = [tokenizer.apply_chat_template(
      entry if isinstance(entry, list) else [{"role": "user", "content": entry}])
      for entry in entries]
  runs = {
      "Fast-dLLM v2": lambda: fdllm_jax.generate(adapted, prompts, config,
                                                 attention_impl=args.attention_impl,
                                                 max_batch_size=args.max_batch_size),
      "AR base": lambda: fdllm_jax.generate_ar(
          ar_base, prompts, max_new_tokens=config.max_new_tokens, stop_ids=config.stop_ids,
          temperature=config.temperature, top_p=config.top_p if config.temperature > 0 else 1.0,
          seed=config.seed, max_length=config.max_length, attention_impl=args.attention_impl,
          max_batch_size=args.max_batch_size),
  }
  outs = {}
  for name, run in runs.items():
    compile_seconds = run().compile_seconds  # warm-up: compiles this batch's shapes
    outs[name] = run()
    outs[name].compile_seconds = compile_seconds
  mode = f"threshold {config.threshold}" + (", DualCache" if config.use_dual_cache else "")
  if args.output:  # one line per prompt, each engine's result under its own key
    per_engine = {key: result_rows(entries, outs[name], tokenizer, answer=task.extract_answer)
                  for key, name in (("fast_dllm", "Fast-dLLM v2"), ("ar_base", "AR base"))}
    lines = [{"index": index, "prompt": entry} for index, entry in enumerate(entries)]
    for key, rows in per_engine.items():
      for line, row in zip(lines, rows):
        line[key] = {k: v for k, v in row.items() if k not in ("index", "prompt")}
    write_jsonl(args.output, lines)
    print(f"wrote {len(entries)} results to {args.output}")
  else:
    _print_demo_answers(args, tokenizer, entries, outs)
  for name, out in outs.items():
    label = f"{name} ({mode})" if name == "Fast-dLLM v2" else f"{name} (generate_ar)"
    print(f"{label:40s} {out.num_tokens:4d} tokens in {out.seconds * 1e3:7.1f} ms: "
          f"{out.tokens_per_second:7.1f} tokens/s, {out.tokens_per_row_forward:5.2f} "
          f"tokens/forward, {out.num_forwards:3d} forwards{_of_rows(out)} "
          f"(compile {out.compile_seconds:.1f} s)")
  diff, ar = outs["Fast-dLLM v2"], outs["AR base"]
  print(f"speed-up over AR: {diff.tokens_per_second / ar.tokens_per_second:.2f}x tokens/s, "
        f"{ar.num_forwards / diff.num_forwards:.2f}x fewer forwards", flush=True)
  return 0


def _print_demo_answers(args, tokenizer, entries, outs) -> None:
  from fdllm_jax import viz
  from fdllm_jax.demo import task
  for row, entry in enumerate(entries):
    question = entry if isinstance(entry, str) else next(
        (m["content"] for m in reversed(entry) if m["role"] == "user"), entry[-1]["content"])
    print(f"Q: {question}")
    for name, out in outs.items():
      tokens, steps = out.tokens[row], out.step_of_token[row]
      text = (viz.render_steps_ansi(tokenizer, tokens, steps)
              if args.show_steps and name == "Fast-dLLM v2" else tokenizer.decode(tokens))
      answer = task.extract_answer(tokenizer.decode(tokens))
      print(f"\n[{name}] answer {answer}:\n{text}")
    print()


class _Bar:
  """tqdm over generated positions; ``update(done, total)`` as generate's progress callback."""

  def __init__(self, total, always: bool):
    from tqdm import tqdm
    self._tqdm = tqdm(total=total, unit="tok", dynamic_ncols=True, leave=False,
                      disable=False if always else None, file=sys.stderr)
    self._done = 0

  @property
  def disabled(self) -> bool:
    return bool(self._tqdm.disable)

  def update(self, done, total):
    self._tqdm.total = total
    self._tqdm.update(done - self._done)
    self._done = done

  def close(self):
    self._tqdm.close()


def _progress_bar(args, config, batch):
  """A bar on a terminal; None otherwise (then the decode is a single device call)."""
  if args.progress == "never":
    return None
  bar = _Bar(config.max_new_tokens * batch, always=args.progress == "always")
  if bar.disabled:
    bar.close()
    return None
  return bar


if __name__ == "__main__":
  sys.exit(main())
