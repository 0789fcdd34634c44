"""Run model-written programs in a throwaway Linux sandbox.

Code benchmarks (HumanEval, MBPP) score a model by executing what it wrote, which must never touch the
machine that runs the evaluation. :func:`run` executes one Python program with

- a wall-clock limit that kills the whole process tree, a CPU-time limit, an address-space limit per
  process, a cap on the number of processes, and a file-size limit (which also caps the private working
  directory),
- no network (an empty network namespace), no view of host processes (a PID namespace),
- the host's files read-only, a private tmpfs ``/tmp`` as the only writable place (``/run`` is hidden so
  host sockets are out of reach),
- nothing left running afterwards: the program's namespace dies with its init process.

Isolation comes from Linux namespaces through one of the :data:`BACKENDS`: ``bwrap`` (Debian/Ubuntu
package ``bubblewrap``; allowed by Ubuntu's AppArmor profile where unprivileged namespaces are not) or
``unshare`` (util-linux, needs user namespaces). Where neither works, code tasks are refused unless the
user opts into the ``unsafe`` backend (limits and a temporary directory, but no isolation) with
``--allow-unsafe-code`` or ``MERGE_XLSTM_ALLOW_UNSAFE_CODE=1``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
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


class Backend(NamedTuple):
    isolated: bool
    wrap: Callable[[Limits], list[str]]  # command prefix that puts the init helper in the sandbox
    init_locks_filesystem: bool = False  # the backend only makes namespaces; the init helper mounts


BACKENDS: Registry[Backend] = Registry("sandbox backend")


def _bwrap(limits: Limits) -> list[str]:
    return [
        "bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
        "--size", str(limits.disk_mb << 20), "--tmpfs", "/tmp",
        "--tmpfs", "/run", "--remount-ro", "/run", "--remount-ro", "/proc", "--remount-ro", "/dev",
        "--unshare-all", "--unshare-user", "--as-pid-1", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
        "--chdir", "/tmp",
    ]  # fmt: skip


def _unshare(limits: Limits) -> list[str]:
    return [
        "unshare", "--user", "--map-root-user", "--mount", "--net", "--pid", "--ipc", "--uts",
        "--kill-child", "--mount-proc",
    ]  # fmt: skip


BACKENDS.register("bwrap")(Backend(isolated=True, wrap=_bwrap))
BACKENDS.register("unshare")(Backend(isolated=True, wrap=_unshare, init_locks_filesystem=True))
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
    config = {
        "isolate": backend.init_locks_filesystem,
        "workdir": workdir or "/tmp",
        "python": _PYTHON,
        "cpu_s": limits.cpu_s or timeout_s,
        "memory_bytes": limits.memory_mb << 20,
        "file_bytes": limits.disk_mb << 20,
        # RLIMIT_NPROC counts per user and user namespace: inside the sandbox's own namespace it caps the
        # sandbox; outside one it would count every process of the calling user (and not bind root at all).
        "max_processes": limits.processes if backend.isolated else None,
        "env": _program_env(workdir or "/tmp"),
    }
    command = [*backend.wrap(limits), _PYTHON, "-I", "-S", "-c", _INIT_SOURCE, json.dumps(config)]
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
