"""Run model-written programs in a throwaway Linux sandbox.

Code benchmarks (HumanEval, MBPP) score a model by executing what it wrote, which must never touch the
machine that runs the evaluation. :func:`run` executes one Python program with

- a wall-clock limit that kills the whole process tree, a CPU-time limit, an address-space limit per
  process, a cap on the number of processes, and a file-size limit (which also caps the private working
  directory),
- an unprivileged identity, even when the evaluation runs as root: the kernel exempts the global uid 0
  from RLIMIT_NPROC, so a root caller's program runs under a uid of its own, fresh per run (no host file
  belongs to it, no other process shares its process count); an unprivileged caller's program keeps the
  caller's uid, mapped to root in a user namespace of its own, with every capability dropped,
- no network (an empty network namespace), no view of host processes (a PID namespace),
- a root of its own: a read-only tmpfs holding only the interpreter, its standard library (without the
  base installation's site-packages) and the shared libraries they load, a few device nodes, its own
  ``/proc`` and a private size-capped tmpfs ``/tmp`` as the only writable place; the rest of the host
  (``/etc``, ``/root``, home directories, the checkout, sockets under ``/run``) does not exist in there,
- nothing left running afterwards: the program's namespace dies with its init process.

Isolation comes from Linux namespaces through one of the :data:`BACKENDS`, tried in order: ``bwrap``
(Debian/Ubuntu package ``bubblewrap``; allowed by Ubuntu's AppArmor profile where unprivileged user
namespaces are not) or ``unshare`` (util-linux; root may always use it, other users need user
namespaces). Each is probed once per process by running a program through it. Where neither works, code tasks
are refused unless the user opts into the ``unsafe`` backend (limits and a temporary directory, but no
isolation) with ``--allow-unsafe-code`` or ``MERGE_XLSTM_ALLOW_UNSAFE_CODE=1``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from merge_xlstm.errors import UserError
from merge_xlstm.registry import Registry

UNSAFE_ENV = "MERGE_XLSTM_ALLOW_UNSAFE_CODE"
# The sandbox must not depend on host files under /tmp, which it replaces with its own tmpfs: a checkout
# or virtual environment there (CI clones often live in /tmp) would vanish. So the init helper travels
# as source text (`python -c`), and the interpreter is the real binary behind a venv's symlink; programs
# get the standard library only (`-I`), never the evaluating environment's packages.
_INIT_SOURCE = Path(__file__).with_name("_sandbox_init.py").read_text()
_PYTHON = os.path.realpath(sys.executable)
_SIGXCPU_EXIT = 128 + signal.SIGXCPU
# A root caller's programs run under a uid drawn from this range, one per run: no host file or process
# belongs to it, and RLIMIT_NPROC, which counts per uid, counts exactly that run's processes.
SANDBOX_UIDS = range(0x7F000000, 0x7FFF0000)
_LD_CACHE = "/etc/ld.so.cache"  # the dynamic loader's index: library names only, no secrets
# Device nodes a program may open; /dev/shm (POSIX semaphores, multiprocessing locks) is a link to /tmp.
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")


class SandboxUnavailable(UserError):
    """No isolating backend works here and the user did not allow unsafe execution."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one run besides wall time; the defaults suit unit-test style programs."""

    cpu_s: float | None = None  # default: the wall-clock limit
    memory_mb: int = 1024  # address space of the program
    disk_mb: int = 64  # private /tmp size and largest file (stdout/stderr included)
    processes: int = 256  # tasks (processes and threads) alive at once; isolating backends only
    output_bytes: int = 1 << 16  # captured per stream


@dataclass(frozen=True)
class SandboxResult:
    passed: bool  # exited 0 within every limit
    timed_out: bool  # hit the wall-clock or the CPU-time limit
    returncode: int | None  # 128 + N when signal N killed it; None when killed at the wall-clock limit
    stdout: str
    stderr: str
    duration_s: float
    backend: str


@dataclass(frozen=True)
class Exposure:
    """The host paths a program sees, read-only and at their own paths: what the interpreter needs."""

    read_only: tuple[str, ...]  # files and directories, none inside another
    hidden: tuple[str, ...]  # directories inside those, shown empty (the base installation's packages)
    devices: tuple[str, ...] = DEVICES


@functools.cache
def exposure() -> Exposure:
    """The interpreter, its standard library and extension modules, and the shared libraries they load."""
    stdlib = sysconfig.get_paths()["stdlib"]  # the base installation's, also when run from a venv
    dynload = sysconfig.get_config_var("DESTSHARED") or os.path.join(stdlib, "lib-dynload")
    extensions = sorted(str(path) for path in Path(dynload).glob("*.so"))
    wanted = {_PYTHON, stdlib, dynload, _LD_CACHE, *_shared_libraries([_PYTHON, *extensions])}
    read_only: list[str] = []
    for path in sorted(p for p in wanted if os.path.exists(p)):  # a parent sorts before what it holds
        if not any(path.startswith(parent + os.sep) for parent in read_only):
            read_only.append(path)
    packages = (os.path.join(stdlib, name) for name in ("site-packages", "dist-packages"))
    return Exposure(tuple(read_only), tuple(p for p in packages if os.path.isdir(p)))


def _shared_libraries(files: list[str]) -> list[str]:
    """The libraries `files` load, loader included, at the paths the dynamic loader resolves (`ldd`)."""
    try:
        listing = subprocess.run(["ldd", *files], capture_output=True, text=True, timeout=60, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []  # then the interpreter cannot start in the sandbox, and the backend's probe fails
    found = []
    for line in listing.splitlines():
        words = line.split()
        if not line[:1].isspace() or not words:  # "FILE:" headers of a listing of several files
            continue
        path = words[2] if len(words) > 2 and words[1] == "=>" else words[0]
        if path.startswith("/"):
            found.append(path)
    return found


def _runs_as_global_root() -> bool:
    """Whether this process is uid 0 of the initial user namespace, the one uid RLIMIT_NPROC exempts."""
    if os.geteuid() != 0:
        return False
    try:
        return Path("/proc/self/uid_map").read_text().split()[:2] == ["0", "0"]
    except OSError:
        return True


class Backend(NamedTuple):
    isolated: bool
    wrap: Callable[[Limits], list[str]]  # command prefix that puts the init helper in the sandbox
    builds_root: bool = False  # the backend only makes namespaces; the init helper builds the root


BACKENDS: Registry[Backend] = Registry("sandbox backend")


def _bwrap(limits: Limits) -> list[str]:
    exposed = exposure()
    # bwrap would create the bound paths' parents 0700, which a root caller's sandbox uid cannot cross.
    shown = (*exposed.read_only, *exposed.devices)
    parents = sorted({str(parent) for path in shown for parent in Path(path).parents} - {"/"})
    binds = [arg for path in parents for arg in ("--perms", "0755", "--dir", path)]
    binds += [arg for path in exposed.read_only for arg in ("--ro-bind", path, path)]
    hidden = [arg for path in exposed.hidden for arg in ("--tmpfs", path, "--remount-ro", path)]
    if _runs_as_global_root():
        # No user namespace, which would map the program back to uid 0: the init helper switches uid.
        identity = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--cap-drop", "ALL",
                    "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]  # fmt: skip
    else:
        identity = ["--unshare-all", "--unshare-user", "--cap-drop", "ALL"]
    devices = [arg for path in exposed.devices for arg in ("--dev-bind", path, path)]
    return [
        "bwrap", *binds, *hidden, *devices, "--symlink", "/tmp", "/dev/shm", "--proc", "/proc",
        "--size", str(limits.disk_mb << 20), "--perms", "1777", "--tmpfs", "/tmp",
        "--remount-ro", "/", "--remount-ro", "/proc",
        *identity, "--as-pid-1", "--die-with-parent", "--new-session", "--chdir", "/tmp",
    ]  # fmt: skip


def _unshare(limits: Limits) -> list[str]:
    # Root needs no user namespace to make the others; mapping it into one would keep the program uid 0.
    user = [] if _runs_as_global_root() else ["--user", "--map-root-user"]
    return ["unshare", *user, "--mount", "--net", "--pid", "--ipc", "--uts", "--kill-child", "--mount-proc"]


BACKENDS.register("bwrap")(Backend(isolated=True, wrap=_bwrap))
BACKENDS.register("unshare")(Backend(isolated=True, wrap=_unshare, builds_root=True))
BACKENDS.register("unsafe")(Backend(isolated=False, wrap=lambda limits: []))


def run(
    program: str,
    timeout_s: float = 10.0,
    *,
    limits: Limits | None = None,
    backend: str | None = None,
    allow_unsafe: bool | None = None,
) -> SandboxResult:
    """Execute `program` with ``python -I`` in a sandbox and report how it ended.

    `timeout_s` is the wall-clock limit, sandbox start-up included. `backend` defaults to the first
    isolating backend that works here; `allow_unsafe` (default: the ``MERGE_XLSTM_ALLOW_UNSAFE_CODE``
    environment variable) permits falling back to the non-isolating one.
    """
    name = backend or select_backend(allow_unsafe)
    chosen = BACKENDS.get(name)
    workdir = None if chosen.isolated else tempfile.mkdtemp(prefix="merge-xlstm-sandbox-")
    try:
        return _execute(program, timeout_s, limits or Limits(), name, chosen, workdir)
    finally:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def select_backend(allow_unsafe: bool | None = None) -> str:
    """The first isolating backend that works here, else ``unsafe`` if allowed, else refuse."""
    if isolating := available_backends():
        return isolating[0]
    if allow_unsafe is None:
        allow_unsafe = os.environ.get(UNSAFE_ENV, "") not in ("", "0")
    if allow_unsafe:
        return "unsafe"
    raise SandboxUnavailable(
        "cannot isolate model-written code here (needs `bwrap` from Debian's bubblewrap package, or "
        "user namespaces for `unshare`); install bubblewrap, or pass --allow-unsafe-code "
        f"(lm-eval: {UNSAFE_ENV}=1) to run it without isolation"
    )


@functools.cache
def available_backends() -> tuple[str, ...]:
    """Isolating backends that actually run a program here, probed once per process."""
    working = []
    for name in BACKENDS:
        backend = BACKENDS.get(name)
        if not backend.isolated or shutil.which(backend.wrap(Limits())[0]) is None:
            continue
        probe = _execute("print('ok')", 20.0, Limits(), name, backend, None)
        if probe.passed and probe.stdout == "ok\n":
            working.append(name)
    return tuple(working)


def _execute(
    program: str, timeout_s: float, limits: Limits, name: str, backend: Backend, workdir: str | None
) -> SandboxResult:
    fresh_uid = backend.isolated and _runs_as_global_root()
    config = {
        "root": dataclasses.asdict(exposure()) if backend.builds_root else None,
        "uid": random.randrange(SANDBOX_UIDS.start, SANDBOX_UIDS.stop) if fresh_uid else None,
        "workdir": workdir or "/tmp",
        "python": _PYTHON,
        "cpu_s": limits.cpu_s or timeout_s,
        "memory_bytes": limits.memory_mb << 20,
        "file_bytes": limits.disk_mb << 20,
        # RLIMIT_NPROC counts per uid and user namespace: under the run's own uid or inside the sandbox's own
        # user namespace it caps the sandbox; without isolation it would count every process of the caller
        # (and not bind root at all).
        "max_processes": limits.processes if backend.isolated else None,
        "env": _program_env(workdir or "/tmp"),
    }
    wrapper = backend.wrap(limits)
    if wrapper:  # found on the caller's PATH, which the program's environment does not share
        wrapper[0] = shutil.which(wrapper[0]) or wrapper[0]
    command = [*wrapper, _PYTHON, "-I", "-S", "-c", _INIT_SOURCE, json.dumps(config)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=workdir or "/",
            env=_program_env(workdir or "/tmp"), start_new_session=True,
        )  # fmt: skip
        try:
            proc.communicate(program.encode(), timeout=timeout_s)
            returncode: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            _stop(proc)
        duration = time.monotonic() - start
        timed_out = returncode is None or returncode == _SIGXCPU_EXIT
        return SandboxResult(
            passed=returncode == 0,
            timed_out=timed_out,
            returncode=returncode,
            stdout=_read(out, limits.output_bytes),
            stderr=_read(err, limits.output_bytes),
            duration_s=duration,
            backend=name,
        )


def _stop(proc: subprocess.Popen) -> None:
    """Kill the sandbox from the inside out, so that every process is reaped by its own parent.

    SIGKILL goes first to the backend's children (the sandbox's init): the kernel then kills everything
    else in its PID namespace, however detached, before the backend process can reap the init and exit.
    Killing the backend first would orphan the init to a system init that may never reap it.
    """
    if proc.poll() is None:
        for pid in _children(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of its process group
    proc.wait()


def _children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _program_env(home: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": "1",  # numeric libraries would start a thread per host core
        "OPENBLAS_NUM_THREADS": "1",
    }


def _read(handle, limit: int) -> str:
    handle.seek(0)
    return handle.read(limit).decode("utf-8", errors="replace")
