"""Checks before any expensive work (issue 14, item 4): writable outputs, complete safetensors, finite merge
inputs, meaningful merge weights, budgets against free memory and disk. Every refusal is one line naming the
file and field, exit code 2, no traceback, nothing written, and (for linearize) the teacher never loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from test_linearize_safety import linearize, make_workspace, refusal, write_recipe
from test_merge import make_expert, make_seed, recipe_for, run_merge

import merge_xlstm.linearize.pipeline as pipeline
import merge_xlstm.linearize.preflight as linearize_preflight
import merge_xlstm.preflight as preflight
from merge_xlstm.cli import main as cli
from merge_xlstm.digests import content_digest
from merge_xlstm.eval.sandbox import available_backends
from merge_xlstm.model_files import tensor_shapes
from merge_xlstm.provenance import write_metadata
from merge_xlstm.recipe import load_linearize_recipe
from merge_xlstm.teacher import cache_dir
from merge_xlstm.testing import tiny_teacher

CODE_FLAGS = [] if available_backends() else ["--allow-unsafe-code"]


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A teacher and a corpus; loading the teacher fails the test (every refusal here comes before it)."""

    def must_not_load(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the refusal")

    monkeypatch.setattr(pipeline, "load_teacher", must_not_load)
    return make_workspace(tmp_path)


# ------------------------------------------------------------------------------ writable dirs
@pytest.mark.parametrize("field", ["output", "seed"])
def test_an_unwritable_output_or_seed_is_refused_before_the_teacher_loads(workspace, capsys, field):
    blocker = workspace / "a-file"
    blocker.write_text("not a directory")
    recipe = write_recipe(workspace, "code")
    code = linearize(recipe, f"{field}={blocker / 'dir'}")
    assert refusal(capsys, code) == f"{recipe}: {field}: cannot create {blocker / 'dir'}: {blocker} is a file"
    assert not (workspace / "experts").exists()


def _read_only_command(directory: Path, argv: list[str]) -> list[str]:
    """`argv` run with `directory` read-only: a read-only bind mount for root (whom no mode stops), else 0555."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        return argv
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(directory), *argv]


def test_read_only_output_directories_are_refused_up_front(tmp_path):
    """Real processes, real read-only directories: linearize's output, merge's output, compare's --plot."""
    root = make_workspace(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    seed = make_seed(tmp_path / "merge-seed")
    expert = make_expert(seed, tmp_path / "expert", 0)
    merge_recipe = tmp_path / "merge.yaml"
    merge_recipe.write_text(yaml.safe_dump({"experts": [{"path": str(expert)}], "output": str(locked / "merged")}))
    scores = tmp_path / "scores.json"
    scores.write_text('{"task": 0.5}')
    linearize_recipe = write_recipe(root, "code")
    python = [sys.executable, "-m", "merge_xlstm"]
    cases = {
        f"{linearize_recipe}: output": ["linearize", str(linearize_recipe), "--set", f"output={locked / 'code'}"],
        f"{merge_recipe}: output": ["merge", str(merge_recipe)],
        "--plot": ["compare", str(scores), str(scores), "--plot", str(locked / "c.png")],
    }
    try:
        with ThreadPoolExecutor(max_workers=len(cases)) as pool:
            runs = {where: pool.submit(subprocess.run, _read_only_command(locked, [*python, *argv]),
                                       capture_output=True, text=True, timeout=300) for where, argv in cases.items()}
            done = {where: run.result() for where, run in runs.items()}  # fmt: skip
    finally:
        locked.chmod(0o755)
    for where, result in done.items():
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr, result.stderr
        (line,) = [x for x in result.stderr.splitlines() if "merge-xlstm: error:" in x]
        assert line == f"merge-xlstm: error: {where}: cannot write to {locked} (read-only or no permission)", line
    assert list(locked.iterdir()) == []


# ------------------------------------------------------------------------------ damaged weights
def damage(weights: Path, how: str) -> None:
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if how == "truncated" else b"\x00" * 8 + data[8:])


def fake_seed(root: Path, recipe: Path) -> Path:
    """A seed directory that matches the recipe's teacher and student (so only its weights can be wrong)."""
    loaded = load_linearize_recipe(recipe)
    seed = Path(loaded.seed)
    tiny_teacher("llama").save_pretrained(seed)
    digest = content_digest(root / "teacher", cache_dir())
    write_metadata(seed, {"kind": "seed", "seed_key": pipeline.seed_key(loaded, digest), "teacher_digest": digest,
                          "seed_id": "x", "stage1": None, "tokens": {"stage1": 0}})  # fmt: skip
    return seed


@pytest.mark.parametrize("how", ["truncated", "corrupt-header"])
@pytest.mark.parametrize("role", ["teacher", "seed", "merge-expert", "eval-model"])
def test_a_truncated_or_corrupt_safetensors_file_is_named(workspace, tmp_path, capsys, role, how):
    recipe = write_recipe(workspace, "code")
    if role == "teacher":
        weights, run = workspace / "teacher" / "model.safetensors", lambda: linearize(recipe)
    elif role == "seed":
        weights, run = fake_seed(workspace, recipe) / "model.safetensors", lambda: linearize(recipe)
    elif role == "merge-expert":
        seed = make_seed(tmp_path / "seed")
        experts = [make_expert(seed, tmp_path / f"e{i}", i) for i in range(2)]
        weights = experts[1] / "model.safetensors"
        run = lambda: run_merge(tmp_path, recipe_for(tmp_path, "linear", experts, [1, 1]))  # noqa: E731
    else:
        weights = workspace / "teacher" / "model.safetensors"
        run = lambda: cli(["eval", str(workspace / "teacher"), "--suite", "ci", "--output", str(tmp_path / "r"),  # noqa: E731
                           *CODE_FLAGS])  # fmt: skip
    damage(weights, how)
    line = refusal(capsys, run())
    assert line.startswith(f"{weights}: not a complete safetensors file ("), line
    assert line.endswith("); truncated or corrupt?"), line
    assert not (tmp_path / "merged").exists() and not (tmp_path / "r").exists()
    assert not (workspace / "experts" / "code").exists()


def test_flipped_bytes_that_decode_to_nan_are_refused_before_merging(tmp_path, capsys):
    seed = make_seed(tmp_path / "seed")
    experts = [make_expert(seed, tmp_path / f"e{i}", i) for i in range(2)]
    weights = experts[1] / "model.safetensors"
    name = sorted(tensor_shapes(weights))[3]
    data = bytearray(weights.read_bytes())
    header = struct.unpack("<Q", data[:8])[0]
    begin = json.loads(data[8 : 8 + header])[name]["data_offsets"][0]
    data[8 + header + begin : 8 + header + begin + 4] = struct.pack("<f", float("nan"))  # a well-formed file
    weights.write_bytes(bytes(data))
    line = refusal(capsys, run_merge(tmp_path, recipe_for(tmp_path, "linear", experts, [1, 1])))
    assert line == (f"{weights}: tensor {name} holds NaN or infinite values; a corrupt or diverged model cannot be "
                    "merged")  # fmt: skip
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize(
    ("method", "weights", "parameters", "expected"),
    [
        ("task_arithmetic", [0, 0], {}, "experts.*.weight: every expert's weight is 0, so the merge returns the "
                                       "base unchanged"),
        ("linear", [0, 0], {}, "experts.*.weight: every expert's weight is 0, so the merge is 0/0"),
        ("task_arithmetic", [1, 1], {"lambda": 0}, "parameters.lambda: lambda 0 scales every task vector away"),
    ],
)  # fmt: skip
def test_merge_weights_that_make_the_merge_meaningless_are_refused(tmp_path, capsys, method, weights, parameters,
                                                                   expected):  # fmt: skip
    seed = make_seed(tmp_path / "seed")
    experts = [make_expert(seed, tmp_path / f"e{i}", i) for i in range(2)]
    recipe = recipe_for(tmp_path, method, experts, weights, base=seed, parameters=parameters)
    line = refusal(capsys, run_merge(tmp_path, recipe))
    assert line.startswith(f"{tmp_path / 'recipe.yaml'}: {expected}"), line
    assert not (tmp_path / "merged").exists()


def test_memory_layers_the_teacher_lacks_are_refused_before_the_teacher_loads(workspace, capsys):
    recipe = write_recipe(workspace, "code")
    line = refusal(capsys, linearize(recipe, "student.memory_layers=[1, 2]"))
    assert line == f"{recipe}: student: memory_layers: the teacher has 2 layers (0..1), got [2]"
    assert not (workspace / "experts").exists()


# ------------------------------------------------------------------------------ budgets
def test_a_token_budget_beyond_memory_is_refused_before_the_teacher_loads(workspace, capsys):
    recipe = write_recipe(workspace, "code")
    line = refusal(capsys, linearize(recipe, "stage2.tokens=100000000000"))
    loaded = load_linearize_recipe(recipe, ["stage2.tokens=100000000000"])
    packed = (max(linearize_preflight.training_rows(loaded)) + linearize_preflight.validation_rows(loaded)) * 64
    needed = packed * linearize_preflight.PACKING_BYTES_PER_TOKEN / preflight.GB
    assert line.startswith(f"{recipe}: stage2.tokens: packing {packed:,} tokens needs about {needed:.3g} GB of "
                           "memory, "), line  # fmt: skip
    assert line.endswith(" GB are available"), line
    assert not (workspace / "experts").exists()


def test_a_budget_beyond_free_disk_is_refused_before_the_teacher_loads(workspace, capsys, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    recipe = write_recipe(workspace, "code")
    line = refusal(capsys, linearize(recipe))
    assert line.startswith(f"{recipe}: stage2.tokens: needs about "), line
    assert "top-8 targets" in line and "stage-II checkpoint and expert" in line and line.endswith("GB free")
    assert not (workspace / "experts").exists()


def test_a_seed_only_run_asks_for_the_seeds_disk_not_stage_twos(workspace, capsys, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    recipe = write_recipe(workspace, "code")
    line = refusal(capsys, cli(["linearize", str(recipe), "--seed-only"]))
    assert "packed rows" in line and "seed" in line, line
    assert "targets" not in line and "stage-II" not in line, line
    assert not (workspace / "experts").exists()
