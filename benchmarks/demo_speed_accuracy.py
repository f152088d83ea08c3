"""Speed and accuracy of the bundled demo models: the AR base against Fast-dLLM v2 decoding.

    python benchmarks/demo_speed_accuracy.py                  # 200 held-out problems, bs 1 and 8
    python benchmarks/demo_speed_accuracy.py --num_problems 40 --batch_sizes 1   # a quick look

On held-out problems of the demo task (``fdllm_jax.demo.task``, test split) it measures, in one
process and on the same problems:

- the AR base (``models/demo/ar_base``) with ``generate_ar`` (greedy);
- the adapted model (``models/demo/fast_dllm``) with ``generate`` at each threshold, with and
  without DualCache (greedy, block 32, sub-block 8 or `--sub_block_size`);

for every batch size: accuracy (the ``\\boxed{}`` answer), generated tokens per second (wall
clock, compilation excluded), tokens per forward and forwards. The problems are processed chunk
by chunk (one chunk = one batch, or with ``--stream_chunk N`` N prompts streamed through
batch-size rows by both engines' ``max_batch_size``) and every method runs on a chunk before the
next chunk starts, so a change of machine load hits all methods alike; the ratios are side by
side.

It also times single model forwards on the decoding cache: a 1-token AR step, an 8-token
sub-block and a 32-token window, each inside one jitted loop (no dispatch per forward). Wall-
clock speedup = tokens per forward x (AR time per token) / (diffusion time per forward): where
the window costs several AR steps (small models on a CPU), the JSON shows it.

Writes one JSON line per measurement to stdout, the whole report to ``--out`` (JSON) and the
accuracy-against-throughput plot to ``--plot`` (PNG, the shape of the paper's Figure 1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

THRESHOLDS = (1.0, 0.95, 0.9, 0.8, 0.7, 0.5)


def parse_args(argv=None):
  from fdllm_jax import demo
  here = os.path.dirname(os.path.abspath(__file__))
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--ar", default=demo.AR_BASE_DIR, help="AR base checkpoint")
  p.add_argument("--adapted", default=demo.FAST_DLLM_DIR, help="Fast-dLLM v2 checkpoint")
  p.add_argument("--num_problems", type=int, default=200)
  p.add_argument("--seed", type=int, default=0, help="seed of the test split's problems")
  p.add_argument("--batch_sizes", default="1,8")
  p.add_argument("--thresholds", default=",".join(str(t) for t in THRESHOLDS))
  p.add_argument("--sub_block_size", type=int, default=8,
                  help="the reference's default 8; 1 decodes strictly left to right")
  p.add_argument("--max_new_tokens", type=int, default=128)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--stream_chunk", type=int, default=0,
                 help="N > 0: chunks of N prompts, each decoded by both engines with "
                      "max_batch_size = the batch size (an ended row takes the next prompt); "
                      "0: chunks are fixed batches")
  p.add_argument("--out", default=os.path.join(here, "results", "demo_speed_accuracy.json"))
  p.add_argument("--plot", default=os.path.join(here, "results", "demo_speed_accuracy.png"))
  p.add_argument("--no_plot", action="store_true")
  args = p.parse_args(argv)
  if args.stream_chunk < 0:
    p.error(f"--stream_chunk must be >= 0; got {args.stream_chunk}")
  return args


def device_name() -> str:
  device = jax.devices()[0]
  if device.platform == "cpu":
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
  return f"{device.platform} ({device.device_kind})"


def time_forwards(model, *, prefix: int, cache_len: int, batch: int, repeats: int = 64) -> dict:
  """Milliseconds per forward of 1, 8 and 32 tokens against a cache of ``prefix`` tokens."""
  from flax import nnx

  from fdllm_jax import masks
  from fdllm_jax.cache import KVCache

  graphdef, state = nnx.split(model)
  out = {}
  for num_tokens, mask in ((1, masks.Causal()), (8, masks.Full()), (32, masks.Full())):

    @jax.jit
    def loop(state, cache, tokens):
      m = nnx.merge(graphdef, state)

      def body(_, carry):
        cache, acc = carry
        hidden, cache = m(tokens + acc[:, None], mask=mask, cache=cache, write_start=prefix,
                          kv_lengths=jnp.full((batch,), prefix + num_tokens, jnp.int32),
                          return_hidden=True)
        logits = m.logits(hidden[:, -min(num_tokens, 8):])  # the decoder needs <= 8 logits
        return cache, (jnp.argmax(logits[:, -1], -1) * 0).astype(jnp.int32)

      return jax.lax.fori_loop(0, repeats, body, (cache, jnp.zeros((batch,), jnp.int32)))

    cache = KVCache.init(model.config, batch, cache_len, model.dtype)
    tokens = jnp.ones((batch, num_tokens), jnp.int32)
    jax.block_until_ready(loop(state, cache, tokens))
    best = float("inf")
    for _ in range(5):
      start = time.perf_counter()
      jax.block_until_ready(loop(state, cache, tokens))
      best = min(best, time.perf_counter() - start)
    out[num_tokens] = 1e3 * best / repeats
  return {"batch_size": batch, "prefix": prefix, "cache_len": cache_len,
          "ms_ar_step_1_token": out[1], "ms_sub_block_8_tokens": out[8],
          "ms_window_32_tokens": out[32], "window_over_ar_step": out[32] / out[1],
          "sub_block_over_ar_step": out[8] / out[1]}


def main(argv=None) -> dict:
  args = parse_args(argv)
  from fdllm_jax import load_model, load_tokenizer
  from fdllm_jax.demo import task
  from fdllm_jax.generate import DecodeConfig, generate, generate_ar

  batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
  thresholds = [float(t) for t in args.thresholds.split(",")]
  ar_model = load_model(args.ar, dtype=args.dtype)
  adapted = load_model(args.adapted, dtype=args.dtype)
  tokenizer = load_tokenizer(args.adapted)
  stop_id = tokenizer.hf.convert_tokens_to_ids("<|im_end|>")
  block = adapted.config.bd_size or 32
  problems, prompts = task.held_out_prompts(tokenizer, args.num_problems, args.seed)

  def ar_method(batch, rows=None):
    return generate_ar(ar_model, batch, max_new_tokens=args.max_new_tokens, stop_ids=(stop_id,),
                       max_batch_size=rows)

  def diffusion_method(threshold, dual):
    config = DecodeConfig(block_size=block, sub_block_size=args.sub_block_size,
                          threshold=threshold, max_new_tokens=args.max_new_tokens,
                          mask_id=tokenizer.mask_id, stop_ids=(stop_id,), use_dual_cache=dual)
    return lambda batch, rows=None: generate(adapted, batch, config, max_batch_size=rows)

  methods = [("ar_base", None, None, ar_method)]
  for threshold in thresholds:
    for dual in (False, True):
      methods.append(("fast_dllm", threshold, dual, diffusion_method(threshold, dual)))

  report = {"device": device_name(), "jax": jax.__version__, "dtype": args.dtype,
            "ar_model": os.path.relpath(args.ar), "adapted_model": os.path.relpath(args.adapted),
            "num_problems": len(problems), "split": "test", "seed": args.seed,
            "max_new_tokens": args.max_new_tokens, "block_size": block,
            "sub_block_size": args.sub_block_size, "stream_chunk": args.stream_chunk,
            "params": adapted.config.num_params, "results": [], "forward_cost": []}
  for batch_size in batch_sizes:
    chunk_size = args.stream_chunk or batch_size
    rows = batch_size if args.stream_chunk else None  # None: each chunk is one batch
    chunks = [list(range(i, min(i + chunk_size, len(prompts))))
              for i in range(0, len(prompts), chunk_size)]
    totals = {m[:3]: {"tokens": 0, "seconds": 0.0, "forwards": 0, "row_forwards": 0,
                      "correct": 0, "finished": 0, "compile_seconds": 0.0} for m in methods}
    for _, _, _, run in methods:  # compile the shapes of the first chunk outside the timing
      run([prompts[i] for i in chunks[0]], rows)
    for chunk in chunks:
      batch = [prompts[i] for i in chunk]
      for name, threshold, dual, run in methods:
        out = run(batch, rows)
        t = totals[(name, threshold, dual)]
        t["tokens"] += out.num_tokens
        t["seconds"] += out.seconds
        t["compile_seconds"] += out.compile_seconds
        t["forwards"] += out.num_forwards
        t["row_forwards"] += sum(max(s) if s else 0 for s in out.step_of_token)
        t["finished"] += sum(out.finished)
        t["correct"] += sum(task.is_correct(tokenizer.decode(ids), problems[i].answer)
                            for ids, i in zip(out.tokens, chunk))
    ar = totals[("ar_base", None, None)]
    ar_tps = ar["tokens"] / ar["seconds"]
    for name, threshold, dual, _ in methods:
      t = totals[(name, threshold, dual)]
      row = {"batch_size": batch_size, "streamed": bool(args.stream_chunk), "model": name,
             "engine": "generate_ar" if name == "ar_base" else "generate",
             "threshold": threshold, "dual_cache": dual,
             "accuracy": t["correct"] / len(problems), "tokens": t["tokens"],
             "seconds": t["seconds"], "tokens_per_s": t["tokens"] / t["seconds"],
             "speedup_vs_ar": t["tokens"] / t["seconds"] / ar_tps,
             "forwards": t["forwards"], "tokens_per_forward": t["tokens"] / t["forwards"],
             "tokens_per_row_forward": t["tokens"] / max(t["row_forwards"], 1),
             "ms_per_forward": 1e3 * t["seconds"] / t["forwards"],
             "finished": t["finished"] / len(problems),
             "compile_seconds_after_warmup": t["compile_seconds"]}
      report["results"].append(row)
      print(json.dumps(row), flush=True)
    mean_len = int(np.mean([len(p) for p in prompts]))
    prefix = (mean_len // block + 1) * block
    cost = time_forwards(adapted, prefix=prefix, cache_len=prefix + 4 * block, batch=batch_size)
    report["forward_cost"].append(cost)
    print(json.dumps({"forward_cost": cost}), flush=True)

  report["summary"] = summarize(report)
  print(json.dumps({"summary": report["summary"]}), flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(report, f, indent=2)
  if not args.no_plot:
    plot(report, args.plot)
  return report


def summarize(report: dict) -> dict:
  """The issue's checks at threshold 1.0 and 0.9, and why wall clock lags tokens per forward."""
  summary = {}
  for cost in report["forward_cost"]:
    bs = cost["batch_size"]
    rows = [r for r in report["results"] if r["batch_size"] == bs]
    ar = next(r for r in rows if r["model"] == "ar_base")
    pick = lambda thr, dual: next(r for r in rows if r["threshold"] == thr and
                                  r["dual_cache"] == dual)
    entry = {"ar_accuracy": ar["accuracy"], "ar_tokens_per_s": ar["tokens_per_s"],
             "ar_ms_per_token_step": ar["ms_per_forward"]}
    for thr in (1.0, 0.9):
      for dual in (False, True):
        if not any(r["threshold"] == thr and r["dual_cache"] == dual for r in rows):
          continue
        r = pick(thr, dual)
        key = f"threshold_{thr}_{'dual_cache' if dual else 'no_cache'}"
        entry[key] = {
            "accuracy": r["accuracy"], "accuracy_minus_ar": r["accuracy"] - ar["accuracy"],
            "tokens_per_row_forward": r["tokens_per_row_forward"],
            "speedup_vs_ar": r["speedup_vs_ar"],
            "ms_per_forward": r["ms_per_forward"],
            "forward_cost_over_ar_step": r["ms_per_forward"] / ar["ms_per_forward"],
            # wall-clock speedup = tokens per forward / (cost of a forward in AR steps)
            "speedup_if_forward_cost_equal_ar_step": r["tokens_per_row_forward"]}
    entry["forward_cost"] = cost
    summary[f"batch_size_{bs}"] = entry
  return summary


# A label (two lines of 7-point type, 5 points from its point) in points: width, height, offset.
LABEL_SIZE_PT = (34, 18)
LABEL_OFFSET_PT = 5
MARKER_PX = 4  # half a marker, in display units
# Where a label may sit, (x, y) signs from its point, preferred first: the block-cache series
# above right, DualCache below left (the two often lie close together), then the mirror sides.
LABEL_SIDES = {False: ((1, 1), (-1, 1)), True: ((-1, -1), (1, -1))}


def _overlap(a, b) -> bool:
  return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_labels(candidates, priorities, bounds, obstacles=()) -> dict[int, int]:
  """{label: chosen candidate} for the labels that fit, best priority first.

  ``candidates[i]``: label i's possible boxes (x0, y0, x1, y1) in display units, preferred
  first; ``priorities``: lower is placed first; ``bounds``: the box labels must stay inside;
  ``obstacles``: boxes no label may cover (the markers). A label takes its first candidate
  inside ``bounds`` that overlaps no obstacle and no label already placed, or is left out.
  Close points are common here: thresholds 0.95 to 0.8 can decode at nearly the same accuracy
  and speed, and their stacked labels are unreadable (the JSON has every value).
  """
  placed: dict[int, int] = {}
  taken = list(obstacles)  # the obstacles, then every label placed so far
  for i in sorted(range(len(candidates)), key=lambda i: priorities[i]):
    for k, box in enumerate(candidates[i]):
      inside = (bounds[0] <= box[0] and box[2] <= bounds[2] and bounds[1] <= box[1]
                and box[3] <= bounds[3])
      if inside and not any(_overlap(box, other) for other in taken):
        placed[i] = k
        taken.append(box)
        break
  return placed


def _label_box(anchor_px, side, px_per_pt: float):
  """The label's box on ``side`` (x, y signs) of its point, in display units."""
  (x, y), (w, h) = anchor_px, LABEL_SIZE_PT
  near = LABEL_OFFSET_PT * px_per_pt
  far_x, far_y = (LABEL_OFFSET_PT + w) * px_per_pt, (LABEL_OFFSET_PT + h) * px_per_pt
  x0, x1 = (x + near, x + far_x) if side[0] > 0 else (x - far_x, x - near)
  y0, y1 = (y + near, y + far_y) if side[1] > 0 else (y - far_y, y - near)
  return x0, y0, x1, y1


def _label_priority(threshold: float, dual: bool, thresholds: list[float]) -> tuple:
  """The headline thresholds (0.9, then 1.0) first, then the lowest, then the rest from high
  to low; the block-cache series before DualCache."""
  headline = (0.9, 1.0)
  rank = (headline.index(threshold) if threshold in headline
          else 2 if threshold == min(thresholds) else 3)
  return rank, -threshold, dual


def _annotate_apart(ax, labelled, px_per_pt: float) -> None:
  """Labels (threshold, tokens per forward) of the points that ``place_labels`` finds room for."""
  ax.autoscale_view()  # final limits: data -> pixel positions below are the drawn ones
  anchors = ax.transData.transform(
      [(r["tokens_per_s"], 100 * r["accuracy"]) for r, _, _ in labelled]).tolist()
  candidates = [[_label_box(a, side, px_per_pt) for side in LABEL_SIDES[dual]]
                for a, (_, _, dual) in zip(anchors, labelled)]
  thresholds = [r["threshold"] for r, _, _ in labelled]
  priorities = [_label_priority(r["threshold"], dual, thresholds) for r, _, dual in labelled]
  markers = [(x - MARKER_PX, y - MARKER_PX, x + MARKER_PX, y + MARKER_PX) for x, y in anchors]
  for i, k in place_labels(candidates, priorities, ax.bbox.extents, markers).items():
    r, color, dual = labelled[i]
    sx, sy = LABEL_SIDES[dual][k]
    ax.annotate(f"{r['threshold']:g}\n{r['tokens_per_row_forward']:.1f} tpf",
                (r["tokens_per_s"], 100 * r["accuracy"]), textcoords="offset points",
                xytext=(sx * LABEL_OFFSET_PT, sy * LABEL_OFFSET_PT),
                ha="left" if sx > 0 else "right", va="bottom" if sy > 0 else "top",
                fontsize=7, color=color)


def plot(report: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  batch_sizes = sorted({r["batch_size"] for r in report["results"]})
  fig, axes = plt.subplots(1, len(batch_sizes), figsize=(6.2 * len(batch_sizes), 4.6),
                           squeeze=False)
  labelled_per_ax = []  # per panel: (row, colour, dual) of every diffusion point
  for ax, bs in zip(axes[0], batch_sizes):
    rows = [r for r in report["results"] if r["batch_size"] == bs]
    ar = next(r for r in rows if r["model"] == "ar_base")
    ax.scatter([ar["tokens_per_s"]], [100 * ar["accuracy"]], marker="*", s=260, color="black",
               zorder=3, label="AR base (generate_ar)")
    labelled = []
    for dual, color, marker in ((False, "tab:blue", "o"), (True, "tab:orange", "s")):
      series = sorted((r for r in rows if r["model"] == "fast_dllm" and r["dual_cache"] == dual),
                      key=lambda r: -r["threshold"])
      if not series:
        continue
      ax.plot([r["tokens_per_s"] for r in series], [100 * r["accuracy"] for r in series],
              marker=marker, color=color,
              label=f"Fast-dLLM v2 {'+ DualCache' if dual else '(block cache)'}")
      labelled += [(r, color, dual) for r in series]
    labelled_per_ax.append(labelled)
    ax.set_xlabel("generated tokens / s (wall clock)")
    ax.set_ylabel("accuracy on held-out problems (%)")
    ax.set_title(f"batch size {bs}")
    ax.grid(alpha=0.3)
    accuracies = [100 * r["accuracy"] for r in rows]
    # the measured range, with room for the labels below the lowest and above the highest point
    ax.set_ylim(max(-4.0, min(accuracies) - 10), min(106.0, max(accuracies) + 8))
    ax.legend(fontsize=8, loc="best")  # the points move with the machine: let matplotlib choose
  fig.suptitle(f"Demo model ({report['params'] / 1e6:.1f}M params), {report['num_problems']} "
               f"problems, {report['device']}; labels: threshold, tokens per forward "
               f"(overlapping labels left out; every point in the JSON)", fontsize=9)
  fig.tight_layout()  # before the labels: their places are computed in the final pixels
  for ax, labelled in zip(axes[0], labelled_per_ax):
    _annotate_apart(ax, labelled, fig.dpi / 72)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
