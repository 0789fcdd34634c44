"""Read one model's benchmark scores for `merge-xlstm compare`.

Three inputs give the same :class:`ScoreTable`:

- an lm-eval results file (``results_<date>.json``), with the per-document ``samples_<task>_<date>.jsonl``
  written beside it when they exist;
- a directory of such files, searched recursively (``merge-xlstm eval`` writes
  ``<output>/<model>/<suite>/``; lm-eval writes ``<output_path>/<model>/``): the newest file of each
  folder, all folders together; a task found in two folders means the directory holds several models;
- a plain JSON or YAML mapping ``task: score`` or ``task: {score: S, domain: D}``, for published
  numbers. Scores above 1 anywhere in such a mapping mean it is in percent.

Which lm-eval metric is a task's score: the ``primary_metric`` its config's metadata declares (every
packaged suite task does), else the first of :data:`PREFERRED_METRICS` present, else the first metric
lm-eval marks higher-is-better. A group that has its own score (e.g. lm-eval's ``mmlu``) is one
benchmark standing for its subtasks; a group without one (the packaged suites) is only a container.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from merge_xlstm.errors import UserError
from merge_xlstm.eval.suites import GROUP_PREFIX

PREFERRED_METRICS = (
    "acc_norm,none", "acc,none", "exact_match,flexible-extract", "exact_match,strict-match",
    "exact_match,none", "pass@1,none", "prompt_level_strict_acc,none",
)  # fmt: skip
SAMPLE_MEAN_TOLERANCE = 1e-6


@dataclass(frozen=True)
class DocValues:
    """Per-document values of a task's score metric, keyed by lm-eval's doc_id."""

    values: dict[int, float]
    hashes: dict[int, str]


@dataclass(frozen=True)
class TaskScore:
    score: float
    domain: str
    metric: str | None  # lm-eval "<metric>,<filter>"; None for plain mappings
    docs: DocValues | None  # when per-sample logs exist and average to the score


@dataclass(frozen=True)
class ScoreTable:
    label: str
    tasks: dict[str, TaskScore]


def load_scores(path_text: str) -> ScoreTable:
    path = Path(path_text)
    if path.is_dir():
        return ScoreTable(path_text, _from_directory(path))
    if not path.is_file():
        raise UserError("no such file or directory", where=path_text)
    if path.suffix in (".yaml", ".yml"):
        return ScoreTable(path_text, _from_mapping(_read(path, yaml.safe_load), path_text))
    if path.suffix != ".json":
        raise UserError("expected lm-eval results (.json or a directory) or a .json/.yaml mapping", where=path_text)
    data = _read(path, json.loads)
    if _is_lm_eval(data):
        return ScoreTable(path_text, _from_lm_eval(path, data))
    return ScoreTable(path_text, _from_mapping(data, path_text))


def _read(path: Path, parse) -> Any:
    try:
        return parse(path.read_text())
    except (ValueError, yaml.YAMLError) as exc:
        raise UserError(f"cannot parse: {str(exc).splitlines()[0]}", where=str(path)) from None


def _is_lm_eval(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("results"), dict) and "versions" in data


def _from_directory(root: Path) -> dict[str, TaskScore]:
    newest: dict[Path, Path] = {}
    for file in root.rglob("results_*.json"):
        if file.parent not in newest or file.name > newest[file.parent].name:  # names embed ISO dates
            newest[file.parent] = file
    if not newest:
        raise UserError("no lm-eval results_*.json inside", where=str(root))
    tasks: dict[str, TaskScore] = {}
    origin: dict[str, Path] = {}
    for folder, file in sorted(newest.items()):
        for task, score in _from_lm_eval(file, _read(file, json.loads)).items():
            if task in tasks:
                raise UserError(
                    f"task {task} appears in both {origin[task]} and {folder}: pass one model's results at a time",
                    where=str(root),
                )
            tasks[task], origin[task] = score, folder
    return tasks


def _from_mapping(data: Any, where: str) -> dict[str, TaskScore]:
    if not isinstance(data, dict) or not data:
        raise UserError("expected a mapping task -> score (or task -> {score, domain})", where=where)
    entries = {}
    for task, value in data.items():
        if isinstance(value, dict):
            score, domain = value.get("score"), value.get("domain", "other")
        else:
            score, domain = value, "other"
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise UserError(f"score of {task!r} must be a number, got {score!r}", where=where)
        entries[str(task)] = (float(score), str(domain))
    scale = 100.0 if any(score > 1 for score, _ in entries.values()) else 1.0
    return {task: TaskScore(score / scale, domain, None, None) for task, (score, domain) in entries.items()}


def _check_lm_eval(data: dict[str, Any], where: str) -> None:
    """The parts of an lm-eval results file that compare reads hold the types lm-eval writes."""
    sections = {"results": dict, "configs": dict, "group_subtasks": list, "higher_is_better": dict}
    for section, entry_type in sections.items():
        entries = data.get(section, {})
        if not isinstance(entries, dict):
            raise UserError(f"{section}: expected an object, got {type(entries).__name__}", where=where)
        for name, entry in entries.items():
            if not isinstance(entry, entry_type):
                raise UserError(f"{section}.{name}: expected {'a list' if entry_type is list else 'an object'}, "
                                f"got {type(entry).__name__}", where=where)  # fmt: skip
    for name, config in data.get("configs", {}).items():
        if not isinstance(config.get("metadata", {}), dict):
            raise UserError(f"configs.{name}.metadata: expected an object", where=where)


def _from_lm_eval(path: Path, data: dict[str, Any]) -> dict[str, TaskScore]:
    _check_lm_eval(data, str(path))
    results, configs = data["results"], data.get("configs", {})
    groups: dict[str, list[str]] = data.get("group_subtasks", {})
    higher = data.get("higher_is_better", {})
    metrics = {name: _score_metric(name, entry, configs, higher) for name, entry in results.items()}
    scored_groups = [g for g in groups if metrics.get(g)]
    covered = {sub for group in scored_groups for sub in _subtasks(group, groups)}
    date = path.stem.removeprefix("results_")
    tasks = {}
    for name, metric in metrics.items():
        if metric is None or name in covered or (name in groups and name not in scored_groups):
            continue
        score = float(results[name][metric])
        docs = _doc_values(path.parent / f"samples_{name}_{date}.jsonl", metric, score)
        tasks[name] = TaskScore(score, _domain(name, configs, groups), metric, docs)
    if not tasks:
        raise UserError("no task with a higher-is-better score in this lm-eval results file", where=str(path))
    return tasks


def _score_metric(name: str, entry: dict[str, Any], configs: dict, higher: dict) -> str | None:
    numeric = {k for k, v in entry.items() if "," in k and isinstance(v, (int, float)) and "_stderr" not in k}
    declared = configs.get(name, {}).get("metadata", {}).get("primary_metric")
    if declared in numeric:
        return declared
    for key in PREFERRED_METRICS:
        if key in numeric:
            return key
    return next((k for k in sorted(numeric) if higher.get(name, {}).get(k.split(",")[0]) is True), None)


def _subtasks(group: str, groups: dict[str, list[str]]) -> Iterator[str]:
    for sub in groups.get(group, []):
        yield sub
        yield from _subtasks(sub, groups)


def _domain(name: str, configs: dict, groups: dict[str, list[str]]) -> str:
    """The task's declared domain, else that of the packaged suite containing it, else "other"."""
    declared = configs.get(name, {}).get("metadata", {}).get("domain")
    if declared:
        return str(declared)
    for group, subs in groups.items():
        if name in subs and group.startswith(GROUP_PREFIX):
            return group.removeprefix(GROUP_PREFIX)
    return "other"


def _doc_values(samples: Path, metric: str, score: float) -> DocValues | None:
    """Per-document values from lm-eval's samples log, if present and averaging to the score.

    The check keeps out metrics that are not plain means of per-document values (e.g. corpus BLEU),
    for which a document bootstrap would be wrong.
    """
    if not samples.is_file():
        return None
    name, filter_name = metric.split(",", 1)
    values, hashes = {}, {}
    for sample in _samples(samples):
        if sample.get("filter", "none") == filter_name and isinstance(sample.get(name), (int, float)):
            values[sample["doc_id"]] = float(sample[name])
            hashes[sample["doc_id"]] = sample.get("doc_hash", "")
    if not values or abs(np.mean(list(values.values())) - score) > SAMPLE_MEAN_TOLERANCE:
        return None
    return DocValues(values, hashes)


def _samples(path: Path) -> Iterator[dict[str, Any]]:
    """lm-eval's per-document log: one JSON object with an integer doc_id per line."""
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    sample = json.loads(line)
                except ValueError as exc:
                    raise UserError(f"line {number} is not JSON ({getattr(exc, 'msg', exc)})", where=str(path)) from None
                doc_id = sample.get("doc_id") if isinstance(sample, dict) else None
                if type(doc_id) is not int:  # a bool is no document number either
                    raise UserError(f"line {number}: expected a JSON object with an integer doc_id", where=str(path))
                yield sample
    except UnicodeDecodeError:
        raise UserError("is not UTF-8 text; expected lm-eval's samples log (JSON lines)", where=str(path)) from None
