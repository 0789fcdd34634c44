"""What every packaged training source shares: the `PACKAGED` registry and the shapes of its records.

An entry yields records with a ``"text"`` field (plain text) or a ``"messages"`` field
(``[{role, content}]``, rendered with the teacher's chat template). Finite entries take no argument;
endless ones (generators) take a seed and must yield the same records for the same seed.
"""

from __future__ import annotations

import hashlib
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merge_xlstm.data import heldout, packages
from merge_xlstm.registry import Registry

Record = dict[str, Any]
RecordFn = Callable[..., Iterator[Record]]
Problem = tuple[str, list[str], str]  # question, solution steps, final answer


@dataclass(frozen=True)
class PackagedSource:
    """A registered source: how to read its records and which split of its origin they come from."""

    records: RecordFn
    split: str  # "none" for text that is no benchmark, "generated" for procedural sources
    endless: bool = False

    @property
    def description(self) -> str:
        return (self.records.__doc__ or "").strip()

    def code_digest(self) -> str:
        """SHA-256 of the code its records depend on, so that cached records go stale when that code changes.

        That is the module defining it, this one (the shared record shapes), the package pins and the
        held-out rules (the chat source drops the held-out conversations).
        """
        modules = (sys.modules[self.records.__module__], sys.modules[__name__], packages, heldout)
        digest = hashlib.sha256()
        for module in modules:
            digest.update(Path(str(module.__file__)).read_bytes())
        return digest.hexdigest()


PACKAGED: Registry[PackagedSource] = Registry("packaged source")


def packaged(name: str, *, split: str, endless: bool = False) -> Callable[[RecordFn], RecordFn]:
    """Decorator: register a record generator as ``packaged:name``."""

    def add(fn: RecordFn) -> RecordFn:
        PACKAGED.register(name)(PackagedSource(fn, split, endless))
        return fn

    return add


def chat(prompt: str, answer: str) -> Record:
    """One user turn and the assistant's answer."""
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def multiple_choice(question: str, options: list[str], answer: int, header: str = "") -> Record:
    """Lm-eval's "Question/Answer" layout with lettered options, so both MC and cloze scoring look familiar."""
    lines = [f"{header}Question: {question.strip()}"]
    lines += [f"{chr(65 + i)}. {option}" for i, option in enumerate(options)]
    lines.append(f"Answer: {chr(65 + answer)}. {options[answer]}")
    return {"text": "\n".join(lines)}


def solution(steps: list[str], answer: str) -> str:
    """Worked steps, then "The answer is ...": the answer line GSM8K-style scoring looks for."""
    return "\n".join(steps) + f"\nThe answer is {answer}" + ("" if answer.endswith(".") else ".")


def worked_problems(templates: Sequence[Callable[[random.Random], Problem]], seed: int) -> Iterator[Record]:
    """Endless chats from problem templates, each drawn at random: the same records for the same seed."""
    r = random.Random(seed)
    while True:
        question, steps, answer = r.choice(templates)(r)
        yield chat(question, solution(steps, answer))
