"""The code sandbox against hostile programs, on every isolating backend that works on this machine."""

from __future__ import annotations

import json
import os
import signal
import socket
import tempfile
import textwrap
import uuid
from pathlib import Path

import pytest

from merge_xlstm.eval import sandbox
from merge_xlstm.eval.sandbox import Limits, SandboxUnavailable

ISOLATING = sandbox.available_backends()
isolated = pytest.mark.parametrize(
    "backend",
    ISOLATING or [pytest.param("none", marks=pytest.mark.skip(reason="no isolating sandbox backend works here"))],
)


def run(program: str, backend: str, timeout_s: float = 10.0, **limits) -> sandbox.SandboxResult:
    return sandbox.run(textwrap.dedent(program), timeout_s, limits=Limits(**limits), backend=backend)


def live_processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("backend", [*ISOLATING, "unsafe"])
def test_exit_status_and_output_are_reported(backend):
    ok = run("print('hello'); import sys; print('warn', file=sys.stderr)", backend)
    assert (ok.passed, ok.timed_out, ok.returncode, ok.stdout, ok.stderr) == (True, False, 0, "hello\n", "warn\n")
    failed = run("assert 1 + 1 == 3", backend)
    assert not failed.passed and not failed.timed_out and failed.returncode == 1
    assert "AssertionError" in failed.stderr


@pytest.mark.parametrize("backend", [*ISOLATING, "unsafe"])
def test_endless_loop_is_killed_at_the_wall_clock_limit(backend):
    result = run("while True:\n    pass", backend, timeout_s=1.0)
    assert result.timed_out and not result.passed and result.returncode is None
    assert result.duration_s < 4


@isolated
def test_cpu_time_limit_stops_a_busy_program(backend):
    result = run("while True:\n    pass", backend, timeout_s=30.0, cpu_s=1)
    assert result.timed_out and not result.passed
    assert result.returncode == 128 + signal.SIGXCPU
    assert result.duration_s < 10


@isolated
def test_memory_hog_fails_without_taking_the_machine(backend):
    result = run("blob = bytearray(4 << 30)\nprint(len(blob))", backend, memory_mb=256)
    assert not result.passed and not result.timed_out
    assert "MemoryError" in result.stderr


@isolated
def test_process_count_is_capped_and_every_process_is_cleaned_up(backend):
    marker = f"sandbox-bomb-{uuid.uuid4().hex}"
    program = f"""
        import os
        started = 0
        for _ in range(200):
            try:
                if os.fork() == 0:
                    os.execv("/bin/sh", ["/bin/sh", "-c", "sleep 60", {marker!r}])
                started += 1
            except OSError:
                break
        print(started)
    """
    result = run(program, backend, timeout_s=20.0, processes=32)
    assert result.passed, result.stderr
    if os.geteuid() != 0:  # the kernel exempts uid 0 from RLIMIT_NPROC, even inside a user namespace
        assert int(result.stdout) < 32
    assert live_processes_with(marker) == []


@isolated
def test_no_network_not_even_the_hosts_loopback(backend):
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
        result = run(program, backend)
        with pytest.raises(TimeoutError):
            server.accept()
    assert result.passed, result.stderr


@isolated
def test_host_files_are_read_only_and_only_the_private_tmp_is_writable(backend):
    # A host directory the sandbox can see: not under /tmp, which it replaces with its own (the checkout
    # itself may live there).
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="merge-xlstm-sandbox-victim-") as victim:
        victim = Path(victim)
        (victim / "keep.txt").write_text("original")
        program = f"""
            import json, os, shutil
            victim = {str(victim)!r}
            attempts = {{
                "create": lambda: open(os.path.join(victim, "new.txt"), "w").write("x"),
                "overwrite": lambda: open(os.path.join(victim, "keep.txt"), "w").write("x"),
                "delete": lambda: os.remove(os.path.join(victim, "keep.txt")),
                "rename": lambda: os.rename(os.path.join(victim, "keep.txt"), os.path.join(victim, "moved")),
                "chmod": lambda: os.chmod(os.path.join(victim, "keep.txt"), 0o777),
                "rmtree": lambda: shutil.rmtree(victim),
                "home": lambda: open(os.path.expanduser("~root/.x"), "w"),
                "var_tmp": lambda: open("/var/tmp/x", "w"),
                "dev_shm": lambda: open("/dev/shm/x", "w"),
                "sysctl": lambda: open("/proc/sys/kernel/hostname", "w").write("x"),
            }}
            succeeded = []
            for name, attempt in attempts.items():
                try:
                    attempt()
                    succeeded.append(name)
                except OSError:
                    pass
            open("mine.txt", "w").write("private")  # the working directory is writable
            print(json.dumps({{"succeeded": succeeded, "read": open(os.path.join(victim, "keep.txt")).read(),
                               "cwd": os.getcwd(), "mine": open("mine.txt").read()}}))
        """
        result = run(program, backend)
        assert result.passed, result.stderr
        report = json.loads(result.stdout)
        assert report == {"succeeded": [], "read": "original", "cwd": "/tmp", "mine": "private"}
        assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"]
        assert (victim / "keep.txt").read_text() == "original"
        assert oct((victim / "keep.txt").stat().st_mode & 0o777) != oct(0o777)


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
