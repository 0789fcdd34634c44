"""The run's report: one Markdown page with PNG figures, and the same numbers as JSON.

``<report.output>/`` holds ``report.md``, ``report.json`` (every number on the page), ``compare.json``
(`merge-xlstm compare --json` of every expert and merge against the teacher) and the figures. The page
is a list of sections, each a :data:`SECTIONS` entry that turns the gathered :class:`ReportData` into
Markdown, JSON and figures; the directory is written whole or not at all. Nothing on the page depends
on the clock, so a resumed run writes byte for byte the report an unbroken run writes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merge_xlstm.eval.compare import DEFAULT_ALPHAS, PLOT_UPTO, compare
from merge_xlstm.eval.scores import ScoreTable, load_scores
from merge_xlstm.io import atomic_dir, write_json
from merge_xlstm.digests import fingerprint
from merge_xlstm.linearize.report import format_gates
from merge_xlstm.linearize.training import MetricsLog
from merge_xlstm.mission.evaluation import results_dir
from merge_xlstm.mission.spec import Mission
from merge_xlstm.mission.steps import Step, has_key, memo, merged_label, read_json, remove_stale_temporaries
from merge_xlstm.mission.weights import search_path
from merge_xlstm.provenance import read_metadata
from merge_xlstm.registry import Registry

REPORT_JSON = "report.json"
CLOCK_FIELDS = ("tokens_per_s",)  # measured, not computed: left out so a resumed run writes the same report
REFERENCE = "teacher"


@dataclass(frozen=True)
class ReportData:
    """Everything the sections read, gathered once."""

    mission: Mission
    scores: dict[str, ScoreTable]  # model label -> its scores over every suite (teacher first)
    compare: dict[str, Any]  # compare --json of every candidate against the teacher
    search: dict[str, Any]  # search.json
    experts: dict[str, dict[str, Any]]  # domain -> {"provenance": merge_xlstm.json, "metrics": metrics.jsonl rows}

    @property
    def candidates(self) -> dict[str, dict[str, Any]]:
        return {report["candidate"]: report for report in self.compare["candidates"]}

    @property
    def merged(self) -> list[str]:
        return [label for label in self.scores if label.startswith("merged")]


@dataclass(frozen=True)
class Section:
    order: int
    title: str
    build: Callable[[ReportData, Path], tuple[list[str], dict[str, Any]]]  # -> Markdown lines, JSON data


SECTIONS: Registry[Section] = Registry("report section")


def section(name: str, order: int, title: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: the function becomes the report's section `name`, placed by `order`."""

    def add(build: Callable[..., Any]) -> Callable[..., Any]:
        SECTIONS.register(name)(Section(order, title, build))
        return build

    return add


def report_step(mission: Mission, steps: list[Step], models: dict[str, tuple[str, tuple[str, ...]]]) -> Step:
    out = Path(mission.pipeline.report.output)
    inputs = [s for s in steps if s.name.startswith(("eval:", "merge:", "expert:")) or s.name == "search"]
    key = memo(lambda: fingerprint({"inputs": [s.key() for s in inputs],
                                    "report": mission.pipeline.report.model_dump()}))

    def run(key: str) -> None:
        write_report(mission, {label: path for label, (path, _) in models.items()}, out, key)

    return Step("report", "host", tuple(s.name for s in inputs), key, lambda key: has_key(out / REPORT_JSON, key), run)


def gather(mission: Mission, models: dict[str, str]) -> ReportData:
    scores = {}
    for label, model in models.items():
        tasks = {}
        for suite in mission.pipeline.eval.suites:
            tasks |= load_scores(str(results_dir(mission, model, suite))).tasks
        scores[label] = ScoreTable(label, tasks)
    reference = scores[REFERENCE]
    document = {"reference": REFERENCE, "alphas": list(DEFAULT_ALPHAS),
                "candidates": [compare(reference, table, DEFAULT_ALPHAS) for label, table in scores.items()
                               if label != REFERENCE]}
    experts = {name: {"provenance": read_metadata(recipe.output),
                      "metrics": MetricsLog.read(Path(recipe.output) / "metrics.jsonl")}
               for name, recipe in mission.domains.items()}
    return ReportData(mission, scores, document, read_json(search_path(mission)), experts)


def write_report(mission: Mission, models: dict[str, str], out: Path, key: str) -> None:
    data = gather(mission, models)
    remove_stale_temporaries(out)
    with atomic_dir(out, overwrite=True) as tmp:
        lines = [f"# merge-xlstm run `{mission.pipeline.name}`", "",
                 f"Teacher `{mission.first.teacher}`; experts {', '.join(f'`{d}`' for d in mission.domains)} "
                 f"from one stage-I seed; merged with `{mission.pipeline.merge.method}`. Scores: documents of the "
                 f"suites {', '.join(mission.pipeline.eval.suites)}"
                 f"{f' (at most {mission.pipeline.eval.limit} per task)' if mission.pipeline.eval.limit else ''}.",
                 ""]
        sections: dict[str, Any] = {}
        for name in sorted(SECTIONS.names(), key=lambda n: SECTIONS.get(n).order):
            section = SECTIONS.get(name)
            markdown, json_data = section.build(data, tmp)
            lines += [f"## {section.title}", "", *markdown, ""]
            sections[name] = json_data
        (tmp / "report.md").write_text("\n".join(lines))
        write_json(tmp / "compare.json", data.compare)
        write_json(tmp / REPORT_JSON, {"key": key, "name": mission.pipeline.name, **sections})


def final_line(mission: Mission) -> str:
    """What a finished run ends with: the merged model's alpha* and where the report is."""
    out = Path(mission.pipeline.report.output)
    summary = read_json(out / REPORT_JSON)["summary"]
    return (f"merged model ({mission.pipeline.merge.output}): alpha* = {summary['alpha_star']:.4f} over "
            f"{summary['benchmarks']} benchmarks (C_0 = {summary['c_0']:.2f}); report: {out / 'report.md'}")


# --------------------------------------------------------------------------------------- sections
def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def _num(value: float | None, digits: int = 3, kind: str = "f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}{kind}}"


def _figure(width: float, height: float, columns: int = 1) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.subplots(1, columns, squeeze=False)[0]


def _save(figure: Any, path: Path) -> str:
    figure.savefig(path, format="png", dpi=110, metadata={"Software": None})  # no version stamp: same bytes
    return path.name


def in_domain(data: ReportData) -> dict[str, dict[str, Any]]:
    """Each expert's own domain: the merged model's mean score there against the expert's (issue 13: >= 95%)."""
    merged, goal = data.scores[merged_label("searched")], data.mission.pipeline.report.goals.in_domain
    out = {}
    for domain in data.mission.domains:
        tasks = [t for t, s in data.scores[domain].tasks.items() if s.domain == domain and t in merged.tasks]
        if not tasks:
            continue
        expert = math.fsum(data.scores[domain].tasks[t].score for t in tasks) / len(tasks)
        ours = math.fsum(merged.tasks[t].score for t in tasks) / len(tasks)
        out[domain] = {"tasks": tasks, "expert": expert, "merged": ours,
                       "ratio": ours / expert if expert > 0 else None, "met": ours >= goal * expert}
    return out


@section("summary", 0, "Summary")
def _summary(data: ReportData, out: Path) -> tuple[list[str], dict[str, Any]]:
    merged = data.candidates[merged_label("searched")]
    goals = data.mission.pipeline.report.goals
    retained = in_domain(data)
    reached = {
        "alpha_star": merged["alpha_star"] <= goals.alpha_star,
        "in_domain": all(r["met"] for r in retained.values()),
    }
    own_c0 = {d: data.candidates[d]["domains"].get(d, {}).get("c_alpha", {}).get("0") for d in data.mission.domains}
    lines = [
        f"- merged model (searched weights): **alpha\\* = {merged['alpha_star']:.4f}** over "
        f"{len(merged['tasks'])} benchmarks, C_0 = {merged['c_alpha']['0']:.2f} "
        f"({'lossless' if merged['lossless'] else 'not lossless'}); goal alpha\\* <= {goals.alpha_star:g}: "
        f"{'met' if reached['alpha_star'] else 'not met'}",
        *(f"  - {domain}: alpha\\* = {d['alpha_star']:.4f}, C_0 = {d['c_alpha']['0']:.2f}"
          for domain, d in merged["domains"].items()),
        f"- merged / expert on each expert's own domain (goal >= {goals.in_domain:.0%}): "
        + ", ".join(f"{d} {_num(r['ratio'], 3)} ({_num(r['merged'])} vs {_num(r['expert'])})" for d, r in retained.items())
        + f": {'met' if reached['in_domain'] else 'not met'}",
        "- each expert's C_0 on its own domain: " + ", ".join(f"{d} {_num(c, 2)}" for d, c in own_c0.items()),
    ]
    data_out = {"alpha_star": merged["alpha_star"], "c_0": merged["c_alpha"]["0"], "benchmarks": len(merged["tasks"]),
                "per_domain": {d: v["alpha_star"] for d, v in merged["domains"].items()},
                "goals": goals.model_dump(), "reached": reached, "in_domain": retained, "expert_own_c_0": own_c0}
    return lines, data_out


@section("scores", 1, "Scores per task: teacher, experts, merges")
def _scores(data: ReportData, out: Path) -> tuple[list[str], dict[str, Any]]:
    labels = list(data.scores)
    tasks = list(data.scores[REFERENCE].tasks)
    rows = [[t, data.scores[REFERENCE].tasks[t].domain,
             *(_num(data.scores[m].tasks[t].score) if t in data.scores[m].tasks else "-" for m in labels)]
            for t in tasks]
    figure, (axes,) = _figure(max(6.0, 0.9 * len(tasks) + 2), 4.0)
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        values = [data.scores[label].tasks[t].score if t in data.scores[label].tasks else 0.0 for t in tasks]
        axes.bar([x + i * width for x in range(len(tasks))], values, width, label=label)
    axes.set_xticks([x + 0.4 - width / 2 for x in range(len(tasks))], tasks, rotation=30, ha="right")
    axes.set_ylabel("score (higher is better)")
    axes.legend(fontsize="small", ncols=min(4, len(labels)))
    name = _save(figure, out / "scores.png")
    json_data = {label: {t: s.score for t, s in table.tasks.items()} for label, table in data.scores.items()}
    return [*_table(["task", "domain", *labels], rows), "", f"![scores per task]({name})"], json_data


@section("tolerance", 2, "C_alpha and alpha* per model and domain")
def _tolerance(data: ReportData, out: Path) -> tuple[list[str], dict[str, Any]]:
    candidates = data.candidates
    domains = sorted({d for c in candidates.values() for d in c["domains"]})
    rows = [[label, _num(c["alpha_star"], 4), _num(c["c_alpha"]["0"], 2),
             *(_num(c["domains"][d]["alpha_star"], 4) if d in c["domains"] else "-" for d in domains)]
            for label, c in candidates.items()]
    figure, (axes,) = _figure(6.4, 4.2)
    for label, report in candidates.items():
        corners = [(a, c) for a, c in report["curve"] if a <= PLOT_UPTO]
        xs, ys = zip(*corners, (PLOT_UPTO, corners[-1][1]))
        line = axes.step(xs, ys, where="post", label=f"{label} (alpha*={report['alpha_star']:.3f})")[0]
        bands = (report.get("bootstrap") or {}).get("c_alpha_ci")
        if bands:
            alphas = [float(a) for a in bands]
            axes.fill_between(alphas, [lo for lo, _ in bands.values()], [hi for _, hi in bands.values()],
                              step="post", alpha=0.15, color=line.get_color())
    axes.axhline(0.5, color="grey", linestyle="--", linewidth=0.8)
    axes.set(xlim=(0, PLOT_UPTO), ylim=(-0.02, 1.02), xlabel="tolerance alpha", ylabel="C_alpha")
    axes.legend(loc="lower right", fontsize="small")
    name = _save(figure, out / "c_alpha.png")
    lines = [*_table(["model", "alpha*", "C_0", *(f"alpha* {d}" for d in domains)], rows), "",
             f"![C_alpha curves, bootstrap 95% bands over documents]({name})"]
    json_data = {label: {"alpha_star": c["alpha_star"], "c_alpha": c["c_alpha"],
                         "per_domain": {d: v["alpha_star"] for d, v in c["domains"].items()},
                         "bootstrap": c.get("bootstrap")} for label, c in candidates.items()}
    return lines, json_data


@section("recovery", 3, "Recovery A_S / A_T per task")
def _recovery(data: ReportData, out: Path) -> tuple[list[str], dict[str, Any]]:
    candidates = data.candidates
    tasks = list(data.scores[REFERENCE].tasks)
    ratios = {label: {t: c["tasks"][t]["ratio"] for t in tasks if t in c["tasks"]} for label, c in candidates.items()}
    rows = [[t, *(_num(ratios[label].get(t)) for label in candidates)] for t in tasks]
    figure, (axes,) = _figure(max(5.0, 0.8 * len(tasks) + 2), 0.45 * len(candidates) + 1.6)
    grid = [[ratios[label].get(t) or 0.0 for t in tasks] for label in candidates]
    image = axes.imshow(grid, vmin=0, vmax=max(1.2, *(max(r) for r in grid)), cmap="viridis", aspect="auto")
    axes.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    axes.set_yticks(range(len(candidates)), list(candidates))
    figure.colorbar(image, ax=axes, label="A_S / A_T")
    name = _save(figure, out / "recovery.png")
    return [*_table(["task", *candidates], rows), "", f"![recovery per task]({name})"], ratios


@section("weights", 4, "Merge weights: searched, uniform, fixed")
def _weights(data: ReportData, out: Path) -> tuple[list[str], dict[str, Any]]:
    search = data.search
    domains = search["domains"]
    rows = []
    names = ["searched", "uniform", *data.mission.pipeline.merge.fixed_weights]
    for name in names:
        w = search["weightings"][name]
        label = merged_label(name)
        evaluated = data.candidates.get(label)
        rows.append([name, *(_num(w["weights"][d]) for d in domains), _num(w["lambda"]),
                     _num(w["objective"], 4), *(_num(w["per_domain"][d], 4) for d in domains),
                     _num(evaluated["alpha_star"], 4) if evaluated else "not evaluated"])
    figure, (left, right) = _figure(9.0, 3.6, columns=2)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        w = search["weightings"][name]
        left.bar([x + i * width for x in range(len(domains))], [w["weights"][d] for d in domains], width, label=name)
        right.bar([x + i * width for x in range(len(domains))], [w["per_domain"][d] for d in domains], width,
                  label=name)
    for axes, title in ((left, "weight per expert"), (right, f"{search['objective']} per domain (lower is better)")):
        axes.set_xticks([x + 0.4 - width / 2 for x in range(len(domains))], domains)
        axes.set_title(title, fontsize="medium")
        axes.legend(fontsize="small")
    name = _save(figure, out / "weights.png")
    header = ["weights", *domains, "lambda", search["objective"], *(f"{d}" for d in domains), "merged alpha*"]
    lines = [f"Searched with `{search['strategy']}` on {sum(search['rows_per_domain'].values())} held-out validation "
             f"rows ({', '.join(f'{d} {n}' for d, n in search['rows_per_domain'].items())}), {len(search['trace'])} "
             f"candidate merges scored in memory; the objective is `{search['objective']}` averaged over domains.", "",
             *_table(header, rows), "", f"![merge weights]({name})"]
    return lines, {k: v for k, v in search.items() if k != "key"}


@section("training", 5, "Training: losses, validation, output gates")
def _training(data: ReportData, out: Path) -> tuple[list[str], dict[str, Any]]:
    figure, (stage1, stage2, gates) = _figure(13.0, 3.6, columns=3)
    rows, json_data = [], {}
    for domain, expert in data.experts.items():
        metrics, record = expert["metrics"], expert["provenance"]
        for axes, stage in ((stage1, "stage1"), (stage2, "stage2")):
            mine = [r for r in metrics if r["stage"] == stage]
            if mine and not (stage == "stage1" and domain != next(iter(data.experts))):  # one seed: plot it once
                axes.plot([r["tokens"] for r in mine], [r["loss"] for r in mine],
                          label="seed" if stage == "stage1" else domain)
        medians = record.get("output_gate_medians") or []
        if medians:
            gates.plot(range(len(medians)), [math.nan if g is None else g for g in medians], marker=".", label=domain)
        final = {stage: {k: v for k, v in next((r for r in reversed(metrics) if r["stage"] == stage), {}).items()
                         if k not in CLOCK_FIELDS} for stage in ("stage1", "stage2")}
        validation = record.get("validation", {})
        kl = next((v for k, v in validation.items() if k.endswith("_kl")), None)
        rows.append([domain, _num(final["stage1"].get("loss"), 4, "g"), _num(final["stage2"].get("loss"), 4),
                     _num(validation.get("student_ce"), 4), _num(validation.get("teacher_ce"), 4), _num(kl, 4),
                     format_gates(medians, ".2f") or "-"])
        json_data[domain] = {"final": final, "validation": validation, "output_gate_medians": medians,
                             "tokens": record.get("tokens")}
    for axes, title in ((stage1, "stage I loss (shared seed)"), (stage2, "stage II loss")):
        axes.set(title=title, xlabel="tokens", yscale="log")
    gates.set(title="output-gate median per layer (1 = mLSTM)", xlabel="layer", ylim=(-0.02, 1.02))
    for axes in (stage1, stage2, gates):
        if axes.get_legend_handles_labels()[0]:  # no gates are recorded where every row fits the window
            axes.legend(fontsize="small")
    name = _save(figure, out / "training.png")
    header = ["expert", "stage I loss", "stage II loss", "val CE", "teacher CE", "val top-k KL", "gate medians"]
    return [*_table(header, rows), "", f"![training curves and gates]({name})"], json_data

