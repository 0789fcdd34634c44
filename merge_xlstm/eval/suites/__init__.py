"""The offline evaluation suites: lm-eval task YAMLs shipped in this package.

Each suite is an lm-eval *group* (``<domain>/_suite.yaml``, ``group: merge_xlstm_<name>``) over task
YAMLs in the same folder, so lm-eval's own task index is the registry: adding a suite or a task means
adding YAML files here. Every task reads packaged data through `merge_xlstm.data.evaluation` and records in its
``metadata`` what :mod:`merge_xlstm.eval.compare` and the runner need: ``domain``, ``split``,
``origin``, ``primary_metric`` and ``executes_code``. lm-eval copies that metadata into its results
files, so a results file alone says how to score it.

From lm-eval's own CLI the suites are ``--include_path`` :data:`SUITES_DIR` ``--tasks merge_xlstm_math``.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from merge_xlstm.errors import UserError
from merge_xlstm.registry import Registry

SUITES_DIR = Path(__file__).parent
GROUP_PREFIX = "merge_xlstm_"
# Task metadata that describes the task (TaskInfo's fields, lm-eval's version); the rest are settings.
DESCRIPTIVE_METADATA = frozenset({"version", "domain", "split", "origin", "primary_metric", "executes_code"})


@dataclass(frozen=True)
class TaskInfo:
    name: str
    domain: str
    split: str
    origin: str
    primary_metric: str  # "<metric>,<filter>" as lm-eval keys its results
    executes_code: bool
    settings: frozenset[str] = frozenset()  # metadata a run may override (`merge-xlstm eval --metadata`)


@dataclass(frozen=True)
class Suite:
    name: str  # what `merge-xlstm eval --suite` takes
    group: str  # the lm-eval group
    description: str
    tasks: tuple[TaskInfo, ...]
    apply_chat_template: bool
    # measure name -> settings: what `merge-xlstm eval` computes beside the tasks (merge_xlstm.eval.measures)
    measures: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def executes_code(self) -> bool:
        return any(task.executes_code for task in self.tasks)


class _Loader(yaml.SafeLoader):
    """Reads task YAMLs without importing what ``!function`` names (lm-eval resolves those itself)."""


_Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def read_yaml(path: Path) -> dict[str, Any]:
    """A suite or task YAML as lm-eval reads it (``include`` resolved), ``!function`` left as text."""
    config = yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    if "include" in config:  # lm-eval's include: the included file's keys, overridden by ours
        config = {**read_yaml(path.parent / config.pop("include")), **config}
    return config


@functools.cache
def task_infos() -> dict[str, TaskInfo]:
    """Every packaged task by name."""
    infos = {}
    for path in sorted(SUITES_DIR.glob("*/*.yaml")):
        config = read_yaml(path)
        if "task" in config and "group" not in config:
            meta = config["metadata"]
            infos[config["task"]] = TaskInfo(
                name=config["task"],
                domain=meta["domain"],
                split=meta["split"],
                origin=meta["origin"],
                primary_metric=meta["primary_metric"],
                executes_code=bool(meta.get("executes_code", False)),
                settings=frozenset(meta) - DESCRIPTIVE_METADATA,
            )
    return infos


@functools.cache
def suites() -> Registry[Suite]:
    """Every packaged suite by short name (math, code, stem, chat, ci, longctx)."""
    registry: Registry[Suite] = Registry("suite")
    for path in sorted(SUITES_DIR.glob("*/_suite.yaml")):
        config = read_yaml(path)
        name = config["group"].removeprefix(GROUP_PREFIX)
        meta = config.get("metadata", {})
        registry.register(name)(
            Suite(
                name=name,
                group=config["group"],
                description=meta.get("description", ""),
                tasks=tuple(task_infos()[task] for task in config["task"]),
                apply_chat_template=bool(meta.get("apply_chat_template", False)),
                measures=dict(meta.get("measures") or {}),
            )
        )
    return registry


def get_suite(name: str) -> Suite:
    try:
        return suites().get(name)
    except KeyError as exc:
        raise UserError(str(exc.args[0]), where="--suite") from None


def evaluated_splits() -> list[tuple[str, str, str]]:
    """(task, split, origin) of every packaged task: data that training recipes must never read."""
    return [(info.name, info.split, info.origin) for info in task_infos().values()]


def describe() -> str:
    """The suites for people: tasks, domains, the split and files each reads, the score compare uses."""
    lines = []
    for name in suites():
        suite = suites().get(name)
        template = ", chat template" if suite.apply_chat_template else ""
        lines.append(f"{name} (lm-eval group {suite.group}{template}): {suite.description}")
        for task in suite.tasks:
            lines.append(f"  {task.name:<22} {task.domain:<5} {task.primary_metric:<30} {task.split}: {task.origin}")
        for measure, settings in suite.measures.items():
            lines.append(f"  + measure {measure}: {', '.join(f'{k}={v}' for k, v in settings.items())}")
    lines.append(f"from lm-eval's CLI: merge-xlstm lm-eval --include_path {SUITES_DIR} --tasks {GROUP_PREFIX}<suite>")
    return "\n".join(lines)


class ListSuitesAction(argparse.Action):
    """``--list-suites``: print :func:`describe` and exit, before required arguments are checked."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:  # fmt: skip
        print(describe())
        parser.exit()
