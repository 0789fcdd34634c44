"""Checks that run before expensive work: can the outputs be written, do disk and memory suffice?

A run that loads a teacher, tokenises data and trains for an hour must not end in a traceback because
its output directory turned out to be read-only or the disk filled up. These checks look at the file
system alone (nothing is created), and each failure is one :class:`UserError` naming the directory
or the recipe field to change.
"""

from __future__ import annotations

import os
import shutil
from collections import defaultdict
from pathlib import Path

from merge_xlstm.errors import UserError

GB = 1 << 30


def _nearest_existing(path: Path) -> Path:
    return next(p for p in (path, *path.parents) if p.exists())


def check_writable_dir(path: str | os.PathLike[str], where: str) -> None:
    """`path` is a directory, or can be created as one, in a place this process may write to."""
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file; expected a directory (or a path where one can be created)", where=where)
    _check_creatable(path, where)


def check_writable_file(path: str | os.PathLike[str], where: str) -> None:
    """`path` is a file, or can be created as one, in a directory this process may write to."""
    path = Path(path).absolute()
    if path.is_dir():
        raise UserError(f"{path} is a directory; expected a file name", where=where)
    _check_creatable(path, where)


def _check_creatable(path: Path, where: str) -> None:
    # Writes go to a temporary sibling in the parent (or in the nearest ancestor, once created).
    ancestor = _nearest_existing(path.parent)
    if not ancestor.is_dir():
        raise UserError(f"cannot create {path}: {ancestor} is a file", where=where)
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {ancestor} (read-only or no permission)", where=where)


def check_free_disk(needs: list[tuple[Path, int, str]], where: str) -> None:
    """Each (directory, bytes, what) fits the free space of its file system, all needs of one added up."""
    by_device: dict[int, list[tuple[Path, int, str]]] = defaultdict(list)
    for directory, size, what in needs:
        existing = _nearest_existing(Path(directory).absolute())
        by_device[existing.stat().st_dev].append((existing, size, what))
    for entries in by_device.values():
        total = sum(size for _, size, _ in entries)
        free = shutil.disk_usage(entries[0][0]).free
        if total > free:
            parts = ", ".join(f"{what} {size / GB:.3g} GB" for _, size, what in entries if size)
            raise UserError(f"needs about {total / GB:.3g} GB of disk ({parts}) but {entries[0][0]} has "
                            f"{free / GB:.3g} GB free", where=where)  # fmt: skip


def available_memory() -> int:
    """Bytes of memory a new allocation can get now (MemAvailable: free plus reclaimable cache)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_free_memory(size: int, what: str, where: str) -> None:
    """`size` bytes for `what` fit the memory available now."""
    free = available_memory()
    if size > free:
        raise UserError(f"{what} needs about {size / GB:.3g} GB of memory, {free / GB:.3g} GB are available",
                        where=where)  # fmt: skip
