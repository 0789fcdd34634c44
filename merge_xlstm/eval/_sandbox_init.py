"""The first process inside a code sandbox (see :mod:`merge_xlstm.eval.sandbox`); standard library only.

It runs as ``python -I -S _sandbox_init.py CONFIG_JSON`` with the program on stdin, already inside the
sandbox's namespaces, and:

1. with ``"isolate": true`` (the ``unshare`` backend, which only creates namespaces) locks the file
   system itself: every host mount read-only (recursively, with ``mount_setattr``), a private size-capped
   tmpfs on ``/tmp`` as the working directory, an empty read-only ``/run`` so host sockets are out of
   reach; ``bwrap`` does the same before starting us;
2. writes the program to ``main.py`` in the working directory;
3. forks the program under resource limits (address space, CPU time, file size, processes, no core
   dumps) with ``no_new_privs`` set and stdin from ``/dev/null``; in the ``unshare`` backend it also
   drops every capability (``bwrap --cap-drop ALL`` has done so already);
4. waits for it and exits with its status (128 + N when signal N killed it). In the isolating backends
   this process is the PID namespace's init, so when it exits the kernel kills every process the program
   left behind, detached or not, before its parent can reap it.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import sys
import traceback

_LIBC = ctypes.CDLL(None, use_errno=True)

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REC, MS_PRIVATE = 0x4000, 0x40000
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = -100, 0x8000, 0x1
SYS_MOUNT_SETATTR = 442  # same number on x86_64 and arm64 (unified syscall table)
PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 24, 28, 38, 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECBIT_NOROOT_AND_LOCKED = 0x3  # uid 0 gains no capabilities on execve, and this cannot be undone


class _MountAttr(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("attr_set", "attr_clr", "propagation", "userns_fd")]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_LIBC.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def lock_filesystem(tmpfs_bytes: int) -> None:
    """Make every mount read-only, then give the program a private /tmp and an empty /run."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE, None)  # nothing we mount leaks back to the host
    attr = _MountAttr(attr_set=MOUNT_ATTR_RDONLY)
    ret = _LIBC.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr))
    _check(ret, "mount_setattr / read-only")
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmpfs_bytes},mode=1777")
    if os.path.isdir("/run"):
        _mount("tmpfs", "/run", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k")


def drop_privileges() -> None:
    """Leave no capability behind: a root-mapped program could otherwise undo the read-only mounts."""
    _check(_LIBC.prctl(PR_SET_SECUREBITS, SECBIT_NOROOT_AND_LOCKED, 0, 0, 0), "securebits")
    for cap in range(64):
        if _LIBC.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break  # EINVAL past the kernel's last capability
    _check(_LIBC.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "ambient caps")


def _run_program(cfg: dict) -> None:
    """In the forked child: limits, privileges, then exec the program. Never returns."""
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    cpu = max(1, int(cfg["cpu_s"] + 0.999))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU first, SIGKILL a second later
    resource.setrlimit(resource.RLIMIT_AS, (cfg["memory_bytes"], cfg["memory_bytes"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["file_bytes"], cfg["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if cfg["max_processes"]:
        resource.setrlimit(resource.RLIMIT_NPROC, (cfg["max_processes"], cfg["max_processes"]))
    if cfg["isolate"]:
        drop_privileges()
    _check(_LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    os.execve(cfg["python"], [cfg["python"], "-I", "main.py"], cfg["env"])


def main() -> None:
    cfg = json.loads(sys.argv[1])
    program = sys.stdin.buffer.read()
    if cfg["isolate"]:
        lock_filesystem(cfg["file_bytes"])
    os.chdir(cfg["workdir"])
    with open("main.py", "wb") as handle:
        handle.write(program)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        try:
            _run_program(cfg)
        except BaseException:
            traceback.print_exc()
            os._exit(126)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    main()
