"""Run untrusted Python (model-written code plus its unit tests) in a confined child process.

``run_python(source, timeout_s=..., memory_mb=...)`` starts a fresh interpreter
(``python -I fdllm_jax/eval/_sandbox_child.py``) in a new session, with a throwaway working
directory, and returns a ``SandboxResult``; it never raises for anything the program does.

What the child does (and what it reports back in ``SandboxResult.isolation``):

* **time**: a timer of ``timeout_s`` in the child (SIGALRM), an RLIMIT_CPU of the same, and a
  wall-clock deadline in the parent (``timeout_s`` + a start-up grace) after which the whole
  process group is killed (a program that blocks SIGALRM and SIGXCPU meets the CPU limit's
  SIGKILL: also reported as 'timeout');
* **memory**: RLIMIT_AS = ``memory_mb`` (a 10 GiB allocation raises MemoryError);
* **files**: the working directory is a fresh temporary directory; RLIMIT_FSIZE caps any file
  (output included). As root, the child enters a private mount namespace in which every mount
  is read-only except the working directory, so writes elsewhere fail with EROFS at the
  kernel level, and then drops all capabilities;
* **network**: as root, a fresh network namespace with no interface up (connections fail with
  ENETUNREACH); otherwise (and in addition) ``socket`` is replaced by a refusing stub;
* **processes**: as root, a PID namespace (no other process is visible or signalable);
  ``os.fork``/``subprocess``/``os.kill`` and friends raise PermissionError at the Python level.

This is not a security boundary in the way a VM or gVisor is. Without root the OS layers are
skipped (``isolation['os_isolation_errors']`` / ``'skipped'`` say so) and only rlimits plus
Python-level guards remain, which deliberate code can bypass (ctypes, C extensions). It is meant
for benchmark code written by a model, which fails by accident, not by design.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time

CHILD_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")
START_GRACE_S = 3.0  # interpreter start + confinement, on a loaded machine
_OUTPUT_TAIL = 2000


@dataclasses.dataclass(frozen=True)
class SandboxResult:
  """Outcome of one program.

  status: 'passed' (ran to the end), 'failed' (raised; ``detail`` is ``Type: message``),
  'timeout' (time limit), or 'crashed' (died otherwise: signal, memory, start-up failure).
  """

  status: str
  detail: str
  seconds: float
  isolation: dict
  output: str

  @property
  def passed(self) -> bool:
    return self.status == "passed"


def run_python(source: str, *, timeout_s: float = 10.0, memory_mb: int = 2048,
               file_size_mb: int = 16, os_isolation: bool = True) -> SandboxResult:
  """Runs ``source`` as a program in a confined child process (see the module docstring).

  Args:
    source: Python source; it passes when it runs to the end without raising (SystemExit
      counts as a failure, so an early ``exit(0)`` cannot fake a pass).
    timeout_s: time limit of the program, seconds.
    memory_mb: address-space limit of the child, MiB.
    file_size_mb: largest file (and stdout/stderr log) the child may write, MiB.
    os_isolation: try the Linux namespace layers (needs root); False keeps rlimits and Python
      guards only.
  """
  if not timeout_s > 0:
    raise ValueError(f"timeout_s must be > 0; got {timeout_s!r}")
  if not memory_mb >= 64:
    raise ValueError(f"memory_mb must be >= 64 (the interpreter needs ~30 MiB); got {memory_mb!r}")
  nonce = secrets.token_hex(16)
  with tempfile.TemporaryDirectory(prefix="fdllm_sandbox_") as scratch:
    workdir = os.path.join(scratch, "work")
    os.mkdir(workdir, 0o700)
    ctl_path, log_path = os.path.join(scratch, "ctl"), os.path.join(scratch, "log")
    spec = {"workdir": workdir, "source": source, "nonce": nonce, "timeout_s": float(timeout_s),
            "cpu_seconds": int(timeout_s) + 1, "memory_bytes": int(memory_mb) << 20,
            "file_size_bytes": int(file_size_mb) << 20, "os_isolation": bool(os_isolation)}
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir,
           "OMP_NUM_THREADS": "1"}
    ctl_fd = os.open(ctl_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    start = time.perf_counter()
    timed_out = False
    try:
      with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-I", CHILD_SCRIPT, str(ctl_fd)],
                                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                pass_fds=(ctl_fd,), cwd=workdir, env=env,
                                start_new_session=True)
    finally:
      os.close(ctl_fd)
    try:
      proc.communicate(json.dumps(spec).encode(), timeout=timeout_s + START_GRACE_S)
    except subprocess.TimeoutExpired:
      timed_out = True
    finally:
      _kill_group(proc.pid)  # stragglers too: anything left in the child's session
      proc.wait()
    seconds = time.perf_counter() - start
    events = _read_events(ctl_path)
    with open(log_path, "rb") as f:
      f.seek(max(0, os.path.getsize(log_path) - _OUTPUT_TAIL))
      output = f.read().decode("utf-8", "replace")
  timed_out = timed_out or (_signal_of(proc.returncode) == signal.SIGKILL
                           and seconds >= timeout_s)  # RLIMIT_CPU's hard limit: signals blocked
  return _outcome(events, nonce, proc.returncode, timed_out, seconds, output)


def _kill_group(pgid: int) -> None:
  try:
    os.killpg(pgid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


def _read_events(path: str) -> list[dict]:
  events = []
  with open(path, "rb") as f:
    for line in f.read(1 << 20).decode("utf-8", "replace").splitlines():
      try:
        event = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(event, dict):
        events.append(event)
  return events


def _signal_of(returncode: int | None) -> int | None:
  """The signal that ended the child: negative codes from Popen, 128+N from the PID-1 waiter."""
  if returncode is None:
    return None
  if returncode < 0:
    return -returncode
  if returncode > 128:
    return returncode - 128
  return None


def _outcome(events, nonce, returncode, timed_out, seconds, output) -> SandboxResult:
  isolation = next((e.get("isolation", {}) for e in events if e.get("event") == "ready"), {})
  passed = any(e.get("event") == "passed" and e.get("nonce") == nonce for e in events)
  error = next((e for e in events if e.get("event") == "error"), None)
  sig = _signal_of(returncode)
  if timed_out or sig in (signal.SIGALRM, signal.SIGXCPU):
    return SandboxResult("timeout", "time limit exceeded", seconds, isolation, output)
  if passed and returncode == 0:
    return SandboxResult("passed", "", seconds, isolation, output)
  if error is not None:
    detail = f"{error.get('type', 'Error')}: {error.get('message', '')}".rstrip(": ")
    return SandboxResult("failed", detail, seconds, isolation, output)
  if sig is not None:
    name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
    return SandboxResult("crashed", f"killed by {name}", seconds, isolation, output)
  if not isolation:
    return SandboxResult("crashed", f"the sandbox did not start (exit code {returncode}): "
                         f"{output.strip()[-300:]}", seconds, isolation, output)
  return SandboxResult("crashed", f"exit code {returncode} without a result", seconds, isolation,
                       output)
