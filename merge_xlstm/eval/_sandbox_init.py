"""The first process inside a code sandbox (see :mod:`merge_xlstm.eval.sandbox`); standard library only.

It runs as ``python -I -S -c SOURCE CONFIG_JSON`` with the program on stdin, already inside the
sandbox's namespaces, and:

1. with a ``"root"`` in the config (the ``unshare`` backend, which only creates namespaces) builds the
   program's file system itself: a read-only tmpfs holding the host paths the config lists (bound
   read-only at their own paths), a few device nodes, the PID namespace's ``/proc`` and a private
   size-capped tmpfs ``/tmp``, then ``pivot_root``s into it and detaches the host's tree; ``bwrap``
   builds the same root from its command line before starting us;
2. writes the program to ``main.py`` in the working directory;
3. forks the program under resource limits (address space, CPU time, file size, processes, no core
   dumps) with ``no_new_privs`` set and stdin from ``/dev/null``; in the ``unshare`` backend it also
   drops every capability (``bwrap --cap-drop ALL`` has done so already); with a ``"uid"`` in the
   config (a root caller, no user namespace) the program switches to that unprivileged uid, so the
   kernel applies RLIMIT_NPROC to it, which it never does for uid 0;
4. waits for it and exits with its status (128 + N when signal N killed it). In the isolating backends
   this process is the PID namespace's init, so when it exits the kernel kills every process the program
   left behind, detached or not, before its parent can reap it.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import stat
import sys
import traceback

_LIBC = ctypes.CDLL(None, use_errno=True)

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
MNT_DETACH = 0x2
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC = 0x1, 0x2, 0x4, 0x8
SYS_MOUNT_SETATTR = 442  # same number on x86_64 and arm64 (unified syscall table)
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(os.uname().machine, -1)  # -1: ENOSYS, the probe fails
PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 24, 28, 38, 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECBIT_NOROOT_AND_LOCKED = 0x3  # uid 0 gains no capabilities on execve, and this cannot be undone
# The new root is assembled on a tmpfs mounted here; the program's own /tmp hides it afterwards.
STAGE = "/tmp"
READ_ONLY = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV


class _MountAttr(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("attr_set", "attr_clr", "propagation", "userns_fd")]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_LIBC.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def _set_attributes(target: str, attributes: int, *, recursive: bool) -> None:
    """Add mount attributes (read-only, nosuid...): unlike a remount, this keeps the locked ones intact."""
    attr = _MountAttr(attr_set=attributes)
    flags = AT_RECURSIVE if recursive else 0
    ret = _LIBC.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, target.encode(), flags, ctypes.byref(attr), ctypes.sizeof(attr))
    _check(ret, f"mount_setattr {target}")


def _bind(source_fd: int, target: str, attributes: int) -> None:
    """Bind what `source_fd` (an O_PATH descriptor) names onto a new file or directory at `target`."""
    if stat.S_ISDIR(os.fstat(source_fd).st_mode):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
    _mount(f"/proc/self/fd/{source_fd}", target, None, MS_BIND | MS_REC, None)
    _set_attributes(target, attributes, recursive=True)


def build_root(exposed: dict, tmpfs_bytes: int) -> None:
    """Replace the host's file system with one holding only `exposed` paths and devices, /proc and /tmp."""
    # Descriptors first: the staging tmpfs may hide a source (anything under /tmp).
    paths = [*exposed["read_only"], *exposed["devices"], "/proc"]
    sources = {path: os.open(path, os.O_PATH | os.O_CLOEXEC) for path in paths}
    _mount(None, "/", None, MS_REC | MS_PRIVATE, None)  # nothing we mount leaks back to the host
    _mount("tmpfs", STAGE, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for path in exposed["read_only"]:
        _bind(sources[path], STAGE + path, READ_ONLY)
    for path in exposed["hidden"]:
        _mount("tmpfs", STAGE + path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k")
    for path in exposed["devices"]:
        _bind(sources[path], STAGE + path, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC)
    os.symlink("/tmp", STAGE + "/dev/shm")
    _bind(sources["/proc"], STAGE + "/proc", READ_ONLY | MOUNT_ATTR_NOEXEC)
    for fd in sources.values():
        os.close(fd)
    os.mkdir(STAGE + "/tmp")
    _mount("tmpfs", STAGE + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmpfs_bytes},mode=1777")
    _set_attributes(STAGE, MOUNT_ATTR_RDONLY, recursive=False)
    os.chdir(STAGE)
    _check(_LIBC.syscall(SYS_PIVOT_ROOT, b".", b"."), "pivot_root")  # the host's root now sits on top of ours
    _check(_LIBC.umount2(b".", MNT_DETACH), "detach the host's file system")
    os.chdir("/")


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
    if cfg["root"] is not None:
        drop_privileges()
    if cfg["uid"] is not None:
        os.setgroups([])
        os.setresgid(cfg["uid"], cfg["uid"], cfg["uid"])
        os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])  # leaves no capability behind
    _check(_LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    os.execve(cfg["python"], [cfg["python"], "-I", "main.py"], cfg["env"])


def main() -> None:
    cfg = json.loads(sys.argv[1])
    program = sys.stdin.buffer.read()
    if cfg["root"] is not None:
        build_root(cfg["root"], cfg["file_bytes"])
    os.chdir(cfg["workdir"])
    with open(os.open("main.py", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644), "wb") as handle:
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
