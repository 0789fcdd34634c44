"""Litter and permissions (issue 14, item 6): what a killed write leaves behind is removed by the next
write of the same target (only our own temporaries, only of dead processes), and what is written gets
the modes the umask gives, like any file the user creates.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys

import pytest
from test_merge import make_expert, make_seed, recipe_for, run_merge

from merge_xlstm.io import remove_stale_temporaries, to_json, write_json

KILLED_WRITER = """
import os, signal, sys
from merge_xlstm.io import atomic_dir
with atomic_dir(sys.argv[1]) as tmp:
    (tmp / "model.safetensors").write_bytes(b"x" * 100_000)
    os.kill(os.getpid(), signal.SIGKILL)  # kill -9 in the middle of the final write
"""


def dead_pid() -> int:
    """The PID of a process that has exited (and was reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_write_is_removed_by_the_next_write_of_its_target(tmp_path, capsys):
    target = tmp_path / "merged"
    killed = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)])
    assert killed.wait() == -signal.SIGKILL
    (litter,) = tmp_path.glob(".merged.tmp-*")
    assert litter.name.startswith(f".merged.tmp-{killed.pid}-")
    assert (litter / "model.safetensors").stat().st_size == 100_000 and not target.exists()
    live = tmp_path / f".merged.tmp-{os.getpid()}-writing"  # a writer that is still running
    foreign = [tmp_path / ".merged.tmp-notapid", tmp_path / f".other.tmp-{dead_pid()}-x", tmp_path / ".merged.txt"]
    for path in (live, *foreign):
        path.mkdir()

    seed = make_seed(tmp_path / "seed")
    experts = [make_expert(seed, tmp_path / f"e{i}", i) for i in range(2)]
    assert run_merge(tmp_path, recipe_for(tmp_path, "linear", experts, [1, 1])) == 0
    assert target.is_dir() and not litter.exists()
    assert live.is_dir() and all(path.is_dir() for path in foreign)  # not ours to remove


def test_an_overwrite_killed_between_its_renames_is_undone(tmp_path):
    target = tmp_path / "checkpoint"
    moved_aside = tmp_path / f".checkpoint.old-{dead_pid()}"  # the previous version, target not yet replaced
    moved_aside.mkdir()
    (moved_aside / "state.json").write_text("{}")
    remove_stale_temporaries(target)
    assert (target / "state.json").read_text() == "{}" and not moved_aside.exists()

    again = tmp_path / f".checkpoint.old-{dead_pid()}"  # killed after the new target was in place
    again.mkdir()
    remove_stale_temporaries(target)
    assert not again.exists() and (target / "state.json").is_file()


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_written_directories_and_files_get_their_modes_from_the_umask(tmp_path, umask):
    seed = make_seed(tmp_path / "seed")
    experts = [make_expert(seed, tmp_path / f"e{i}", i) for i in range(2)]
    previous = os.umask(umask)
    try:
        assert run_merge(tmp_path, recipe_for(tmp_path, "linear", experts, [1, 1])) == 0
        write_json(tmp_path / "record.json", {"a": 1})
    finally:
        os.umask(previous)
    merged = tmp_path / "merged"
    assert stat.S_IMODE(merged.stat().st_mode) == 0o777 & ~umask
    files = [*merged.iterdir(), tmp_path / "record.json"]
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o666 & ~umask for p in files}


def test_json_is_written_without_bare_nan_or_infinity(tmp_path):
    record = {"loss": float("nan"), "ppl": float("inf"), "rows": [1.5, float("-inf")], "name": "NaN"}
    write_json(tmp_path / "record.json", record)
    text = (tmp_path / "record.json").read_text()
    assert json.loads(text, parse_constant=lambda token: pytest.fail(f"{token} in {text}")) == {
        "loss": None, "ppl": None, "rows": [1.5, None], "name": "NaN"
    }  # fmt: skip
    assert to_json({"x": float("nan")}) == '{"x": null}'
