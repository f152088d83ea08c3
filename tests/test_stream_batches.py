"""benchmarks/stream_batches.py: fixed batches against streamed rows on the bundled model."""

import pytest

from tests import benchmark_modules

stream = benchmark_modules.load("stream_batches")


@pytest.mark.parametrize("engine", ["dllm", "ar"])
def test_bundled_model_streams_with_fewer_forwards(capsys, engine):
  report = stream.main(["--engine", engine, "--num_problems", "12", "--batch_size", "4",
                        "--rounds", "1"])
  (row,) = report["rounds"]
  assert row["engine"] == engine and (row["threshold"] is None) == (engine == "ar")
  assert row["num_problems"] == 12 and row["tokens"] > 12 and row["differing_prompts"] == 0
  # 3 fixed batches, 3 device calls; streamed: fewer forwards, a round trip per ended row
  assert row["fixed_host_syncs"] == 3
  assert row["streamed_forwards"] < row["fixed_forwards"]
  assert row["streamed_host_syncs"] > 1
  assert report["summary"]["forwards_ratio"] > 1
  assert 0 <= report["summary"]["accuracy"] <= 1
  assert '"summary"' in capsys.readouterr().out


def test_bad_sizes_are_rejected():
  with pytest.raises(SystemExit):
    stream.parse_args(["--batch_size", "0"])
  with pytest.raises(SystemExit):
    stream.parse_args(["--engine", "ar", "--dual_cache"])
