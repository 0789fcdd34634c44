"""Next-turn selection on held-out chit-chat conversations (Chit Chat Challenge dataset).

Given up to four turns of a real two-person conversation, the model scores four candidate next turns:
the one that was actually said and three turns from other held-out conversations. Accuracy (chance
25 %) measures conversational coherence: whether the model prefers the reply that fits the dialogue.
It does not measure instruction following, helpfulness or the quality of generated replies.

The dataset has no splits, and chat training may read it, so a fixed 10 % of conversations, chosen by a
hash of their id, is held out: `merge_xlstm.data.heldout.is_heldout_conversation` decides which, for
this suite and for training alike.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from merge_xlstm.data.heldout import is_heldout_conversation

CONTEXT_TURNS = 4
MAX_TURN_CHARS = 300
NUM_CHOICES = 4


def _turns(conversation: dict[str, Any]) -> list[str]:
    """One string per turn: a turn is a run of messages from the same sender."""
    return [" ".join(message["text"].strip() for message in turn).strip() for turn in conversation["messages"]]


def response_selection_docs(dataset_json: Path) -> Iterator[dict[str, Any]]:
    conversations = json.loads(dataset_json.read_text())
    heldout = {cid: _turns(conv) for cid, conv in sorted(conversations.items()) if is_heldout_conversation(cid)}
    usable = {cid: turns for cid, turns in heldout.items() if len(turns) > 2 and all(turns)}
    pool = [(cid, turn) for cid, turns in usable.items() for turn in turns if len(turn) <= MAX_TURN_CHARS]
    for cid, turns in usable.items():
        rng = random.Random(cid)  # each document depends on its conversation only
        replies = [i for i in range(2, len(turns)) if len(turns[i]) <= MAX_TURN_CHARS]
        if not replies:
            continue
        reply = rng.choice(replies)
        choices = [turns[reply]]
        while len(choices) < NUM_CHOICES:  # distinct texts, so that exactly one choice is right
            other, turn = pool[rng.randrange(len(pool))]
            if other != cid and turn.lower() not in {choice.lower() for choice in choices}:
                choices.append(turn)
        rng.shuffle(choices)
        context = turns[max(0, reply - CONTEXT_TURNS) : reply]
        speakers = ["A", "B"] if (reply - len(context)) % 2 == 0 else ["B", "A"]
        lines = [f"{speakers[i % 2]}: {turn}" for i, turn in enumerate(context)]
        yield {
            "id": cid,
            "context": "\n".join(lines),
            "speaker": speakers[len(context) % 2],
            "choices": choices,
            "gold": choices.index(turns[reply]),
        }
