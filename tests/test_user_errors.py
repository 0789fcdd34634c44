"""Mistakes that used to end in a traceback (issue 14, item 5): each is now one line naming the file or
field and what was expected, exit code 2, nothing written. (Recipe typos and a missing student.kind are
in test_recipe.BAD_RECIPES; read-only directories in test_preflight.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_linearize_safety import linearize, make_workspace, refusal, write_recipe
from test_merge import make_expert, make_seed, recipe_for, run_merge

import merge_xlstm.linearize.pipeline as pipeline
from merge_xlstm.cli import main as cli
from merge_xlstm.eval.sandbox import available_backends
from merge_xlstm.testing import tiny_teacher

CODE_FLAGS = [] if available_backends() else ["--allow-unsafe-code"]
DATE = "2026-01-01T00-00-00"


def results_file(folder: Path, results: object = None, **sections: object) -> Path:
    """A minimal lm-eval results file (task `t`, metric acc) with a per-document samples log beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {"results": {"t": {"acc,none": 0.5}} if results is None else results, "versions": {}, **sections}
    path = folder / f"results_{DATE}.json"
    path.write_text(json.dumps(data))
    (folder / f"samples_t_{DATE}.jsonl").write_text(
        "".join(json.dumps({"doc_id": i, "filter": "none", "acc": float(i % 2)}) + "\n" for i in range(4))
    )
    return path


def test_eval_output_pointing_at_a_file(tmp_path, capsys):
    output = tmp_path / "results.txt"
    output.write_text("not a directory")
    line = refusal(capsys, cli(["eval", str(tmp_path / "any-model"), "--suite", "stem", "--output", str(output)]))
    assert line == f"--output: {output} is a file; expected a directory (or a path where one can be created)"
    assert output.read_text() == "not a directory"


@pytest.mark.parametrize(
    ("samples", "expected"),
    [
        ('{"doc_id": 0, "acc": 1.0}\n{"doc_id": 1, "acc": \n', "line 2 is not JSON (Expecting value)"),
        ('{"doc_id": 0, "acc": 1.0}\n[1, 2]\n', "line 2: expected a JSON object with an integer doc_id"),
        ('{"doc_id": "zero", "acc": 1.0}\n', "line 1: expected a JSON object with an integer doc_id"),
        ("\x00\xff\xfe binary", "is not UTF-8 text; expected lm-eval's samples log (JSON lines)"),
    ],
)
def test_compare_on_a_malformed_samples_log(tmp_path, capsys, samples, expected):
    reference = results_file(tmp_path / "reference")
    candidate = results_file(tmp_path / "candidate")
    log = candidate.parent / f"samples_t_{DATE}.jsonl"
    log.write_bytes(samples.encode("latin-1"))
    line = refusal(capsys, cli(["compare", str(reference), str(candidate)]))
    assert line == f"{log}: {expected}", line


@pytest.mark.parametrize(
    ("results", "sections", "expected"),
    [
        ({"t": 0.5}, {}, "results.t: expected an object, got float"),
        (None, {"configs": []}, "configs: expected an object, got list"),
        (None, {"configs": {"t": {"metadata": "math"}}}, "configs.t.metadata: expected an object"),
        (None, {"group_subtasks": {"g": "t"}}, "group_subtasks.g: expected a list, got str"),
        (None, {"higher_is_better": {"t": True}}, "higher_is_better.t: expected an object, got bool"),
    ],
)
def test_compare_on_a_results_entry_of_the_wrong_type(tmp_path, capsys, results, sections, expected):
    reference = results_file(tmp_path / "reference")
    candidate = results_file(tmp_path / "candidate", results, **sections)
    line = refusal(capsys, cli(["compare", str(reference), str(candidate)]))
    assert line == f"{candidate}: {expected}", line


@pytest.mark.parametrize("place", ["under-a-file", "a-directory"])
def test_compare_plot_where_no_png_can_be_written(tmp_path, capsys, place):
    scores = tmp_path / "scores.json"
    scores.write_text('{"t": 0.5}')
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    plot = blocker / "c.png" if place == "under-a-file" else tmp_path
    line = refusal(capsys, cli(["compare", str(scores), str(scores), "--plot", str(plot)]))
    expected = f"cannot create {plot}: {blocker} is a file" if place == "under-a-file" else (
        f"{plot} is a directory; expected a file name")  # fmt: skip
    assert line == f"--plot: {expected}", line
    assert blocker.read_text() == "x"


def test_merge_into_a_directory_that_cannot_be_created(tmp_path, capsys):
    seed = make_seed(tmp_path / "seed")
    experts = [make_expert(seed, tmp_path / f"e{i}", i) for i in range(2)]
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    recipe = recipe_for(tmp_path, "linear", experts, [1, 1], output=str(blocker / "merged"))
    line = refusal(capsys, run_merge(tmp_path, recipe))
    assert line == f"{tmp_path / 'recipe.yaml'}: output: cannot create {blocker / 'merged'}: {blocker} is a file"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "is empty; expected JSON lines with documents"),
        (b"\n  \n", "is empty; expected JSON lines with documents"),
        (b"\x7fELF\x02\x01\x01\x00\x00\x00binary", "is not UTF-8 text (binary data at byte 7); expected JSON lines"),
        (b"text = 'not json'\n", ": line 1 is not a JSON object; expected JSON lines"),
    ],
    ids=["empty", "blank", "binary", "not-json"],
)
def test_an_empty_or_binary_data_file_names_the_recipe_and_the_source(tmp_path, capsys, monkeypatch, content,
                                                                      expected):  # fmt: skip
    monkeypatch.setattr(pipeline, "load_teacher", lambda *a, **k: pytest.fail("loaded the teacher first"))
    root = make_workspace(tmp_path)
    data = root / "code.jsonl"
    data.write_bytes(content)
    recipe = write_recipe(root, "code")
    line = refusal(capsys, linearize(recipe))
    assert line.startswith(f"{recipe}: data.sources[0]: {data}"), line
    assert line.endswith(expected), line
    assert not (root / "experts").exists()


@pytest.mark.parametrize("file", ["config.json", "tokenizer_config.json"])
@pytest.mark.parametrize("role", ["teacher", "eval-model", "merge-expert"])
def test_a_model_directory_asking_for_custom_code_is_refused(tmp_path, capsys, monkeypatch, role, file):
    monkeypatch.setattr(pipeline, "load_teacher", lambda *a, **k: pytest.fail("loaded the teacher first"))
    root = make_workspace(tmp_path)
    if role == "merge-expert":
        seed = make_seed(tmp_path / "seed")
        experts = [make_expert(seed, tmp_path / f"e{i}", i) for i in range(2)]
        model = experts[1]
        run = lambda: run_merge(tmp_path, recipe_for(tmp_path, "linear", experts, [1, 1]))  # noqa: E731
    else:
        model = root / "teacher"
        if role == "teacher":
            run = lambda: linearize(write_recipe(root, "code"))  # noqa: E731
        else:
            run = lambda: cli(["eval", str(model), "--suite", "ci", "--output", str(tmp_path / "r"), *CODE_FLAGS])  # noqa: E731
    config = json.loads((model / file).read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (model / file).write_text(json.dumps(config))
    (model / "modeling_evil.py").write_text("raise SystemExit('custom code ran')\n")
    line = refusal(capsys, run())
    assert line.startswith(f"{model}: {file}: auto_map asks to run Python code shipped with the model"), line
    assert "trust_remote_code stays off" in line
    assert not (tmp_path / "merged").exists() and not (tmp_path / "r").exists() and not (root / "experts").exists()


@pytest.mark.parametrize("role", ["seed", "merge-expert"])
def test_a_damaged_provenance_record_is_named(tmp_path, capsys, monkeypatch, role):
    monkeypatch.setattr(pipeline, "load_teacher", lambda *a, **k: pytest.fail("loaded the teacher first"))
    root = make_workspace(tmp_path)
    if role == "seed":
        model = root / "experts" / "seed"
        tiny_teacher("llama").save_pretrained(model)
        run = lambda: linearize(write_recipe(root, "code"))  # noqa: E731
    else:
        seed = make_seed(tmp_path / "seed")
        experts = [make_expert(seed, tmp_path / f"e{i}", i) for i in range(2)]
        model = experts[1]
        run = lambda: run_merge(tmp_path, recipe_for(tmp_path, "linear", experts, [1, 1]))  # noqa: E731
    (model / "merge_xlstm.json").write_text('{"kind": "seed", "seed_id": ')  # cut off mid-write
    line = refusal(capsys, run())
    assert line.startswith(f"{model}: merge_xlstm.json is not readable JSON ("), line
    assert not (tmp_path / "merged").exists() and not (root / "experts" / "code").exists()
