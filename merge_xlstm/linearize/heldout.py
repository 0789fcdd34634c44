"""Text the evaluations read that training must never read: a registry of held-out sets and the check.

Evaluation *splits* are kept out of training by name (`data.check_sources` refuses test splits and
HumanEval). Some evaluations read text that has no split at all, such as the long-context
evaluation's held-out source files (`merge_xlstm.eval.longdocs`) or the pass-key filler: they are
registered here (``HELD_OUT``, entries in `merge_xlstm.linearize.sources`), and
:func:`check_records` refuses a training source with a document that contains one of them.

"Contains" is judged on text with whitespace collapsed, so that a copy inside a larger document,
re-indented or with other line endings is caught too. A held-out document of one line (the pass-key
filler) is contained where it occurs as a phrase. A longer one is contained where a training document
holds at least half of its distinct lines of :data:`MIN_LINE_CHARS` or more characters, or
:data:`MAX_SHARED_LINES` of them for long documents, whose first thousands of tokens a copy of a part
would already leak. Short lines are left out because they recur everywhere (``return None``,
``else:``); license headers share fewer lines than that cap.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from merge_xlstm.errors import UserError
from merge_xlstm.registry import Registry

MIN_LINE_CHARS = 32
MAX_SHARED_LINES = 64
BATCH = 1024  # records read at a time


@dataclass(frozen=True)
class HeldOutSet:
    """Documents an evaluation reads: ``documents()`` yields (name, text)."""

    evaluation: str  # who reads them, for the error message
    documents: Callable[[], Iterable[tuple[str, str]]]


HELD_OUT: Registry[HeldOutSet] = Registry("held-out set")


def _lines(text: str) -> set[str]:
    collapsed = (" ".join(line.split()) for line in text.splitlines())
    return {line for line in collapsed if len(line) >= MIN_LINE_CHARS}


@dataclass(frozen=True)
class _Index:
    phrases: list[tuple[str, int]]  # one-line held-out documents and their index
    owners: dict[str, list[int]]  # line -> held-out documents holding it
    needed: list[int]  # shared lines that make a training document contain held-out document i
    labels: list[str]  # "name (evaluation)"

    def contained(self, text: str) -> int | None:
        """The first held-out document `text` contains, if any."""
        if self.phrases:
            collapsed = " ".join(text.split())
            found = next((doc for phrase, doc in self.phrases if phrase in collapsed), None)
            if found is not None:
                return found
        shared: Counter[int] = Counter()
        for line in _lines(text):
            shared.update(self.owners.get(line, ()))
        return next((doc for doc, count in shared.items() if count >= self.needed[doc]), None)


@functools.cache
def _index(names: tuple[str, ...]) -> _Index:
    phrases, owners, needed, labels = [], {}, [], []
    for name in names:
        entry = HELD_OUT.get(name)
        for doc_name, text in entry.documents():
            doc = len(labels)
            labels.append(f"{doc_name} ({entry.evaluation})")
            lines = _lines(text)
            if len(text.strip().splitlines()) == 1:
                phrases.append((" ".join(text.split()), doc))
            for line in lines:
                owners.setdefault(line, []).append(doc)
            needed.append(max(1, min(math.ceil(len(lines) / 2), MAX_SHARED_LINES)))
    return _Index(phrases, owners, needed, labels)


def _texts(batch: dict[str, list[Any]], field: str, chat: bool) -> Iterable[str]:
    for value in batch[field]:
        if chat:
            yield "\n".join(str(m.get("content") or "") for m in value or [])
        else:
            yield value or ""


def check_records(records: Any, field: str, chat: bool, *, where: str) -> None:
    """Refuse `records` (a datasets.Dataset of a training source) if one contains a held-out document."""
    index = _index(tuple(HELD_OUT.names()))
    for batch in records.select_columns([field]).iter(batch_size=BATCH):
        for text in _texts(batch, field, chat):
            found = index.contained(text)
            if found is not None:
                raise UserError(
                    f"contains the held-out document {index.labels[found]}; evaluation text never enters training",
                    where=where,
                )
