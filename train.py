"""Fine-tunes (or pretrains) a model with a gin config: the training CLI.

    python train.py --gin_file configs/X.gin [--gin_file more.gin] \\
        [--gin_param 'TrainConfig.num_steps = 50' ...] --workdir DIR \\
        [--coordinator_address HOST:PORT --num_processes N --process_id I | --distributed_auto]

Writes ``DIR/metrics.jsonl``, ``DIR/checkpoints/<step>/`` and, at the end, ``DIR/export/``
(the final model in HF layout plus its tokenizer). Running the same command again resumes
from the newest complete checkpoint in ``DIR``. Relative paths in gin files are relative to the
current directory (run from the repository root for the shipped configs). Multi-host: start one
process per host with the same flags and its own ``--process_id`` (or ``--distributed_auto``
under SLURM / TPU / Kubernetes, where JAX finds the cluster itself).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def parse_args(argv):
  parser = argparse.ArgumentParser(description="Fast-dLLM v2 training (gin-configured).")
  parser.add_argument("--gin_file", action="append", default=[], required=True,
                      help="gin config file; may be repeated (later files override)")
  parser.add_argument("--gin_param", action="append", default=[],
                      help="one gin binding, e.g. 'TrainConfig.num_steps = 10'; may be repeated")
  parser.add_argument("--workdir", required=True, help="checkpoints, metrics and export go here")
  parser.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0")
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  parser.add_argument("--distributed_auto", action="store_true",
                      help="let jax.distributed.initialize() detect the cluster")
  parser.add_argument("--traceback", action="store_true", help="show tracebacks of errors")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("fdllm_jax").setLevel(logging.INFO)
  try:
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
  except ImportError:
    pass
  from fdllm_jax import cli

  return cli.run_reporting_errors(_run, args)


def _run(args) -> int:
  from fdllm_jax import sharding

  # Before any other JAX call: multi-host start-up.
  sharding.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id,
                                  auto=args.distributed_auto)
  import jax

  from fdllm_jax import cli
  from fdllm_jax.training import trainer as trainer_lib

  cli.parse_gin(args.gin_file, args.gin_param)
  config = trainer_lib.TrainConfig()
  if jax.process_index() == 0:
    print(f"devices: {jax.device_count()} ({jax.devices()[0].platform}) over "
          f"{jax.process_count()} process(es); mesh (data, fsdp, tensor) = "
          f"{config.mesh_shape}; workdir {os.path.abspath(args.workdir)}", flush=True)
  trainer = trainer_lib.Trainer(config, args.workdir)
  try:
    history = trainer.run()
  finally:
    trainer.close()
  if jax.process_index() == 0 and history:
    last = history[-1]
    print(f"done: step {last['step']} loss {last['loss']:.4f}"
          + (f"; exported to {trainer.export_dir}" if config.export else ""), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
