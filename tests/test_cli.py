"""The command-line tools' shared pieces: error reports and gin parsing."""

import types

import gin
import pytest

from fdllm_jax import cli


def _args(traceback=False):
  return types.SimpleNamespace(traceback=traceback)


def _fails_with(error):
  def run(args):
    raise error
  return run


@pytest.mark.parametrize("error", [ValueError("bad value 3"), FileNotFoundError("no file x"),
                                   KeyError("key k"), OSError("disk")])
def test_user_errors_print_one_line_and_return_2(error, capsys):
  assert cli.run_reporting_errors(_fails_with(error), _args()) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and str(error) in err and "Traceback" not in err
  with pytest.raises(type(error)):
    cli.run_reporting_errors(_fails_with(error), _args(traceback=True))


def test_success_and_program_errors_pass_through(capsys):
  assert cli.run_reporting_errors(lambda args: 0, _args()) == 0
  with pytest.raises(ZeroDivisionError):  # a bug, not a user error: keep the traceback
    cli.run_reporting_errors(_fails_with(ZeroDivisionError()), _args())
  assert capsys.readouterr().err == ""


@gin.configurable
def _configurable(value=1):
  return value


def test_parse_gin_binds_and_names_mistakes(tmp_path):
  gin_file = tmp_path / "ok.gin"
  gin_file.write_text("_configurable.value = 2\n")
  try:
    cli.parse_gin([str(gin_file)], ["_configurable.value = 3"])
    assert _configurable() == 3  # bindings after files
    gin.clear_config()  # parsing finalizes (locks) the config
    with pytest.raises(FileNotFoundError, match="gin file '/nonexistent.gin' does not exist"):
      cli.parse_gin(["/nonexistent.gin"], [])
    with pytest.raises(ValueError, match="bad gin configuration: .*no_such_thing"):
      cli.parse_gin([], ["no_such_thing.value = 1"])
  finally:
    gin.clear_config()
