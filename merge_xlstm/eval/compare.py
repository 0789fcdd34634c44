"""`merge-xlstm compare REFERENCE CANDIDATE...`: how much of the teacher does each candidate keep?

For every candidate, over the tasks it shares with the reference (REFERENCE.md §4): per-task recovery
A_S/A_T and critical tolerance alpha_b, C_alpha at the requested tolerance (default: a grid over
[0, 0.4]), the exact alpha*, the lossless (C_0 >= 1/2) and alpha-tolerant (C_alpha >= 1/2) verdicts, the
same per domain, and, where both sides have lm-eval per-sample logs, paired bootstrap intervals over
documents for each task's difference, for C_alpha and for alpha*. Output: a table for people, ``--json``
for programs, ``--plot`` for the C_alpha curves of all candidates in one PNG.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from merge_xlstm.errors import UserError
from merge_xlstm.eval import tolerance
from merge_xlstm.eval.scores import ScoreTable, TaskScore, load_scores
from merge_xlstm.io import atomic_file, to_json
from merge_xlstm.preflight import check_writable_file

DEFAULT_ALPHAS = tuple(round(0.05 * i, 2) for i in range(9))  # 0, 0.05, ..., 0.4
PLOT_UPTO = 0.4
BOOTSTRAP_ITERATIONS = 1000
CONFIDENCE = 0.95


def main(args: argparse.Namespace) -> int:
    if args.alpha is not None and not 0 <= args.alpha <= 1:
        raise UserError(f"must lie in [0, 1], got {args.alpha}", where="--alpha")
    alphas = (args.alpha,) if args.alpha is not None else DEFAULT_ALPHAS
    if args.plot:
        check_writable_file(args.plot, "--plot")
    reference = load_scores(args.reference)
    reports = [compare(reference, load_scores(path), alphas) for path in args.candidates]
    if args.plot:
        plot_curves(reports, args.plot, upto=max(PLOT_UPTO, args.alpha or 0))
    document = {"reference": reference.label, "alphas": list(alphas), "candidates": reports}
    print(to_json(document, indent=2) if args.json else render(document))
    return 0


def compare(reference: ScoreTable, candidate: ScoreTable, alphas: Sequence[float]) -> dict[str, Any]:
    """The JSON-ready report of one candidate against the reference."""
    common = [task for task in reference.tasks if task in candidate.tasks]
    if not common:
        raise UserError(f"no task in common with the reference {reference.label}", where=candidate.label)
    critical, tasks = {}, {}
    for task in common:
        ref, cand = reference.tasks[task], candidate.tasks[task]
        try:
            critical[task] = tolerance.critical_alpha(cand.score, ref.score)
        except ValueError as exc:
            raise UserError(f"{task}: {exc}", where=candidate.label) from None
        tasks[task] = {
            "domain": ref.domain if ref.domain != "other" else cand.domain,
            "metric": ref.metric or cand.metric,
            "reference": ref.score,
            "candidate": cand.score,
            "ratio": cand.score / ref.score if ref.score > 0 else None,
            "critical_alpha": float(critical[task]),
        }
    by_domain: dict[str, list[str]] = defaultdict(list)
    for task in common:
        by_domain[tasks[task]["domain"]].append(task)
    domains = {}
    for domain, names in sorted(by_domain.items()):
        summary = _summary([critical[t] for t in names], alphas)
        domains[domain] = {"tasks": len(names), **summary, "mean_ratio": _mean_ratio(tasks, names)}
    bootstrap, differences = _bootstrap(reference, candidate, common, alphas)
    for task, (interval, documents) in differences.items():
        tasks[task].update(difference_ci=[interval.low, interval.high], paired_documents=documents)
    return {
        "candidate": candidate.label,
        **_summary([critical[t] for t in common], alphas),
        "curve": [list(corner) for corner in tolerance.corners(list(critical.values()))],
        "tasks": tasks,
        "domains": domains,
        "missing_tasks": [task for task in reference.tasks if task not in candidate.tasks],
        "bootstrap": bootstrap,
    }


def _summary(critical: list[Fraction], alphas: Sequence[float]) -> dict[str, Any]:
    star = tolerance.alpha_star(critical)
    summary: dict[str, Any] = {
        "alpha_star": float(star),
        "c_alpha": {_key(a): float(tolerance.c_alpha(critical, a)) for a in alphas},
        "lossless": star == 0,
    }
    if len(alphas) == 1:
        summary["tolerant"] = star <= tolerance.exact(alphas[0])
    return summary


def _mean_ratio(tasks: dict[str, dict[str, Any]], names: list[str]) -> float | None:
    ratios = [tasks[t]["ratio"] for t in names if tasks[t]["ratio"] is not None]
    return float(np.mean(ratios)) if ratios else None


def _key(alpha: float) -> str:
    return f"{alpha:g}"


def _paired(ref: TaskScore, cand: TaskScore) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-document values of both sides on the documents both evaluated, if they are the same documents."""
    if ref.docs is None or cand.docs is None:
        return None
    shared = sorted(ref.docs.values.keys() & cand.docs.values.keys())
    if not shared or any(ref.docs.hashes[d] != cand.docs.hashes[d] for d in shared):
        return None
    return (np.array([ref.docs.values[d] for d in shared]), np.array([cand.docs.values[d] for d in shared]))


def _bootstrap(
    reference: ScoreTable, candidate: ScoreTable, common: list[str], alphas: Sequence[float]
) -> tuple[dict[str, Any] | None, dict[str, tuple[tolerance.Interval, int]]]:
    """Intervals for C_alpha and alpha* (JSON-ready), and per task (difference interval, documents)."""
    pairs = {t: p for t in common if (p := _paired(reference.tasks[t], candidate.tasks[t])) is not None}
    if not pairs:
        return None, {}
    result = tolerance.paired_bootstrap(pairs, common, alphas, iterations=BOOTSTRAP_ITERATIONS, level=CONFIDENCE)
    star, curve = result.alpha_star, result.c_alpha
    summary = {
        "iterations": result.iterations,
        "confidence": CONFIDENCE,
        "alpha_star_ci": None if star is None else [star.low, star.high],
        "c_alpha_ci": None if curve is None else {_key(a): [i.low, i.high] for a, i in curve.items()},
    }
    return summary, {task: (interval, len(pairs[task][0])) for task, interval in result.task_difference.items()}


# ------------------------------------------------------------------------------------- output
def render(document: dict[str, Any]) -> str:
    """The comparison as plain-text tables."""
    lines = [f"reference: {document['reference']}"]
    for report in document["candidates"]:
        lines += ["", f"candidate: {report['candidate']}", _task_table(report), ""]
        lines += _curve_table(report, document["alphas"])
        if report["missing_tasks"]:
            lines.append(f"not in candidate (left out): {', '.join(report['missing_tasks'])}")
    return "\n".join(lines)


def _task_table(report: dict[str, Any]) -> str:
    rows = [
        f"{'task':<22} {'domain':<7} {'metric':<30} {'reference':>9} {'candidate':>9} {'A_S/A_T':>8} {'alpha_b':>8}"
        f"  difference, {CONFIDENCE:.0%} CI"
    ]
    for name, t in report["tasks"].items():
        ratio = "-" if t["ratio"] is None else f"{t['ratio']:.3f}"
        ci = ""
        if "difference_ci" in t:
            low, high = t["difference_ci"]
            ci = f"[{low:+.3f}, {high:+.3f}] over {t['paired_documents']} docs"
        rows.append(
            f"{name:<22} {t['domain']:<7} {t['metric'] or '-':<30} {t['reference']:>9.4f} {t['candidate']:>9.4f} "
            f"{ratio:>8} {t['critical_alpha']:>8.4f}  {ci}"
        )
    return "\n".join(rows)


def _curve_table(report: dict[str, Any], alphas: Sequence[float]) -> list[str]:
    rows = [f"{'C_alpha':<12}" + "".join(f"{'a=' + _key(a):>8}" for a in alphas) + "   alpha*   verdict"]
    for label, summary in [("all", report), *report["domains"].items()]:
        verdict = "lossless" if summary["lossless"] else ("tolerant" if summary.get("tolerant") else "-")
        curve = "".join(f"{summary['c_alpha'][_key(a)]:>8.3f}" for a in alphas)
        rows.append(f"{label:<12}{curve}   {summary['alpha_star']:.4f}   {verdict}")
    boot = report["bootstrap"] or {}
    if boot.get("alpha_star_ci"):
        low, high = boot["alpha_star_ci"]
        rows.append(f"paired bootstrap over documents, {boot['iterations']} resamples, {CONFIDENCE:.0%} intervals:")
        rows.append(f"  alpha* [{low:.4f}, {high:.4f}]")
        intervals = (f"a={a} [{lo:.3f}, {hi:.3f}]" for a, (lo, hi) in boot["c_alpha_ci"].items())
        rows.append("  C_alpha " + ", ".join(intervals))
    return rows


def plot_curves(reports: list[dict[str, Any]], path: str, upto: float) -> None:
    """All candidates' exact C_alpha step curves in one PNG (matplotlib's Agg canvas, no display)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    axes = figure.subplots()
    for report in reports:
        corners = [(a, c) for a, c in report["curve"] if a <= upto]
        xs, ys = zip(*corners, (upto, corners[-1][1]))
        axes.step(xs, ys, where="post", label=f"{report['candidate']} (alpha*={report['alpha_star']:.3f})")
    axes.axhline(0.5, color="grey", linestyle="--", linewidth=0.8)
    axes.set(xlim=(0, upto), ylim=(-0.02, 1.02), xlabel="tolerance alpha")
    axes.set_ylabel("C_alpha (share of benchmarks won or tied)")
    axes.legend(loc="lower right", fontsize="small")
    with atomic_file(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=150)
