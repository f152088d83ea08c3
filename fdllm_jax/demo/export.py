"""Copies the two trained stages into ``models/demo/`` as self-contained HF checkpoints.

    python -m fdllm_jax.demo.export --ar workdirs/demo/ar/export \\
        --adapted workdirs/demo/adapt/export --out models/demo

Each directory gets ``config.json``, ``model.safetensors`` and the tokenizer files. The adapted
model's ``config.json`` (``model_type: Fast_dLLM_Qwen``, ``bd_size``) also gets:

- ``auto_map`` naming the reference's PyTorch code in the hub repository of the released
  1.5B model (transformers' ``repo--module.Class`` form), so that
  ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` runs the reference's
  ``Fast_dLLM_QwenForCausalLM`` on our weights (hub access needed; nothing of that code is
  copied here);
- ``mask_token_id``: the MASK id of our small vocabulary, to pass as ``mask_id`` to the
  reference's ``generate`` (its default is Qwen2.5's 151665).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Sequence

from fdllm_jax.config import REFERENCE_AUTO_MAP

FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "chat_template.jinja")
MAX_TOTAL_BYTES = 20 * 1024 * 1024


def _check_stage(source: str, model_type: str, needs_bd_size: bool) -> None:
  """A finished stage's export: its files, and the model type the bundle expects there."""
  for name in ("config.json", "model.safetensors", "tokenizer.json"):
    if not os.path.isfile(os.path.join(source, name)):
      raise FileNotFoundError(f"{source}: no {name}; is it a finished stage's export directory?")
  with open(os.path.join(source, "config.json")) as f:
    config = json.load(f)
  if config.get("model_type") != model_type or (needs_bd_size and not config.get("bd_size")):
    raise ValueError(f"{source}: expected a {model_type} model"
                     f"{' with bd_size' if needs_bd_size else ''}; got model_type="
                     f"{config.get('model_type')!r}, bd_size={config.get('bd_size')!r}")


def _check_apart(source: str, target: str) -> None:
  """Replacing ``target`` must not delete ``source`` (the same directory, or one inside the
  other)."""
  real_source, real_target = os.path.realpath(source), os.path.realpath(target)
  if os.path.commonpath([real_source, real_target]) in (real_source, real_target):
    raise ValueError(f"{source} would be overwritten by the export to {target}: export to "
                     f"another --out, or copy the stage elsewhere first")


def _copy_checkpoint(source: str, target: str) -> None:
  if os.path.isdir(target):
    shutil.rmtree(target)
  os.makedirs(target)
  for name in FILES:
    if os.path.isfile(os.path.join(source, name)):
      shutil.copy2(os.path.join(source, name), os.path.join(target, name))


def _edit_config(directory: str, edit) -> dict:
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    config = json.load(f)
  edit(config)
  with open(path, "w") as f:
    json.dump(config, f, indent=2)
  return config


def export(ar_dir: str, adapted_dir: str, out_dir: str,
           max_bytes: int = MAX_TOTAL_BYTES) -> dict[str, str]:
  """Copies both stages to ``out_dir/ar_base`` and ``out_dir/fast_dllm``; returns the paths."""
  from fdllm_jax import load_tokenizer

  if not max_bytes > 0:
    raise ValueError(f"the size limit must be a positive number of bytes; got {max_bytes!r}")
  ar_out, adapted_out = os.path.join(out_dir, "ar_base"), os.path.join(out_dir, "fast_dllm")
  # Everything is checked before the first directory is replaced.
  _check_stage(ar_dir, "qwen2", needs_bd_size=False)
  _check_stage(adapted_dir, "Fast_dLLM_Qwen", needs_bd_size=True)
  for source in (ar_dir, adapted_dir):
    for target in (ar_out, adapted_out):
      _check_apart(source, target)
  _copy_checkpoint(ar_dir, ar_out)
  _copy_checkpoint(adapted_dir, adapted_out)
  tokenizer = load_tokenizer(adapted_out)

  def adapted_edit(config):
    config["auto_map"] = dict(REFERENCE_AUTO_MAP)
    config["mask_token_id"] = tokenizer.mask_id

  _edit_config(adapted_out, adapted_edit)
  total = sum(os.path.getsize(os.path.join(d, n)) for d in (ar_out, adapted_out)
              for n in os.listdir(d))
  if total > max_bytes:
    raise ValueError(f"the two checkpoints take {total / 2**20:.1f} MiB; the bundle must stay "
                     f"under {max_bytes / 2**20:.0f} MiB")
  return {"ar_base": ar_out, "fast_dllm": adapted_out, "total_mib": f"{total / 2**20:.2f}"}


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description="Copies the demo's trained stages to models/demo.")
  parser.add_argument("--ar", required=True, help="stage 1 export directory")
  parser.add_argument("--adapted", required=True, help="stage 2 export directory")
  parser.add_argument("--out", default="models/demo")
  parser.add_argument("--max_mib", type=float, default=MAX_TOTAL_BYTES / 2**20,
                      help="size limit of the two checkpoints together (the bundle's: 20; "
                      "larger for scale tests that are not bundled)")
  args = parser.parse_args(argv)
  if not 0 < args.max_mib < float("inf"):
    parser.error(f"--max_mib must be a positive number; got {args.max_mib}")
  try:
    result = export(args.ar, args.adapted, args.out, max_bytes=int(args.max_mib * 2**20))
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
