"""The `merge-xlstm` command line: help texts, and user mistakes as one stderr line with exit code 2.

A CLI process that does work imports torch and transformers, several seconds each on a small CI
machine (`--help` does not: the package is light to import). So the real process runs for --help and a
few representative mistakes, concurrently; the full list of mistakes goes through the same `cli.main`
in-process, where an escaping exception would fail the test just as a traceback would.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_recipe import BAD_RECIPES, write_recipe

from merge_xlstm import cli

SUBCOMMANDS = ("linearize", "merge", "eval", "compare", "run")
# one mistake per layer that reports it: the YAML parser, the pydantic schema, --set parsing
END_TO_END_CASES = ("malformed-yaml", "unknown-nested-key", "set-bad-yaml")


Completed = subprocess.CompletedProcess[str]


def run_cli(*args: str) -> Completed:
    """`python -m merge_xlstm ARGS` as a user runs it (same interpreter, inherited offline env)."""
    return subprocess.run(
        [sys.executable, "-m", "merge_xlstm", *args], capture_output=True, text=True, timeout=300, check=False
    )


def linearize_args(case: str, directory: Path) -> tuple[Path, list[str]]:
    recipe, overrides, _ = BAD_RECIPES[case]
    path = write_recipe(directory, recipe)
    return path, ["linearize", str(path), *(arg for value in overrides for arg in ("--set", value))]


def assert_one_line_error(stderr: str, path: Path, expected: str) -> None:
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"merge-xlstm: error: {path}: {expected}"), lines[0]


@pytest.fixture(scope="module")
def processes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path | None, Completed]]:
    """Every subprocess this module checks, started together so their start-up costs overlap."""
    jobs: dict[str, tuple[Path | None, list[str]]] = {"--help": (None, ["--help"])}
    for case in END_TO_END_CASES:
        jobs[case] = linearize_args(case, tmp_path_factory.mktemp(case))
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {name: pool.submit(run_cli, *args) for name, (_, args) in jobs.items()}
        return {name: (jobs[name][0], future.result()) for name, future in futures.items()}


def test_help_lists_the_subcommands(processes) -> None:
    _, result = processes["--help"]
    assert result.returncode == 0, result.stderr
    listed = result.stdout.split("positional arguments:")[1]
    assert all(command in listed for command in SUBCOMMANDS), result.stdout


def test_help_imports_neither_torch_nor_transformers() -> None:
    """`merge-xlstm --help` must answer at once: building every parser loads no heavy library."""
    probe = (
        "import sys; from merge_xlstm import cli; cli.build_parser(); "
        "heavy = sorted({'torch', 'transformers', 'lm_eval', 'xlstm', 'datasets'} & set(sys.modules)); "
        "print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "", result.stdout


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_each_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: merge-xlstm {command}")


@pytest.mark.parametrize("case", END_TO_END_CASES)
def test_bad_recipe_process_exits_2_with_one_line(case: str, processes) -> None:
    path, result = processes[case]
    assert result.returncode == 2, result.stderr
    assert_one_line_error(result.stderr, path, BAD_RECIPES[case][2])


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipe_exits_2_with_one_line(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, args = linearize_args(case, tmp_path)
    assert cli.main(args) == 2
    assert_one_line_error(capsys.readouterr().err, path, BAD_RECIPES[case][2])


def test_missing_recipe_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    assert cli.main(["linearize", str(missing)]) == 2
    assert_one_line_error(capsys.readouterr().err, missing, "no such recipe file")


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """argparse's own mistakes (unknown subcommand) keep its exit code 2 and usage line."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(["linearise", "recipes/code.yaml"])
    assert exit_.value.code == 2
    assert "invalid choice: 'linearise'" in capsys.readouterr().err
