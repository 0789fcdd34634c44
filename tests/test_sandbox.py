"""The code sandbox against hostile programs, on every isolating backend that works on this machine.

The hostile programs run twice: as the caller (root on this machine and in containers) and as another
identity, an unprivileged uid (``setpriv`` to ``nobody``) when the caller is root, or root of a user
namespace of its own (``unshare --map-root-user``) when it is not. The other identity runs a copy of the
sandbox modules (standard library only) from a world-readable folder, with an interpreter it can run.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import uuid
from pathlib import Path

import pytest

import merge_xlstm
from merge_xlstm.eval import sandbox
from merge_xlstm.eval.sandbox import Limits, SandboxResult, SandboxUnavailable

ROOT = os.geteuid() == 0
OTHER = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if ROOT else ["unshare", "--user", "--map-root-user"]
OTHER_NAME = "nobody" if ROOT else "namespace-root"
# What the sandbox module needs besides the standard library, copied for the other identity.
SANDBOX_MODULES = ("errors.py", "registry.py", "eval/sandbox.py", "eval/_sandbox_init.py")
DRIVER = """
import dataclasses, json, sys
sys.path.insert(0, sys.argv[1])
from merge_xlstm.eval import sandbox
request = json.loads(sys.stdin.read())
if request.get("probe"):
    print(json.dumps(sandbox.available_backends()))
else:
    result = sandbox.run(request["program"], request["timeout_s"], limits=sandbox.Limits(**request["limits"]),
                         backend=request["backend"])
    print(json.dumps(dataclasses.asdict(result)))
"""


def _other_identity_setup() -> tuple[str, str]:
    """(interpreter, folder): a world-readable copy of the sandbox modules and a Python the other identity runs."""
    folder = Path(tempfile.mkdtemp(prefix="merge-xlstm-sandbox-driver-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    package = Path(merge_xlstm.__file__).parent
    for name in ("__init__.py", "eval/__init__.py", *SANDBOX_MODULES):  # empty __init__s: no torch import
        (folder / "merge_xlstm" / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / "merge_xlstm" / name).write_text((package / name).read_text() if name in SANDBOX_MODULES else "")
    (folder / "driver.py").write_text(DRIVER)
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    for python in (os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"):
        # os.access, not a mere start: setpriv may start a program its new uid could not start again
        can_run = [*OTHER, python, "-c", "import os, sys; sys.exit(not os.access(sys.executable, os.X_OK))"]
        if os.path.isfile(python) and subprocess.run(can_run, check=False).returncode == 0:
            return python, str(folder)
    raise RuntimeError(f"no Python interpreter runs as {OTHER_NAME} here: the sandbox cannot be tested as that user")


OTHER_PYTHON, OTHER_FOLDER = _other_identity_setup()


def _as_other(request: dict) -> str:
    command = [*OTHER, OTHER_PYTHON, "-I", f"{OTHER_FOLDER}/driver.py", OTHER_FOLDER]
    done = subprocess.run(command, input=json.dumps(request), capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


ISOLATING = sandbox.available_backends()
ISOLATING_FOR_OTHER = tuple(json.loads(_as_other({"probe": True})))
isolated = pytest.mark.parametrize(
    "backend",
    ISOLATING or [pytest.param("none", marks=pytest.mark.skip(reason="no isolating sandbox backend works here"))],
)
# (backend, identity) pairs for the programs that try to escape a limit
hostile = pytest.mark.parametrize(
    ("backend", "identity"),
    [pytest.param(b, "caller", id=f"{b}-caller") for b in ISOLATING]
    + [pytest.param(b, OTHER_NAME, id=f"{b}-{OTHER_NAME}") for b in ISOLATING_FOR_OTHER]
    or [pytest.param("none", "caller", marks=pytest.mark.skip(reason="no isolating sandbox backend works here"))],
)


def run(program: str, backend: str, timeout_s: float = 10.0, identity: str = "caller", **limits) -> SandboxResult:
    program = textwrap.dedent(program)
    if identity == "caller":
        return sandbox.run(program, timeout_s, limits=Limits(**limits), backend=backend)
    request = {"program": program, "timeout_s": timeout_s, "limits": limits, "backend": backend}
    return SandboxResult(**json.loads(_as_other(request)))


def live_processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def processes_in_namespace(pid_namespace: str) -> list[int]:
    """Host processes inside the PID namespace `pid_namespace` ("pid:[inode]")."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.readlink(entry / "ns" / "pid") == pid_namespace:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_every_backend_that_isolates_the_caller_isolates_the_other_identity_too():
    assert ISOLATING_FOR_OTHER == ISOLATING


@pytest.mark.parametrize("backend", [*ISOLATING, "unsafe"])
def test_exit_status_and_output_are_reported(backend):
    ok = run("print('hello'); import sys; print('warn', file=sys.stderr)", backend)
    assert (ok.passed, ok.timed_out, ok.returncode, ok.stdout, ok.stderr) == (True, False, 0, "hello\n", "warn\n")
    failed = run("assert 1 + 1 == 3", backend)
    assert not failed.passed and not failed.timed_out and failed.returncode == 1
    assert "AssertionError" in failed.stderr


@isolated
def test_the_standard_library_works_inside(backend):
    program = """
        import ctypes, decimal, hashlib, json, multiprocessing.pool, sqlite3, ssl, subprocess, sys, threading, zlib
        threads = multiprocessing.pool.ThreadPool(4).map(lambda x: x * x, range(8))
        child = subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True).stdout
        print(json.dumps([sum(threads), child.strip(), hashlib.sha256(b"x").hexdigest()[:6], sqlite3.sqlite_version > ""]))
    """
    result = run(program, backend)
    assert result.passed, result.stderr
    assert json.loads(result.stdout) == [140, "42", "2d7116", True]


@pytest.mark.parametrize("backend", [*ISOLATING, "unsafe"])
def test_endless_loop_is_killed_at_the_wall_clock_limit(backend):
    result = run("while True:\n    pass", backend, timeout_s=1.0)
    assert result.timed_out and not result.passed and result.returncode is None
    assert result.duration_s < 4


@hostile
def test_cpu_time_limit_stops_a_busy_program(backend, identity):
    result = run("while True:\n    pass", backend, timeout_s=30.0, identity=identity, cpu_s=1)
    assert result.timed_out and not result.passed
    assert result.returncode == 128 + signal.SIGXCPU
    assert result.duration_s < 10


@hostile
def test_memory_hog_fails_without_taking_the_machine(backend, identity):
    result = run("blob = bytearray(4 << 30)\nprint(len(blob))", backend, identity=identity, memory_mb=256)
    assert not result.passed and not result.timed_out
    assert "MemoryError" in result.stderr


@hostile
def test_fork_bomb_is_capped_and_dies_with_the_run(backend, identity):
    """Every process forks in every round: 256 processes unless the cap holds (uid 0 is never capped)."""
    program = """
        import json, os, time
        leader = os.getpid()
        for _ in range(8):
            try:
                os.fork()
            except OSError:
                pass
        if os.getpid() != leader:
            time.sleep(60)
            os._exit(0)
        time.sleep(1)
        alive = [p for p in os.listdir("/proc") if p.isdigit()]  # this PID namespace's processes
        print(json.dumps({"alive": len(alive), "uid": os.getuid(), "namespace": os.readlink("/proc/self/ns/pid")}))
    """
    result = run(program, backend, timeout_s=20.0, identity=identity, processes=32)
    assert result.passed, result.stderr
    report = json.loads(result.stdout)
    assert 16 <= report["alive"] <= 32 + 1, report  # it did fork, up to the cap (+ the sandbox's init)
    assert processes_in_namespace(report["namespace"]) == []  # nothing of it outlives the run


@isolated
def test_a_flat_burst_of_processes_is_capped_and_cleaned_up(backend):
    marker = f"sandbox-burst-{uuid.uuid4().hex}"
    program = f"""
        import os, sys
        started = 0
        for _ in range(200):
            try:
                if os.fork() == 0:
                    os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)", {marker!r}])
                started += 1
            except OSError:
                break
        print(started)
    """
    result = run(program, backend, timeout_s=20.0, processes=32)
    assert result.passed, result.stderr
    assert 8 <= int(result.stdout) < 32
    assert live_processes_with(marker) == []


@hostile
def test_no_network_not_even_the_hosts_loopback(backend, identity):
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    port = server.getsockname()[1]
    program = f"""
        import socket
        reached = []
        for address in [("127.0.0.1", {port}), ("1.1.1.1", 53), ("8.8.8.8", 443)]:
            try:
                socket.create_connection(address, timeout=2).close()
                reached.append(address)
            except OSError:
                pass
        try:
            socket.getaddrinfo("pypi.org", 443)
            reached.append("dns")
        except OSError:
            pass
        assert not reached, reached
    """
    with server:
        result = run(program, backend, identity=identity)
        with pytest.raises(TimeoutError):
            server.accept()
    assert result.passed, result.stderr


@hostile
def test_only_the_interpreter_and_the_private_tmp_are_visible_and_only_tmp_is_writable(backend, identity):
    # A host folder outside /tmp (the sandbox has its own /tmp), and the checkout: neither may be seen.
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="merge-xlstm-sandbox-victim-") as victim:
        victim = Path(victim)
        (victim / "keep.txt").write_text("original")
        secrets = ["/etc/passwd", "/etc/hostname", "/root/.bashrc", "/home", "/run", "/sys", str(Path(__file__)),
                   str(victim / "keep.txt")]
        program = f"""
            import json, os, shutil, stat, sys
            visible = [path for path in {secrets!r} if os.path.exists(path)]
            stdlib = os.path.dirname(os.__file__)
            stray = []  # files that are not the interpreter, its standard library or a shared library
            for top, dirs, files in os.walk("/"):
                if top in ("/proc", "/dev", "/tmp") or top.startswith(stdlib):
                    dirs.clear()
                    continue
                stray += [os.path.join(top, f) for f in files
                          if os.path.join(top, f) not in (sys.executable, "/etc/ld.so.cache") and ".so" not in f]
            attempts = {{
                "root": lambda: open("/new.txt", "w"),
                "etc": lambda: open("/etc/new.txt", "w"),
                "stdlib": lambda: open(os.__file__, "a").write("x"),
                "interpreter": lambda: open(sys.executable, "r+b").write(b"x"),
                "chmod": lambda: os.chmod(os.__file__, 0o777),
                "rename": lambda: os.rename(os.__file__, os.__file__ + ".x"),
                "mkdir": lambda: os.mkdir("/home"),
                "dev": lambda: open("/dev/new", "w"),
                "sysctl": lambda: open("/proc/sys/kernel/hostname", "w").write("x"),
                "site_packages": lambda: open(os.path.join(stdlib, "site-packages", "evil.pth"), "w"),
            }}
            succeeded = []
            for name, attempt in attempts.items():
                try:
                    attempt()
                    succeeded.append(name)
                except OSError:
                    pass
            open("mine.txt", "w").write("private")  # the working directory is writable
            print(json.dumps({{"visible": visible, "stray": stray, "succeeded": succeeded, "cwd": os.getcwd(),
                               "mine": open("mine.txt").read(), "uid": os.getuid()}}))
        """
        result = run(program, backend, identity=identity)
        assert result.passed, result.stderr
        report = json.loads(result.stdout)
        assert report.pop("uid") != 0 or not ROOT or identity != "caller"  # a root caller's program is not root
        assert report == {"visible": [], "stray": [], "succeeded": [], "cwd": "/tmp", "mine": "private"}
        assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"]
        assert (victim / "keep.txt").read_text() == "original"


@isolated
def test_the_private_tmp_is_gone_after_the_run(backend):
    marker = uuid.uuid4().hex
    assert run(f"open('/tmp/{marker}', 'w').write('x')", backend).passed
    result = run(f"import os; print(os.path.exists('/tmp/{marker}'))", backend)
    assert result.stdout == "False\n"
    assert not Path(f"/tmp/{marker}").exists()


DETACH = """
    import os, subprocess, sys, time
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "{marker}"],
                     start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if os.fork() == 0:  # a classic double-forked daemon as well
        os.setsid()
        if os.fork() == 0:
            os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)", "{marker}"])
        os._exit(0)
    time.sleep(0.3)
    {tail}
"""


@isolated
@pytest.mark.parametrize("tail", ["print('bye')", "while True: pass"], ids=["exits", "times-out"])
def test_no_detached_process_outlives_the_run(backend, tail):
    marker = f"sandbox-daemon-{uuid.uuid4().hex}"
    result = run(DETACH.format(marker=marker, tail=tail), backend, timeout_s=2.0)
    assert result.passed == (tail == "print('bye')"), result.stderr
    assert live_processes_with(marker) == []


def test_refuses_without_isolation_unless_unsafe_is_allowed(monkeypatch):
    monkeypatch.setattr(sandbox, "available_backends", lambda: ())
    monkeypatch.delenv(sandbox.UNSAFE_ENV, raising=False)
    with pytest.raises(SandboxUnavailable, match="--allow-unsafe-code"):
        sandbox.run("print(1)", 5)
    assert sandbox.run("print(1)", 5, allow_unsafe=True).backend == "unsafe"
    monkeypatch.setenv(sandbox.UNSAFE_ENV, "1")
    result = sandbox.run("import os; print(os.getcwd())", 5)
    assert result.passed and result.backend == "unsafe"
    assert not os.path.exists(result.stdout.strip())  # its temporary directory is removed afterwards
