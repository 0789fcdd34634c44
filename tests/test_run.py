"""`merge-xlstm run` end to end on a tiny teacher and two tiny domains: merged model and report, a no-op
rerun, the dry-run plan, and kill -9 at every kind of step followed by a rerun giving the same bytes.

The reference run places its train and device steps in workers, two at a time (the per-GPU launcher,
with two GPUs pretended); the killed runs run every step in one process. Both must end in the same files.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from test_linearize_e2e import write_teacher_and_corpora
from transformers import AutoTokenizer

import merge_xlstm.mission.run as run_module
from merge_xlstm.cli import main as cli
from merge_xlstm.eval import sandbox
from merge_xlstm.linearize.pipeline import recipe_data, recipe_targets
from merge_xlstm.provenance import read_metadata
from merge_xlstm.recipe import load_linearize_recipe

SEQ_LEN, BATCH = 64, 4
STAGE1_STEPS, STAGE2_STEPS = 4, 6
REPORT = Path("reports") / "tiny"
STEPS = ["seed", "expert:math", "expert:code", "eval:teacher", "eval:math", "eval:code", "search", "merge:searched",
         "eval:merged", "report"]
# Files a finished run leaves that must not depend on how it got there (kills, workers or not).
RESULTS = [
    *(f"experts/{m}/model.safetensors" for m in ("seed", "math", "code", "merged")),
    "experts/merged/merge_xlstm.json",
    "experts/.run/search.json",
    *(str(REPORT / name) for name in ("report.md", "report.json", "compare.json", "scores.png", "c_alpha.png",
                                      "recovery.png", "weights.png", "training.png")),
    *(f"results/{m}/ci/merge_xlstm_run.json" for m in ("teacher", "experts__math", "experts__code", "experts__merged")),
]


def make_workspace(root: Path) -> Path:
    """Teacher, two domains (math with stored targets, code with online targets), their recipes, a pipeline."""
    root.mkdir(parents=True)
    write_teacher_and_corpora(root)
    for name in ("code", "math"):
        recipe = {
            "name": name, "teacher": "teacher",
            "student": {"kind": "hybrid", "mixer": "hybrid", "window_size": 16, "num_sink_tokens": 2},
            "data": {"sources": [{"path": f"{name}.jsonl"}], "seq_len": SEQ_LEN, "validation_fraction": 0.1},
            "stage1": {"tokens": SEQ_LEN * BATCH * STAGE1_STEPS, "batch_size": BATCH, "micro_batch_size": 2,
                       "warmup_steps": 1, "save_every": 2},
            "stage2": {"tokens": SEQ_LEN * BATCH * STAGE2_STEPS, "batch_size": BATCH, "micro_batch_size": 2,
                       "lr": 1e-3, "warmup_steps": 1, "top_k": 8, "save_every": 2,
                       "targets": "online" if name == "code" else "stored"},
            "seed": "experts/seed", "output": f"experts/{name}",
        }
        (root / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
    pipeline = {
        "name": "tiny",
        "domains": ["math.yaml", "code.yaml"],
        "merge": {"method": "linear", "fixed_weights": {"paper": {"math": 0.7, "code": 0.3}},
                  "search": {"rows_per_domain": 2, "step": 0.25, "min_step": 0.1, "max_evaluations": 8}},
        "eval": {"suites": ["ci"], "limit": 1, "batch_size": 1, "allow_unsafe_code": not sandbox.available_backends()},
        "report": {"output": str(REPORT)},
        "throughput": {"stage1": 512, "targets": 1024, "stage2": 256, "eval_docs": 0.5},
    }
    (root / "pipeline.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A finished run with two pretend GPUs (workers side by side) and the output it printed."""
    import io
    from contextlib import redirect_stdout

    root = make_workspace(tmp_path_factory.mktemp("reference") / "ws")
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setattr(run_module, "visible_gpus", lambda: ["0", "1"])
        with redirect_stdout(printed):
            code = cli(["run", "pipeline.yaml", "--set", "launcher=per_gpu"])
    assert code == 0, printed.getvalue()
    yield root, printed.getvalue()


def test_run_makes_the_merged_model_and_the_report(reference, capsys, monkeypatch):
    root, printed = reference
    assert re.search(r"merged model \(experts/merged\): alpha\* = \d\.\d{4} over 3 benchmarks .*report: "
                     + re.escape(str(REPORT / "report.md")), printed.strip().splitlines()[-1])
    for step in ("seed", "expert:math", "expert:code", "eval:teacher", "search"):  # ran in workers
        assert re.search(rf"{re.escape(step)}: started on GPU [01] ", printed), step
        assert (root / "experts" / ".run" / "logs" / f"{step.replace(':', '-')}.log").is_file()

    search = json.loads((root / "experts/.run/search.json").read_text())
    assert set(search["weightings"]) == {"searched", "uniform", "paper"}
    record = read_metadata(root / "experts" / "merged")
    assert record["kind"] == "merged" and record["method"] == "linear"
    weights = search["weightings"]["searched"]["weights"]
    assert [e["effective_weight"] for e in record["experts"]] == pytest.approx([weights["math"], weights["code"]])
    assert search["weightings"]["uniform"]["weights"] == {"math": 0.5, "code": 0.5}
    assert search["weightings"]["paper"]["weights"] == {"math": 0.7, "code": 0.3}
    assert not (root / "experts" / "merged-uniform").exists()  # scored on validation rows, not evaluated
    searched = search["weightings"]["searched"]
    assert searched["objective"] == min(e["objective"] for e in search["trace"])
    assert searched["objective"] <= search["weightings"]["uniform"]["objective"]

    report = json.loads((root / REPORT / "report.json").read_text())
    compare = json.loads((root / REPORT / "compare.json").read_text())
    merged = next(c for c in compare["candidates"] if c["candidate"] == "merged")
    assert report["summary"]["alpha_star"] == merged["alpha_star"]
    assert [c["candidate"] for c in compare["candidates"]] == ["math", "code", "merged"]
    assert set(report) == {"key", "name", "summary", "scores", "tolerance", "recovery", "weights", "training"}
    assert report["weights"]["weightings"]["searched"]["weights"] == searched["weights"]
    page = (root / REPORT / "report.md").read_text()
    for figure in ("scores.png", "c_alpha.png", "recovery.png", "weights.png", "training.png"):
        assert f"]({figure})" in page and (root / REPORT / figure).read_bytes()[:4] == b"\x89PNG"

    # stored targets for math's training rows, online ones (nothing on disk) for code's
    monkeypatch.chdir(root)
    for name, trained_from_disk in (("math", True), ("code", False)):
        recipe = load_linearize_recipe(f"{name}.yaml")
        directory = recipe_targets(recipe, recipe_data(recipe, AutoTokenizer.from_pretrained("teacher")))
        assert bool(list(directory.glob("train-*.safetensors"))) == trained_from_disk, name
        assert list(directory.glob("validation-*.safetensors")), name

    # a finished run is a no-op
    before = {name: (root / name).stat().st_mtime_ns for name in RESULTS}
    capsys.readouterr()
    assert cli(["run", "pipeline.yaml"]) == 0
    out = capsys.readouterr().out
    assert [line.split("] ")[1] for line in out.splitlines() if line.startswith("[")] == [f"{s}: done" for s in STEPS]
    assert {name: (root / name).stat().st_mtime_ns for name in RESULTS} == before


def test_dry_run_prints_plan_budget_and_time(reference, tmp_path, capsys, monkeypatch):
    fresh = make_workspace(tmp_path / "fresh")
    monkeypatch.chdir(fresh)
    assert cli(["run", ".", "--dry-run"]) == 0
    plan = capsys.readouterr().out
    # step, status, stage I, targets, stage II, eval docs, estimate ("2 s")
    rows = {line.split()[0]: [*line.split()[1:6], " ".join(line.split()[6:])]
            for line in plan.splitlines() if line.startswith("  ")}
    assert [name for name in rows if name not in ("step", "left")] == STEPS
    assert rows["seed"][0] == "todo" and all(rows[s][0] == "waiting" for s in STEPS if s.startswith(("expert", "search")))
    stage1 = SEQ_LEN * BATCH * STAGE1_STEPS  # 1,024 tokens
    rows2 = BATCH * STAGE2_STEPS
    validation = round(rows2 * 0.1)
    assert rows["seed"][1:] == ["1.0K", "-", "-", "-", "2 s"]  # 1,024 tokens at 512 tok/s
    # math stores its training targets, code computes them online: only its validation rows are stored
    assert rows["expert:math"][1:4] == ["-", f"{(rows2 + validation) * SEQ_LEN / 1000:.1f}K", "1.5K"]
    assert rows["expert:code"][1:4] == ["-", str(validation * SEQ_LEN), "1.5K"]
    assert rows["eval:teacher"][1:] == ["-", "-", "-", "3", "6 s"]  # 3 tasks of suite ci, limit 1, 0.5 docs/s
    assert not (fresh / "experts").exists()  # planning writes nothing

    monkeypatch.chdir(reference[0])
    assert cli(["run", ".", "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert all(f"  {s:<28} done" in plan for s in STEPS), plan
    assert "estimated: 0 s of device time" in plan


KILL_DRIVER = """
import importlib, os, signal, sys
module, attribute, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
owner = importlib.import_module(module)
*path, name = attribute.split(".")
for part in path:
    owner = getattr(owner, part)
real, calls = getattr(owner, name), []

def killed_after(*args, **kwargs):
    result = real(*args, **kwargs)
    calls.append(1)
    if len(calls) == nth:
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9: no exception handler, no cleanup runs
    return result

setattr(owner, name, killed_after)
from merge_xlstm.cli import main
sys.exit(main(["run", "pipeline.yaml"]))
"""
# (module, attribute, call after which the run is killed): one kill in each kind of step, in run order
KILLS = [
    ("merge_xlstm.linearize.training", "Checkpoint.save", 1),  # seed: stage I after its first checkpoint
    ("merge_xlstm.linearize.training", "Checkpoint.save", 1),  # expert:math, stage II after a checkpoint
    ("merge_xlstm.mission.steps", "write_json", 1),  # an evaluation: results written, not yet renamed
    ("merge_xlstm.merge.search", "InMemoryMerge.apply", 3),  # the search, at its third candidate
    ("merge_xlstm.merge.run", "write_metadata", 1),  # a merge: weights written, not yet renamed
    ("merge_xlstm.mission.report", "_save", 2),  # the report, between two figures
]


def test_kill_9_at_every_kind_of_step_then_rerun_gives_the_same_files(reference, tmp_path):
    root = make_workspace(tmp_path / "killed")
    for module, attribute, nth in KILLS:
        result = subprocess.run([sys.executable, "-c", KILL_DRIVER, module, attribute, str(nth)], cwd=root,
                                capture_output=True, text=True, timeout=600, check=False)
        assert result.returncode == -signal.SIGKILL, (module, attribute, result.stdout[-3000:], result.stderr[-3000:])
    final = subprocess.run([sys.executable, "-m", "merge_xlstm", "run", "pipeline.yaml"], cwd=root,
                           capture_output=True, text=True, timeout=600, check=False)
    assert final.returncode == 0, final.stderr[-3000:]
    progress = [line.split("] ")[1] for line in final.stdout.splitlines() if line.startswith("[")]
    assert progress[:-1] == [f"{s}: done" for s in STEPS[:-1]] + ["report: running"]  # only the report was left
    assert progress[-1].startswith("report: finished in ")
    for name in RESULTS:
        assert (root / name).read_bytes() == (reference[0] / name).read_bytes(), name
    merged = load_file(root / "experts/merged/model.safetensors")
    assert merged.keys() == load_file(reference[0] / "experts/merged/model.safetensors").keys()
    assert not list((root / "results" / "experts__merged").glob(".*tmp-*"))  # no leftover for compare to misread
    shutil.rmtree(root / "experts")


BAD_PIPELINES = {
    "unknown-key": ({"epochs": 3}, "epochs: unknown key"),
    "unknown-nested-key": ({"merge": {"serach": {}}}, "merge.serach: unknown key"),
    "missing-recipe": ({"domains": ["math.yaml", "nope.yaml"]}, "domains: no such recipe file: nope.yaml"),
    "weights-for-other-domains": ({"merge": {"fixed_weights": {"paper": {"math": 1.0, "stem": 1.0}}}},
                                  "merge.fixed_weights.paper: expected a weight for each domain (math, code)"),
    "weights-named-like-a-built-in": ({"merge": {"fixed_weights": {"uniform": {"math": 1.0, "code": 1.0}}}},
                                      "merge.fixed_weights: 'uniform' is the name of a built-in weighting"),
    "evaluate-unknown-weighting": ({"merge": {"evaluate": ["searched", "nightly"]}},
                                   "merge: evaluate: unknown weighting 'nightly' (known: searched, uniform, paper)"),
    "unknown-suite": ({"eval": {"suites": ["ci", "poetry"]}}, "eval.suites: unknown suite 'poetry' (known: chat, ci,"),
    "unknown-objective": ({"merge": {"search": {"objective": "vibes"}}},
                          "merge.search.objective: unknown search objective 'vibes' (known: validation_ce,"),
    "unsearchable-method": ({"merge": {"method": "ties"}}, "merge.method: unknown searchable merge method 'ties'"),
    "lambdas-for-linear": ({"merge": {"search": {"lambdas": [1.0, 2.0]}}},
                           "merge.search.lambdas: method linear has no scaling to search"),
    "accelerate-without-command": ({"launcher": "accelerate"}, "launch_command: launcher accelerate needs it"),
}


@pytest.mark.parametrize("case", sorted(BAD_PIPELINES))
def test_bad_pipeline_is_one_line_naming_file_and_field(case, tmp_path, monkeypatch, capsys):
    root = make_workspace(tmp_path / "ws")
    monkeypatch.chdir(root)
    pipeline = yaml.safe_load((root / "pipeline.yaml").read_text())
    edit, expected = BAD_PIPELINES[case]
    for key, value in edit.items():
        pipeline[key] = {**pipeline[key], **value} if isinstance(value, dict) and key in pipeline else value
    (root / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    capsys.readouterr()  # the workspace's own progress bars
    assert cli(["run", "pipeline.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"merge-xlstm: error: pipeline.yaml: {expected}") and "\n" not in err, err
    assert not (root / "experts").exists()


def test_domains_must_grow_from_one_seed(tmp_path, monkeypatch, capsys):
    root = make_workspace(tmp_path / "ws")
    monkeypatch.chdir(root)
    code = yaml.safe_load((root / "code.yaml").read_text())
    (root / "code.yaml").write_text(yaml.safe_dump({**code, "seed": "experts/other-seed"}))
    capsys.readouterr()
    assert cli(["run", ".", "--dry-run"]) == 2
    assert "pipeline.yaml: domains: code and math differ in seed" in capsys.readouterr().err


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("pipeline", "merges"), [("recipes/pipeline.yaml", 3), ("recipes/demo.yaml", 1),
                                                  ("bench/mission_smollm2.yaml", 2)])
def test_shipped_pipelines_plan_the_whole_mission(pipeline, merges, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(run_module, "visible_gpus", lambda: ["0", "1"])
    assert cli(["run", pipeline, "--dry-run"]) == 0
    plan = capsys.readouterr().out
    names = [line.split()[0] for line in plan.splitlines() if line.startswith("  ") and line.split()[0] not in ("step", "left")]
    domains = ["math", "code", "stem", "chat"]
    assert names[:5] == ["seed", *(f"expert:{d}" for d in domains)]
    assert names.count("search") == 1 and sum(n.startswith("merge:") for n in names) == merges
    assert {f"eval:{d}" for d in ["teacher", *domains]} <= set(names) and names[-1] == "report"
    assert f"launcher {yaml.safe_load((REPO / pipeline).read_text()).get('launcher', 'auto')} on 2 GPUs" in plan


def test_report_summary_checks_the_goals_on_known_scores(tmp_path, monkeypatch):
    """alpha* and the in-domain retention of the merged model, on scores whose answers are known."""
    from merge_xlstm.eval.compare import DEFAULT_ALPHAS, compare
    from merge_xlstm.eval.scores import ScoreTable, TaskScore
    from merge_xlstm.mission.report import SECTIONS, ReportData
    from merge_xlstm.mission.spec import load_mission

    root = make_workspace(tmp_path / "ws")
    monkeypatch.chdir(root)
    mission = load_mission("pipeline.yaml")
    domains = {"gsm": "math", "math": "math", "humaneval": "code", "mbpp": "code"}

    def table(label: str, scores: list[float]) -> ScoreTable:
        return ScoreTable(label, {t: TaskScore(s, d, None, None) for (t, d), s in zip(domains.items(), scores)})

    scores = {"teacher": table("teacher", [0.40, 0.20, 0.30, 0.50]),
              "math": table("math", [0.44, 0.18, 0.20, 0.40]),
              "code": table("code", [0.30, 0.10, 0.33, 0.50]),
              "merged": table("merged", [0.42, 0.19, 0.30, 0.40])}
    document = {"reference": "teacher", "alphas": list(DEFAULT_ALPHAS),
                "candidates": [compare(scores["teacher"], t, DEFAULT_ALPHAS) for n, t in scores.items() if n != "teacher"]}
    data = ReportData(mission, scores, document, {}, {})
    lines, summary = SECTIONS.get("summary").build(data, tmp_path)
    # merged vs teacher: critical tolerances 0, 0.05, 0, 0.2 -> alpha* is the 2nd smallest: 0
    assert summary["alpha_star"] == 0.0 and summary["reached"]["alpha_star"]
    # math: merged (0.42 + 0.19) / 2 vs expert (0.44 + 0.18) / 2 = 0.984; code: 0.35 vs 0.415 = 0.843
    assert summary["in_domain"]["math"]["ratio"] == pytest.approx(0.305 / 0.31)
    assert summary["in_domain"]["math"]["met"] and not summary["in_domain"]["code"]["met"]
    assert not summary["reached"]["in_domain"]
    assert summary["expert_own_c_0"] == {"math": 0.5, "code": 1.0}  # math wins gsm, loses math; code wins both
    assert "alpha\\* = 0.0000" in lines[0] and "not met" in lines[-2]


def test_report_training_section_shows_layers_without_a_gate(tmp_path, monkeypatch):
    """An expert whose memory_layers leave layer 0 without a gate: "-" in the table, a gap in the plot."""
    from merge_xlstm.mission.report import SECTIONS, ReportData
    from merge_xlstm.mission.spec import load_mission

    root = make_workspace(tmp_path / "ws")
    monkeypatch.chdir(root)
    metrics = [{"stage": "stage1", "tokens": 64, "loss": 0.5}, {"stage": "stage2", "tokens": 64, "loss": 2.0}]
    expert = {"provenance": {"output_gate_medians": [None, 0.25, 0.5]}, "metrics": metrics}
    data = ReportData(load_mission("pipeline.yaml"), {}, {"candidates": []}, {}, {"code": expert})
    lines, json_data = SECTIONS.get("training").build(data, tmp_path)
    assert json_data["code"]["output_gate_medians"] == [None, 0.25, 0.5]
    assert any(line.endswith("| - 0.25 0.50 |") for line in lines), lines
    assert (tmp_path / "training.png").stat().st_size > 0


def test_a_gpu_launcher_without_gpus_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    root = make_workspace(tmp_path / "ws")
    monkeypatch.chdir(root)
    monkeypatch.setattr(run_module, "visible_gpus", lambda: [])
    capsys.readouterr()
    assert cli(["run", "pipeline.yaml", "--set", "launcher=per_gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("merge-xlstm: error: pipeline.yaml: launcher: launcher per_gpu places seed on a GPU and none is "
                   "visible; use launcher inprocess (or auto)")
    assert not (root / "experts").exists()


@pytest.mark.parametrize(("seed_data", "sources"), [("all", {"math.jsonl": 0.5, "extra.jsonl": 0.5, "code.jsonl": 1.0}),
                                                    ("first", {"math.jsonl": 1.0, "extra.jsonl": 1.0})])
def test_the_seed_reads_every_domains_data_unless_told_first(seed_data, sources, tmp_path, monkeypatch):
    """The seed step builds the seed from the first recipe with every domain's sources, each domain an
    equal share (a math recipe with two sources gives each half the weight of code's one)."""
    from merge_xlstm.mission import plan
    from merge_xlstm.mission.spec import load_mission

    root = make_workspace(tmp_path / "ws")
    (root / "extra.jsonl").write_text((root / "math.jsonl").read_text())
    math = yaml.safe_load((root / "math.yaml").read_text())
    math["data"]["sources"].append({"path": "extra.jsonl"})
    (root / "math.yaml").write_text(yaml.safe_dump(math))
    monkeypatch.chdir(root)
    built: list = []
    monkeypatch.setattr(plan, "build_seed", lambda recipe, device=None: built.append(recipe))
    mission = load_mission("pipeline.yaml", [f"seed_data={seed_data}"])
    seed_step = plan.build_steps(mission, "cpu")[0]
    seed_step.run("")  # the key only decides whether the step is done
    (recipe,) = built
    assert {s.path: s.weight for s in recipe.data.sources} == sources
    assert recipe.model_dump(exclude={"data"}) == mission.first.model_dump(exclude={"data"})
