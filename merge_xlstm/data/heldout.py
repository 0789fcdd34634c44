"""Evaluation data never enters training: every rule that keeps it out, in one place.

`linearize` checks every recipe source against these rules at run time (`linearize.data`), before
and while it reads it:

1. **Evaluation splits, by name** (:func:`check_source`): a source that reads a ``test`` split, or
   HumanEval (all of whose splits are scored), is refused before anything is read. The packaged
   sources (`merge_xlstm.data.training`) state the split they read and never read a scored one.
2. **Held-out chit-chat conversations, by id** (:func:`is_heldout_conversation`): the chitchat dataset
   has no splits, so a fixed share of its conversations, chosen by a hash of their id, is what the chat
   suite evaluates on; the chat training source drops them.
3. **Evaluation text without a split, by content** (``HELD_OUT``, :func:`check_records`): the
   long-context evaluation's held-out source files and the pass-key filler. Each entry names the
   evaluation's own reader of its texts as ``"module:function"``, imported only when a check runs, so
   training never imports the evaluation package to learn what is held out.

"Contains" (rule 3) is judged on text with whitespace collapsed, so that a copy inside a larger document,
re-indented or with other line endings is caught too. A held-out document of one line (the pass-key
filler) is contained where it occurs as a phrase. A longer one is contained where a training document
holds at least half of its distinct lines of :data:`MIN_LINE_CHARS` or more characters, or
:data:`MAX_SHARED_LINES` of them for long documents, whose first thousands of tokens a copy of a part
would already leak. Short lines are left out because they recur everywhere (``return None``,
``else:``); license headers share fewer lines than that cap.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from merge_xlstm.errors import UserError
from merge_xlstm.registry import Registry

# Benchmarks whose every split is scored (HumanEval has only "test"): never training data.
_EVAL_ONLY = re.compile(r"human[-_]?eval", re.IGNORECASE)
HELDOUT_PERCENT = 10  # share of chitchat conversations the chat suite evaluates on
HELDOUT_DESCRIPTION = f"{HELDOUT_PERCENT}% of conversations held out by sha256(id); one turn each"
MIN_LINE_CHARS = 32
MAX_SHARED_LINES = 64
BATCH = 1024  # records read at a time


# ------------------------------------------------------------------------------- 1. evaluation splits
def check_source(path: str, split: str, *, where: str) -> None:
    """Refuse a recipe source that reads a test split or an evaluation-only benchmark."""
    # Split expressions may combine and slice splits: "train+test", "test[:10%]".
    if any(part.split("[")[0].strip().lower() == "test" for part in split.split("+")):
        raise UserError(f"split {split!r} reads a test split; evaluation splits never enter training", where=where)
    if _EVAL_ONLY.search(path):
        raise UserError(f"{path!r} is an evaluation-only benchmark (HumanEval); never train on it", where=where)


# ---------------------------------------------------------------------- 2. chit-chat conversations
def is_heldout_conversation(conversation_id: str) -> bool:
    """Whether a chitchat conversation belongs to the chat suite's evaluation set (training must skip it)."""
    return int(hashlib.sha256(conversation_id.encode()).hexdigest(), 16) % 100 < HELDOUT_PERCENT


# --------------------------------------------------------------------------- 3. text without a split
@dataclass(frozen=True)
class HeldOutSet:
    """Documents an evaluation reads, through its own reader: ``"module:function"`` yielding (name, text)."""

    evaluation: str  # who reads them, for the error message
    reader: str

    def documents(self) -> Iterable[tuple[str, str]]:
        """(name, text) of each document, read by the evaluation's reader, imported only now."""
        module, _, function = self.reader.partition(":")
        read: Callable[[], Iterable[tuple[str, str]]] = getattr(importlib.import_module(module), function)
        return read()


HELD_OUT: Registry[HeldOutSet] = Registry("held-out set")
HELD_OUT.register("long_documents")(
    HeldOutSet("long-context CE by position", "merge_xlstm.eval.longdocs:held_out_texts")
)
HELD_OUT.register("passkey_filler")(HeldOutSet("pass-key retrieval", "merge_xlstm.eval.suites.passkey:held_out_texts"))


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
