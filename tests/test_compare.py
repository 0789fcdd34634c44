"""C_alpha / alpha* on hand-made tables with known answers, brute force, and `compare` on real lm-eval output."""

from __future__ import annotations

import json
import random
from fractions import Fraction

import numpy as np
import pytest
import yaml

from merge_xlstm.cli import main as cli
from merge_xlstm.errors import UserError
from merge_xlstm.eval import sandbox, tolerance
from merge_xlstm.eval.compare import compare
from merge_xlstm.eval.scores import ScoreTable, TaskScore, load_scores
from merge_xlstm.testing import tiny_teacher, tiny_tokenizer


def table(label: str, scores: dict[str, float], domain: str = "other") -> ScoreTable:
    return ScoreTable(label, {task: TaskScore(score, domain, None, None) for task, score in scores.items()})


def critical(teacher: list[float], student: list[float]) -> list[Fraction]:
    return [tolerance.critical_alpha(s, t) for s, t in zip(student, teacher, strict=True)]


# ----------------------------------------------------------------------------- known answers
def test_a_tie_at_the_tolerance_counts_as_a_win_where_floats_would_say_no():
    assert not 0.3 >= (1 - 0.25) * 0.4  # the floating-point trap
    alpha_b = tolerance.critical_alpha(0.3, 0.4)
    assert alpha_b == Fraction(1, 4)
    assert tolerance.c_alpha([alpha_b], 0.25) == 1
    assert tolerance.c_alpha([alpha_b], 0.2499) == 0


def test_even_number_of_benchmarks_with_ties():
    crit = critical([0.5, 0.4, 0.3, 0.2], [0.5, 0.3, 0.3, 0.1])  # alpha_b = 0, 1/4, 0, 1/2
    assert crit == [0, Fraction(1, 4), 0, Fraction(1, 2)]
    assert tolerance.c_alpha(crit, 0) == Fraction(1, 2)  # two of four tie: lossless already
    assert tolerance.alpha_star(crit) == 0

    crit = critical([0.5, 0.4, 0.3, 0.2], [0.45, 0.3, 0.15, 0.1])  # 1/10, 1/4, 1/2, 1/2
    assert tolerance.alpha_star(crit) == Fraction(1, 4)
    assert tolerance.c_alpha(crit, 0.25) == Fraction(1, 2)
    assert tolerance.c_alpha(crit, 0.2499) == Fraction(1, 4)


def test_odd_number_of_benchmarks_needs_a_strict_majority():
    crit = critical([1.0, 1.0, 1.0], [0.9, 0.8, 0.7])  # 1/10, 1/5, 3/10
    assert tolerance.alpha_star(crit) == Fraction(1, 5)  # ceil(3/2) = 2 benchmarks
    assert tolerance.c_alpha(crit, 0.2) == Fraction(2, 3)
    assert tolerance.c_alpha(crit, 0.19) == Fraction(1, 3)
    crit5 = critical([1.0] * 5, [0.9, 0.5, 0.8, 0.6, 0.7])
    assert tolerance.alpha_star(crit5) == Fraction(3, 10)  # the 3rd smallest of .1 .2 .3 .4 .5


def test_zero_teacher_score_is_always_matched():
    assert tolerance.critical_alpha(0.0, 0.0) == 0
    assert tolerance.critical_alpha(0.2, 0.0) == 0
    report = compare(table("t", {"a": 0.0, "b": 0.5}), table("s", {"a": 0.0, "b": 0.25}), [0.0])
    assert report["tasks"]["a"]["ratio"] is None and report["tasks"]["a"]["critical_alpha"] == 0
    assert report["tasks"]["b"]["critical_alpha"] == 0.5
    assert report["alpha_star"] == 0 and report["lossless"] and report["c_alpha"] == {"0": 0.5}


def test_student_above_teacher():
    report = compare(table("t", {"a": 0.4, "b": 0.6, "c": 0.5}), table("s", {"a": 0.6, "b": 0.7, "c": 0.1}), [0.1])
    assert report["tasks"]["a"]["ratio"] == pytest.approx(1.5)
    assert report["tasks"]["a"]["critical_alpha"] == 0
    assert report["lossless"] and report["alpha_star"] == 0 and report["tolerant"]
    assert report["c_alpha"] == {"0.1": pytest.approx(2 / 3)}


def test_a_student_with_zero_score_passes_only_at_full_tolerance():
    crit = critical([0.5, 0.5], [0.0, 0.0])
    assert crit == [1, 1] and tolerance.alpha_star(crit) == 1


def test_negative_or_missing_scores_are_refused():
    with pytest.raises(ValueError, match=">= 0"):
        tolerance.critical_alpha(-0.1, 0.5)
    with pytest.raises(UserError, match="a: scores must be finite"):
        compare(table("t", {"a": float("nan")}), table("s", {"a": 0.5}), [0.0])
    with pytest.raises(UserError, match="no task in common"):
        compare(table("t", {"a": 0.5}), table("s", {"b": 0.5}), [0.0])


@pytest.mark.parametrize("seed", range(40))
def test_alpha_star_and_c_alpha_agree_with_brute_force_on_a_fine_grid(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    levels = [0.0, 0.05, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 0.8, 1.0]  # few values: many ties
    teacher = [rng.choice(levels) for _ in range(n)]
    student = [rng.choice(levels) if rng.random() < 0.8 else t for t in teacher]
    crit = critical(teacher, student)

    step = Fraction(1, 2000)
    grid = [i * step for i in range(2001)]

    def brute(alpha: Fraction) -> Fraction:  # the definition, in exact arithmetic
        wins = sum(Fraction(str(s)) >= (1 - alpha) * Fraction(str(t)) for s, t in zip(student, teacher, strict=True))
        return Fraction(wins, n)

    curve = [brute(a) for a in grid]
    assert curve == [tolerance.c_alpha(crit, a) for a in grid]
    first = next(a for a, c in zip(grid, curve, strict=True) if c >= Fraction(1, 2))
    star = tolerance.alpha_star(crit)
    assert star <= first < star + step
    assert tolerance.c_alpha(crit, star) >= Fraction(1, 2)


def test_corners_describe_the_curve_exactly():
    crit = critical([1.0, 1.0, 1.0, 1.0], [0.9, 1.0, 0.5, 0.7])  # 0.1, 0, 0.5, 0.3
    assert tolerance.corners(crit) == [(0.0, 0.25), (0.1, 0.5), (0.3, 0.75), (0.5, 1.0)]


def test_paired_bootstrap_intervals():
    rng = np.random.default_rng(0)
    ref = (rng.random(400) < 0.5).astype(float)
    same = tolerance.paired_bootstrap({"a": (ref, ref.copy())}, ["a"], [0.0], iterations=200)
    assert same.task_difference["a"].low == same.task_difference["a"].high == 0
    assert same.alpha_star.low == same.alpha_star.high == 0
    better = np.maximum(ref, (rng.random(400) < 0.3).astype(float))
    result = tolerance.paired_bootstrap({"a": (ref, better)}, ["a", "b"], [0.0], iterations=200)
    assert result.task_difference["a"].low > 0
    assert result.c_alpha is None and result.alpha_star is None  # task b has no samples


# ---------------------------------------------------------------------- files and the CLI
@pytest.fixture(scope="module")
def lm_eval_runs(tmp_path_factory):
    """Real lm-eval output: the CI suite on two different tiny models, through `merge-xlstm eval`."""
    root = tmp_path_factory.mktemp("runs")
    for name, seed in [("teacher", 0), ("student", 1)]:
        tiny_teacher("llama", seed=seed).save_pretrained(root / name)
        tiny_tokenizer().save_pretrained(root / name)
    out = root / "results"
    args = ["eval", str(root / "teacher"), str(root / "student"), "--suite", "ci", "--output", str(out)]
    unsafe = [] if sandbox.available_backends() else ["--allow-unsafe-code"]  # the CI suite runs code
    assert cli([*args, "--batch-size", "4", *unsafe]) == 0
    (teacher,) = out.glob("*teacher")  # folders are named after the model paths
    (student,) = out.glob("*student")
    return teacher, student


def test_compare_reads_lm_eval_results_directories(lm_eval_runs, tmp_path, capsys):
    teacher, student = lm_eval_runs
    plot = tmp_path / "curves.png"
    assert cli(["compare", str(teacher), str(student), "--json", "--plot", str(plot)]) == 0
    document = json.loads(capsys.readouterr().out)
    (report,) = document["candidates"]
    tasks = report["tasks"]
    assert {t: (v["domain"], v["metric"]) for t, v in tasks.items()} == {
        "mx_ci_arc_challenge": ("stem", "acc_norm,none"),
        "mx_ci_gsm8k": ("math", "exact_match,flexible-extract"),
        "mx_ci_humaneval": ("code", "pass@1,none"),
    }
    assert sorted(report["domains"]) == ["code", "math", "stem"]
    assert {t: v["paired_documents"] for t, v in tasks.items()} == {
        "mx_ci_arc_challenge": 6, "mx_ci_gsm8k": 3, "mx_ci_humaneval": 3,
    }  # fmt: skip
    assert set(report["c_alpha"]) == {"0", "0.05", "0.1", "0.15", "0.2", "0.25", "0.3", "0.35", "0.4"}
    assert report["bootstrap"]["alpha_star_ci"] is not None
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    results_file = next((teacher / "ci").glob("results_*.json"))
    arc = json.loads(results_file.read_text())["results"]["mx_ci_arc_challenge"]["acc_norm,none"]
    assert tasks["mx_ci_arc_challenge"]["reference"] == arc
    assert cli(["compare", str(results_file), str(student), "--alpha", "0.1"]) == 0  # a single file works too
    table_out = capsys.readouterr().out
    assert "mx_ci_arc_challenge" in table_out and "alpha*" in table_out


def test_a_directory_holding_several_models_is_refused(lm_eval_runs, capsys):
    teacher, _ = lm_eval_runs
    assert cli(["compare", str(teacher.parent), str(teacher)]) == 2
    err = capsys.readouterr().err.strip()
    assert "pass one model's results at a time" in err and len(err.splitlines()) == 1


def test_a_group_with_its_own_score_is_one_benchmark(tmp_path):
    """lm-eval's layout for a scored group (e.g. mmlu over its subjects) next to a plain task."""
    results = {
        "results": {
            "mmlu": {"alias": "mmlu", "acc,none": 0.40, "acc_stderr,none": 0.01},
            "mmlu_anatomy": {"alias": " - anatomy", "acc,none": 0.30},
            "mmlu_astronomy": {"alias": " - astronomy", "acc,none": 0.50},
            "hellaswag": {"alias": "hellaswag", "acc,none": 0.35, "acc_norm,none": 0.45},
            "wikitext": {"alias": "wikitext", "word_perplexity,none": 30.0},
        },
        "group_subtasks": {"mmlu": ["mmlu_anatomy", "mmlu_astronomy"], "hellaswag": [], "wikitext": []},
        "configs": {},
        "versions": {},
        "higher_is_better": {"wikitext": {"word_perplexity": False}},
    }
    path = tmp_path / "results_2026-01-01T00-00-00.json"
    path.write_text(json.dumps(results))
    scores = load_scores(str(path))
    assert {t: (s.metric, s.score) for t, s in scores.tasks.items()} == {
        "mmlu": ("acc,none", 0.40),
        "hellaswag": ("acc_norm,none", 0.45),
    }  # perplexity (lower is better) has no place in C_alpha


def test_published_numbers_as_plain_mappings(tmp_path, capsys):
    paper = {"gsm8k": 45.0, "humaneval": {"score": 30.0, "domain": "code"}}
    (tmp_path / "paper.yaml").write_text(yaml.safe_dump(paper))
    (tmp_path / "ours.json").write_text(json.dumps({"gsm8k": 0.40, "humaneval": {"score": 0.33, "domain": "code"}}))
    assert cli(["compare", str(tmp_path / "paper.yaml"), str(tmp_path / "ours.json"), "--json", "--alpha", "0.1"]) == 0
    (report,) = json.loads(capsys.readouterr().out)["candidates"]
    assert report["tasks"]["gsm8k"]["reference"] == pytest.approx(0.45)  # percent read as such
    assert report["tasks"]["humaneval"]["ratio"] == pytest.approx(1.1)
    assert report["tasks"]["gsm8k"]["critical_alpha"] == pytest.approx(1 / 9)
    assert report["alpha_star"] == 0 and report["tolerant"] and report["bootstrap"] is None
    assert sorted(report["domains"]) == ["code", "other"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--alpha", "1.5"], "--alpha: must lie in [0, 1]"),
        (["--json"], "no such file or directory"),
    ],
)
def test_user_errors_are_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "a.json").write_text(json.dumps({"x": 0.5}))
    target = str(tmp_path / "a.json") if "--alpha" in argv else str(tmp_path / "missing")
    assert cli(["compare", str(tmp_path / "a.json"), target, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
