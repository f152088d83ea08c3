"""The confined child process that runs model-written code (fdllm_jax.eval.sandbox)."""

import os
import socket
import threading

import pytest

from fdllm_jax.eval import sandbox

TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def os_isolation_available():
  """Whether this machine grants the namespace layers (root with CAP_SYS_ADMIN)."""
  info = sandbox.run_python("pass", timeout_s=TIMEOUT_S).isolation
  return info.get("filesystem", "").startswith("read-only") and info.get("pid_namespace", False)


@pytest.fixture
def listener():
  """A TCP server on 127.0.0.1 that records whether anyone connected."""
  server = socket.socket()
  server.bind(("127.0.0.1", 0))
  server.listen(4)
  server.settimeout(0.2)
  connected, stop = [], threading.Event()

  def accept():
    while not stop.is_set():
      try:
        conn, _ = server.accept()
        connected.append(True)
        conn.close()
      except OSError:
        pass

  thread = threading.Thread(target=accept, daemon=True)
  thread.start()
  yield server.getsockname()[1], connected
  stop.set()
  thread.join(2)
  server.close()


def test_passing_and_failing_programs():
  ok = sandbox.run_python("import math, hashlib, typing\nassert math.gcd(4, 6) == 2\n",
                          timeout_s=TIMEOUT_S)
  assert ok.passed and ok.status == "passed", ok
  bad = sandbox.run_python("assert 1 == 2, 'wrong'", timeout_s=TIMEOUT_S)
  assert bad.status == "failed" and bad.detail == "AssertionError: wrong"
  syntax = sandbox.run_python("def f(:\n", timeout_s=TIMEOUT_S)
  assert syntax.status == "failed" and syntax.detail.startswith("SyntaxError")


@pytest.mark.parametrize("os_isolation", [True, False])
def test_infinite_loops_are_stopped(os_isolation):
  blocked = ("import signal\n"  # SIGALRM and SIGXCPU held back: the CPU limit's SIGKILL ends it
             "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGXCPU})\n"
             "while True:\n  pass\n")
  for source in ("while True:\n  pass\n", "import time\ntime.sleep(1000)\n", blocked):
    result = sandbox.run_python(source, timeout_s=1.0, os_isolation=os_isolation)
    assert result.status == "timeout", result
    assert result.seconds < 1.0 + sandbox.START_GRACE_S + 1.0


@pytest.mark.parametrize("os_isolation", [True, False])
def test_ten_gib_allocation_is_refused(os_isolation):
  result = sandbox.run_python("x = bytearray(10 * 2**30)\n", timeout_s=TIMEOUT_S,
                              memory_mb=1024, os_isolation=os_isolation)
  assert result.status == "failed" and result.detail.startswith("MemoryError"), result


@pytest.mark.parametrize("os_isolation", [True, False])
def test_write_outside_working_directory_is_refused(tmp_path, os_isolation):
  target = tmp_path / "escaped.txt"
  for source in (f"open({str(target)!r}, 'w').write('x')\n",
                 f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\n",
                 f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')\n",
                 f"import shutil\nshutil.copy(__import__('os').devnull, {str(target)!r})\n"):
    result = sandbox.run_python(source, timeout_s=TIMEOUT_S, os_isolation=os_isolation)
    assert result.status == "failed", (source, result)
    assert "PermissionError" in result.detail or "Read-only" in result.detail, result
    assert not target.exists()


def test_writes_inside_working_directory_work():
  source = ("import os, tempfile, shutil\n"
            "open('a.txt', 'w').write('ok')\n"
            "os.makedirs('d/e')\n"
            "shutil.move('a.txt', 'd/e/b.txt')\n"
            "assert open('d/e/b.txt').read() == 'ok'\n"
            "with tempfile.TemporaryFile() as f:\n  f.write(b'x')\n"
            "shutil.rmtree('d')\n")
  result = sandbox.run_python(source, timeout_s=TIMEOUT_S)
  assert result.passed, result


@pytest.mark.parametrize("os_isolation", [True, False])
def test_socket_connection_is_refused(listener, os_isolation):
  port, connected = listener
  source = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
  result = sandbox.run_python(source, timeout_s=TIMEOUT_S, os_isolation=os_isolation)
  assert result.status == "failed", result
  source = f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\n"
  assert sandbox.run_python(source, timeout_s=TIMEOUT_S, os_isolation=os_isolation).status == \
      "failed"
  assert not connected


_RAW_WRITE = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.open({path!r}.encode(), 0o101, 0o644)   # O_WRONLY | O_CREAT, around the Python guard
assert fd < 0, "the kernel let a write outside the working directory through"
"""

_RAW_CONNECT = """
import ctypes, struct
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.socket(2, 1, 0)  # AF_INET, SOCK_STREAM, around the Python guard
addr = struct.pack("!HH4s8x", 2, {port}, bytes([127, 0, 0, 1]))
addr = struct.pack("=H", 2) + addr[2:]  # sa_family is host order
rc = libc.connect(fd, ctypes.c_char_p(addr), len(addr)) if fd >= 0 else -1
assert rc != 0, "the kernel let a connection through"
"""


def test_kernel_layers_hold_without_the_python_guards(tmp_path, listener, os_isolation_available):
  if not os_isolation_available:
    pytest.skip("namespaces are not available here (needs root / CAP_SYS_ADMIN)")
  port, connected = listener
  target = tmp_path / "raw.txt"
  result = sandbox.run_python(_RAW_WRITE.format(path=str(target)), timeout_s=TIMEOUT_S)
  assert result.passed, result
  assert not target.exists()
  result = sandbox.run_python(_RAW_CONNECT.format(port=port), timeout_s=TIMEOUT_S)
  assert result.passed, result
  assert not connected
  # other processes are invisible: the program is PID 2 of its own namespace
  assert sandbox.run_python("import os\nassert os.getpid() == 2\n", timeout_s=TIMEOUT_S).passed


def test_early_exit_cannot_fake_a_pass():
  for source in ("import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n", "raise SystemExit\n"):
    assert not sandbox.run_python(source, timeout_s=TIMEOUT_S).passed, source


def test_processes_and_output_floods_are_contained():
  fork = sandbox.run_python("import subprocess\nsubprocess.run(['true'])\n", timeout_s=TIMEOUT_S)
  assert fork.status == "failed" and "PermissionError" in fork.detail
  flood = sandbox.run_python("while True:\n  print('x' * 4096)\n", timeout_s=TIMEOUT_S,
                             file_size_mb=1)
  assert flood.status in ("failed", "timeout") and len(flood.output) <= 4096


def test_isolation_is_reported(os_isolation_available):
  info = sandbox.run_python("pass", timeout_s=TIMEOUT_S).isolation
  assert info["python_guards"] is True
  assert info["limits"]["memory_bytes"] == 2048 << 20
  if os_isolation_available:
    assert info["network"] == "network namespace without interfaces"
    assert info["capabilities"] == "dropped"
  guards_only = sandbox.run_python("pass", timeout_s=TIMEOUT_S, os_isolation=False).isolation
  assert guards_only["network"] == "python socket guard" and "filesystem" not in guards_only


def test_bad_arguments():
  with pytest.raises(ValueError, match="timeout_s"):
    sandbox.run_python("pass", timeout_s=0)
  with pytest.raises(ValueError, match="memory_mb"):
    sandbox.run_python("pass", memory_mb=1)


def test_scratch_directory_is_removed():
  before = {p for p in os.listdir("/tmp") if p.startswith("fdllm_sandbox_")}
  sandbox.run_python("open('x', 'w').write('y')\n", timeout_s=TIMEOUT_S)
  after = {p for p in os.listdir("/tmp") if p.startswith("fdllm_sandbox_")}
  assert after <= before
