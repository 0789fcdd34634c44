"""Crash-safe file output: write to a temporary sibling, then rename.

A killed process must never leave a half-written checkpoint, shard or model directory behind, so
every writer in the package goes through these helpers. `os.replace` is atomic on POSIX when source
and destination are on the same file system, which a sibling path guarantees.

A temporary sibling is named ``.NAME.tmp-PID-RANDOM``: when a run is killed mid-write (kill -9, power
loss) its temporary stays behind, and the next write of the same target removes every sibling whose
PID no longer runs (a live PID may be another writer of the same target, so it is left alone).
What is renamed into place gets the permissions the umask gives new files and directories, like
anything else the user creates: the temporaries are created private (0700 / 0600), and libraries
writing into a temporary directory choose their own modes (safetensors 0600, copies keep the source's).

JSON goes through :func:`to_json`: non-finite floats become ``null``, because bare ``NaN`` and
``Infinity`` are not JSON and other tools reject them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-{os.getpid()}-"


def _old_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.old-{os.getpid()}")


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(target: str | os.PathLike[str]) -> None:
    """Remove what killed writers of `target` left next to it (only our own names, only of dead PIDs).

    A leftover ``.NAME.old-PID`` is the previous `target`, moved aside by an overwrite that was killed
    before the new one took its place: it is put back when `target` is missing, else removed.
    """
    target = Path(target)
    if not target.parent.is_dir():
        return
    for role in ("tmp", "old"):
        for leftover in target.parent.glob(f".{target.name}.{role}-*"):
            pid = leftover.name.removeprefix(f".{target.name}.{role}-").split("-", 1)[0]
            if not pid.isdigit() or _pid_runs(int(pid)):
                continue
            if role == "old" and not target.exists():
                os.replace(leftover, target)
            elif leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()


def _umask() -> int:
    """The process umask, read without changing it (os.umask sets it, which other threads would see)."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish_mode(path: Path) -> None:
    """Give a temporary, and everything in it, the modes newly created files and directories would have."""
    mask = _umask()
    for entry in [path, *(path.rglob("*") if path.is_dir() else [])]:
        if not entry.is_symlink():
            os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `target`; rename it to `target` on success.

    On any exception the temporary directory is removed and `target` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), dir=target.parent))
    try:
        yield tmp
        _publish_mode(tmp)
        if target.exists():
            if not overwrite:
                raise FileExistsError(f"{target} already exists")
            old = _old_name(target)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike[str], mode: str = "w") -> Iterator[Any]:
    """Open a temporary sibling of `target` for writing; rename it over `target` when closed cleanly."""
    with atomic_path(target) as tmp, open(tmp, mode) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def to_json(data: Any, **options: Any) -> str:
    """`json.dumps` that writes non-finite floats as null and refuses to write bare NaN / Infinity."""
    return json.dumps(_finite(data), allow_nan=False, **options)


def _finite(data: Any) -> Any:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: _finite(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(value) for value in data]
    return data


def write_json(target: str | os.PathLike[str], data: Any) -> None:
    """Atomically write `data` as indented JSON."""
    with atomic_file(target) as handle:
        handle.write(to_json(data, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling path for writers that take a file name (safetensors' `save_file`)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(target), dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _publish_mode(Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
