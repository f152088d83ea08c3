"""Child side of ``fdllm_jax.eval.sandbox``: runs one untrusted Python program.

Run by path (``python -I _sandbox_child.py CTL_FD``), never imported by the package, so it starts
without JAX. It reads a JSON spec from stdin, confines itself, runs the program, and reports
JSON lines on the control descriptor CTL_FD:

  {"event": "ready", "isolation": {...}}           confinement in place, program starts
  {"event": "passed", "nonce": ...}               the program ran to the end without an exception
  {"event": "error", "type": ..., "message": ...} the program raised (SystemExit included)

Confinement, strongest first (each OS layer is tried and reported; failures fall back):
  * Linux namespaces when permitted (root or CAP_SYS_ADMIN): a fresh network namespace (no
    interfaces up, so no connection can be made), a private mount namespace in which every mount
    is remounted read-only except the working directory, a PID namespace (the program cannot see
    or signal processes outside it), then all capabilities dropped and no_new_privs set;
  * resource limits: address space (memory), CPU seconds, file size, no core files, open files;
  * Python-level guards, always installed: ``open``/``os`` writes outside the working directory,
    process creation, signals and sockets raise PermissionError. These are a seatbelt against
    accidents, not a security boundary (ctypes or a C extension can step around them).
"""

import builtins
import ctypes
import errno
import io
import json
import os
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME, MS_STRICTATIME = 1024, 2048, 1 << 21, 1 << 24
_MOUNT_OPTION_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
                       "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME,
                       "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)
_real_exit = os._exit
_real_setitimer = signal.setitimer


def _call(what, ret):
  if ret != 0:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def _unshare(flags, what):
  _call(f"unshare({what})", _libc.unshare(ctypes.c_int(flags)))


def _mount(source, target, flags, what):
  src = source.encode() if source else None
  _call(f"mount {what} {target}",
        _libc.mount(src, target.encode(), None, ctypes.c_ulong(flags), None))


def _mount_points():
  """(mount point, per-mount flags) of this mount namespace, parents before children."""
  points = []
  with open("/proc/self/mountinfo") as f:
    for line in f:
      fields = line.split()
      path = fields[4].encode().decode("unicode_escape")  # \040 -> space
      flags = 0
      for option in fields[5].split(","):
        flags |= _MOUNT_OPTION_FLAGS.get(option, 0)
      points.append((path, flags))
  return points


def _read_only_filesystem(workdir, info):
  """Private mount namespace; every mount read-only except a bind mount of ``workdir``."""
  _unshare(CLONE_NEWNS, "CLONE_NEWNS")
  _mount(None, "/", MS_REC | MS_PRIVATE, "private")
  _mount(workdir, workdir, MS_BIND, "bind")
  left_writable = []
  for path, flags in _mount_points():
    if path == workdir:
      continue
    try:
      _mount(None, path, MS_REMOUNT | MS_BIND | MS_RDONLY | flags, "read-only")
    except OSError:
      left_writable.append(path)
  # Remounting the workdir's parent read-only leaves the workdir bind mount writable.
  info["filesystem"] = "read-only mount namespace, working directory writable"
  if left_writable:
    info["mounts_left_writable"] = left_writable


def _wait_and_exit(pid):
  """Waits for ``pid``; exits with its code, or 128 + signal when it was killed."""
  _, status = os.waitpid(pid, 0)
  _real_exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))


def _pid_namespace(info):
  """The program runs as PID 2 of a new PID namespace, under a waiting PID 1."""
  _unshare(CLONE_NEWPID, "CLONE_NEWPID")
  pid = os.fork()
  if pid:
    _wait_and_exit(pid)  # outer process: never returns
  _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
  pid = os.fork()  # PID 1 ignores default-action signals (timers); run the program as PID 2
  if pid:
    _wait_and_exit(pid)
  _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
  info["pid_namespace"] = True


class _CapHeader(ctypes.Structure):
  _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
  _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
              ("inheritable", ctypes.c_uint32)]


def _drop_capabilities(info):
  for cap in range(64):  # the bounding set too, so that exec cannot regain root's capabilities
    _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
  header, data = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0), (_CapData * 2)()
  _call("capset", _libc.capset(ctypes.byref(header), data))
  _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
  info["capabilities"] = "dropped"


def _os_isolation(workdir, info):
  if os.geteuid() != 0:
    info["os_isolation"] = "skipped: not root"
    return
  for name, step in (("network", lambda: _unshare(CLONE_NEWNET, "CLONE_NEWNET")),
                     ("filesystem", lambda: _read_only_filesystem(workdir, info)),
                     ("pid_namespace", lambda: _pid_namespace(info)),
                     ("capabilities", lambda: _drop_capabilities(info))):
    try:
      step()
      if name == "network":
        info["network"] = "network namespace without interfaces"
    except OSError as e:
      info.setdefault("os_isolation_errors", []).append(f"{name}: {e}")


def _set_limits(spec, info):
  memory = int(spec["memory_bytes"])
  cpu = int(spec["cpu_seconds"])
  limits = {resource.RLIMIT_AS: memory, resource.RLIMIT_CPU: cpu,
            resource.RLIMIT_FSIZE: int(spec["file_size_bytes"]), resource.RLIMIT_CORE: 0,
            resource.RLIMIT_NOFILE: 256}
  for kind, value in limits.items():
    soft, hard = resource.getrlimit(kind)
    if hard != resource.RLIM_INFINITY:
      value = min(value, hard)
    # hard limit one above soft for CPU: SIGXCPU at the soft limit, SIGKILL one second later
    resource.setrlimit(kind, (value, value + 1 if kind == resource.RLIMIT_CPU else value))
  info["limits"] = {"memory_bytes": memory, "cpu_seconds": cpu,
                    "file_size_bytes": int(spec["file_size_bytes"])}


def _install_guards(workdir, info):
  """Python-level refusals: writes outside ``workdir``, processes, signals, sockets."""
  root = os.path.realpath(workdir)
  real_open, real_os_open, real_fileio = builtins.open, os.open, io.FileIO

  def resolve(path, dir_fd=None):
    path = os.fsdecode(os.fspath(path))
    if dir_fd is not None and not os.path.isabs(path):
      path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
    return os.path.realpath(path)

  def inside(path, dir_fd=None):
    if isinstance(path, int):
      return True  # an already open descriptor
    target = resolve(path, dir_fd)
    return target == root or target.startswith(root + os.sep)

  def refuse(what, path):
    raise PermissionError(errno.EACCES, f"sandbox: {what} outside the working directory "
                          f"{root} is refused", os.fsdecode(os.fspath(path))
                          if not isinstance(path, int) else str(path))

  def writes(mode):
    return any(c in str(mode) for c in "wax+")

  def guarded_open(file, mode="r", *args, **kwargs):
    if writes(mode) and not inside(file):
      refuse("opening for writing", file)
    return real_open(file, mode, *args, **kwargs)

  write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

  def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
    if flags & write_flags and not inside(path, dir_fd):
      refuse("opening for writing", path)
    return real_os_open(path, flags, mode, dir_fd=dir_fd)

  class GuardedFileIO(real_fileio):
    def __init__(self, file, mode="r", *args, **kwargs):
      if writes(mode) and not inside(file):
        refuse("opening for writing", file)
      super().__init__(file, mode, *args, **kwargs)

  builtins.open = io.open = guarded_open
  io.FileIO = GuardedFileIO
  os.open = guarded_os_open

  def path_guard(name, n_paths):
    real = getattr(os, name)

    def guarded(*args, **kwargs):
      dir_fds = (kwargs.get("src_dir_fd", kwargs.get("dir_fd")), kwargs.get("dst_dir_fd",
                                                                           kwargs.get("dir_fd")))
      for i, path in enumerate(args[:n_paths]):
        if not inside(path, dir_fds[min(i, 1)]):
          refuse(f"os.{name}", path)
      return real(*args, **kwargs)
    setattr(os, name, guarded)

  for name in ("remove", "unlink", "rmdir", "removedirs", "mkdir", "makedirs", "chmod", "chown",
               "lchown", "truncate", "utime", "mkfifo", "mknod", "setxattr", "removexattr"):
    if hasattr(os, name):
      path_guard(name, 1)
  for name in ("rename", "replace", "renames", "link", "symlink"):
    path_guard(name, 2)

  def forbidden(what):
    def refused(*args, **kwargs):
      raise PermissionError(errno.EPERM, f"sandbox: {what} is not allowed")
    return refused

  for name in ("system", "popen", "fork", "forkpty", "execv", "execve", "execl", "execle",
               "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp",
               "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn",
               "posix_spawnp", "kill", "killpg", "setsid", "setpgid", "chroot", "_exit",
               "setuid", "setgid", "setresuid", "setresgid"):
    if hasattr(os, name):
      setattr(os, name, forbidden(f"os.{name}"))
  import subprocess
  subprocess.Popen = forbidden("starting a process")
  for name in ("alarm", "setitimer", "pthread_kill"):
    setattr(signal, name, forbidden(f"signal.{name}"))
  real_signal = signal.signal

  def guarded_signal(signum, handler):
    if signum in (signal.SIGALRM, signal.SIGXCPU, signal.SIGXFSZ, signal.SIGTERM):
      raise PermissionError(errno.EPERM, f"sandbox: handling signal {signum} is not allowed")
    return real_signal(signum, handler)
  signal.signal = guarded_signal

  import _socket
  import socket
  no_network = forbidden("network access")

  class NoSocket(socket.socket):
    def __init__(self, *args, **kwargs):
      no_network()

  socket.socket = socket.SocketType = _socket.socket = NoSocket
  for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo",
               "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
    setattr(socket, name, no_network)
  info.setdefault("network", "python socket guard")
  info["python_guards"] = True


def main():
  ctl = os.fdopen(int(sys.argv[1]), "w", buffering=1)

  def report(event, **fields):
    ctl.write(json.dumps({"event": event, **fields}) + "\n")
    ctl.flush()

  spec = json.loads(sys.stdin.read())
  null = os.open(os.devnull, os.O_RDONLY)
  os.dup2(null, 0)
  os.close(null)
  workdir = os.path.realpath(spec["workdir"])
  os.chdir(workdir)
  info = {"uid": os.geteuid()}
  if spec.get("os_isolation", True):
    _os_isolation(workdir, info)  # may fork: from here on this is the process that runs the code
    os.chdir(workdir)  # enter the writable bind mount that now covers the directory
  _set_limits(spec, info)
  _install_guards(workdir, info)
  source = spec["source"]
  nonce = spec.pop("nonce")
  report("ready", isolation=info)
  _real_setitimer(signal.ITIMER_REAL, float(spec["timeout_s"]))  # SIGALRM ends the process
  namespace = {"__name__": "__sandbox__", "__builtins__": builtins}
  try:
    exec(compile(source, "<program>", "exec"), namespace)
  except BaseException as e:  # noqa: BLE001 -- SystemExit and KeyboardInterrupt fail too
    try:
      report("error", type=type(e).__name__, message=str(e)[:1000])
    finally:
      _real_exit(1)
  report("passed", nonce=nonce)
  _real_exit(0)


if __name__ == "__main__":
  main()
