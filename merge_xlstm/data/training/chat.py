"""Chat: Chit-Chat Challenge conversations less the held-out ones, and generated formatting instructions."""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable, Iterator
from typing import Any

from merge_xlstm.data.heldout import is_heldout_conversation
from merge_xlstm.data.packages import package_dir
from merge_xlstm.data.training.base import Record, chat, packaged

@functools.cache
def _chitchat() -> dict[str, Any]:
    """The training conversations, less the ones the chat suite holds out (`heldout.is_heldout_conversation`)."""
    everything = json.loads((package_dir("chitchat_dataset") / "dataset.json").read_text())
    return {cid: conversation for cid, conversation in everything.items() if not is_heldout_conversation(cid)}


@packaged("chitchat", split="none")
def chitchat() -> Iterator[Record]:
    """Chit-Chat Challenge human-human conversations, first speaker as user, second as assistant.

    Origin: chitchat-dataset 0.9.0 (MIT), its only data file, less the 10% of conversations the chat
    eval suite holds out; of those, the ones with two speakers and no empty turn.
    """
    for conversation in _chitchat().values():
        turns = ["\n".join(u["text"] for u in turn).strip() for turn in conversation["messages"]]
        if len(turns) > 1 and all(turns):
            yield {"messages": [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]}


@functools.cache
def _sentences() -> tuple[str, ...]:
    utterances = (u["text"].strip() for c in _chitchat().values() for turn in c["messages"] for u in turn)
    return tuple(s for s in utterances if 5 <= len(s.split()) <= 30 and s.isascii())


_END = "Is there anything else I can help with?"
_INSTRUCTIONS: tuple[Callable[[str], tuple[str, str]], ...] = (
    lambda s: ("Rewrite this message in all capital letters.", s.upper()),
    lambda s: ("Rewrite this message in lowercase letters only, with no capitals.", s.lower()),
    lambda s: ("Write the words of this message in reverse order.", " ".join(reversed(s.split()))),
    lambda s: ("How many words does this message have? Answer with the number only.", str(len(s.split()))),
    lambda s: ('Wrap this message in JSON with the single key "message".', json.dumps({"message": s})),
    lambda s: ("List the words of this message as markdown bullet points.", "\n".join(f"* {w}" for w in s.split())),
    lambda s: ("Repeat this message exactly, wrapped in double quotation marks.", f'"{s}"'),
    lambda s: (
        "Sort the words of this message alphabetically, ignoring case.",
        " ".join(sorted(s.split(), key=str.lower)),
    ),
    lambda s: (f'Repeat this message, then end your response with the exact phrase "{_END}"', f"{s}\n{_END}"),
    lambda s: (
        "Give this message a title in double angular brackets, like <<title>>, then repeat it.",
        f"<<{' '.join(s.split()[:3]).title()}>>\n{s}",
    ),
)


@packaged("instructions", split="generated", endless=True)
def instructions(seed: int) -> Iterator[Record]:
    """IFEval-style verifiable formatting instructions (case, JSON, bullets, quotes, titles...) over chat messages.

    Origin: generated here (this package's license) from chitchat-dataset utterances (MIT); the
    response is computed exactly, so it is always right. Unlimited, deterministic given the seed.
    """
    r, sentences = random.Random(seed), _sentences()
    while True:
        sentence = r.choice(sentences)
        instruction, response = r.choice(_INSTRUCTIONS)(sentence)
        yield chat(f"{instruction}\n\n{sentence}", response)
