"""IFEval-lite: does the model obey explicit, automatically checkable instructions?

IFEval (Zhou et al. 2023) is not available offline, so this re-implements a subset of its instruction
types (case, commas, length, keywords, ending phrase, bullet lists, quotation, JSON, title,
placeholders) with IFEval's strict checks, on 200 synthetic prompts built deterministically from the
writing requests and instruction parameters below. It measures compliance with format constraints,
not helpfulness, correctness or conversational quality; being synthetic, no training source contains
it. Scores: ``prompt_level_strict_acc`` (every instruction of the prompt followed; the primary score)
and ``inst_level_strict_acc`` (share of a prompt's instructions followed, averaged over prompts, which
differs from IFEval's pooled instruction-level number).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from merge_xlstm.registry import Registry

NUM_PROMPTS = 200
SEED = 20260301
ORIGIN = f"merge_xlstm.eval.suites.instructions: {NUM_PROMPTS} synthetic IFEval-style prompts (seed {SEED})"

REQUESTS = [
    "Write a short note to a friend about your weekend.",
    "Describe how a bicycle works.",
    "Explain why the sky is blue.",
    "Give advice to someone starting their first job.",
    "Describe your ideal breakfast.",
    "Write a product description for a reusable water bottle.",
    "Explain how to make a cup of tea.",
    "Summarize the benefits of regular exercise.",
    "Write a short story about a lost umbrella.",
    "Describe a city you would like to visit.",
    "Explain what a computer program is to a child.",
    "Write a thank-you message to a teacher.",
    "Describe the changing of the seasons.",
    "Give tips for studying for an exam.",
    "Explain how plants make food from sunlight.",
    "Write an invitation to a birthday party.",
    "Describe the sound of rain.",
    "Explain why sleep is important.",
    "Write a review of a movie you like.",
    "Describe how to plant a tree.",
    "Explain what a library is for.",
    "Write a short speech to open a school fair.",
    "Describe a busy train station.",
    "Give reasons to learn a second language.",
    "Explain how a refrigerator keeps food cold.",
    "Write a postcard from the seaside.",
    "Describe your favourite animal.",
    "Explain how to save money on groceries.",
    "Write a short poem about the moon.",
    "Describe what makes a good neighbour.",
]
KEYWORDS = ["sunlight", "river", "window", "journey", "silver", "garden", "morning", "bridge"]
END_PHRASES = ["Is there anything else I can help with?", "Let me know if you have additional questions."]


@dataclass(frozen=True)
class Instruction:
    """One verifiable instruction type: text template, parameter sampler, strict checker."""

    template: str
    sample: Callable[[random.Random], dict[str, Any]]
    check: Callable[[str, dict[str, Any]], bool]
    conflicts: frozenset[str]  # aspects of the response it constrains; two instructions may not share one


INSTRUCTIONS: Registry[Instruction] = Registry("instruction")


def _register(name: str, template: str, check, *, sample=lambda rng: {}, conflicts: set[str]) -> None:
    INSTRUCTIONS.register(name)(Instruction(template, sample, check, frozenset(conflicts)))


def _words(text: str) -> int:
    return len(re.findall(r"\b\w+\b", text))


def _strip_fences(text: str) -> str:
    text = text.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        text = text.removeprefix(fence)
    return text.removesuffix("```").strip()


def _is_json(text: str) -> bool:
    try:
        json.loads(_strip_fences(text))
    except ValueError:
        return False
    return True


_register(
    "change_case:english_lowercase",
    "Your entire response should be in English, and in all lowercase letters. No capital letters are allowed.",
    lambda text, kw: text == text.lower() and any(c.isalpha() for c in text),
    conflicts={"case"},
)
_register(
    "change_case:english_capital",
    "Your entire response should be in English, and in all capital letters.",
    lambda text, kw: text == text.upper() and any(c.isalpha() for c in text),
    conflicts={"case"},
)
_register(
    "punctuation:no_comma",
    "In your entire response, refrain from the use of any commas.",
    lambda text, kw: "," not in text,
    conflicts={"comma"},
)
_register(
    "length_constraints:max_words",
    "Answer with less than {num_words} words.",
    lambda text, kw: _words(text) < kw["num_words"],
    sample=lambda rng: {"num_words": rng.choice([30, 50, 80])},
    conflicts={"length"},
)
_register(
    "length_constraints:min_words",
    "Answer with at least {num_words} words.",
    lambda text, kw: _words(text) >= kw["num_words"],
    sample=lambda rng: {"num_words": rng.choice([60, 100, 150])},
    conflicts={"length"},
)
_register(
    "keywords:existence",
    'Include the keyword "{keyword}" in your response.',
    lambda text, kw: re.search(rf"\b{kw['keyword']}\b", text, re.IGNORECASE) is not None,
    sample=lambda rng: {"keyword": rng.choice(KEYWORDS)},
    conflicts={"keyword"},
)
_register(
    "startend:end_checker",
    'Finish your response with this exact phrase "{end_phrase}". No other words should follow this phrase.',
    lambda text, kw: text.strip().strip('"').endswith(kw["end_phrase"]),
    sample=lambda rng: {"end_phrase": rng.choice(END_PHRASES)},
    conflicts={"end", "case", "wrapper"},
)
_register(
    "detectable_format:number_bullet_lists",
    "Your answer must contain exactly {num_bullets} bullet points. Use the markdown bullet points such as:\n"
    "* This is point 1.\n* This is point 2",
    lambda text, kw: len(re.findall(r"^\s*[\*\-][^\*\-].*$", text, re.MULTILINE)) == kw["num_bullets"],
    sample=lambda rng: {"num_bullets": rng.choice([2, 3, 4])},
    conflicts={"structure"},
)
_register(
    "startend:quotation",
    "Wrap your entire response with double quotation marks.",
    lambda text, kw: len(text.strip()) > 1 and text.strip()[0] == '"' and text.strip()[-1] == '"',
    conflicts={"wrapper", "end"},
)
_register(
    "detectable_format:json_format",
    "Entire output should be wrapped in JSON format. You can use markdown ticks such as ```.",
    lambda text, kw: _is_json(text),
    conflicts={"wrapper", "end", "structure", "comma", "length", "case"},
)
_register(
    "detectable_format:title",
    "Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>.",
    lambda text, kw: re.search(r"<<[^\n]+>>", text) is not None,
    conflicts={"title"},
)
_register(
    "detectable_content:number_placeholders",
    "The response must contain at least {num_placeholders} placeholders represented by square brackets, "
    "such as [address].",
    lambda text, kw: len(re.findall(r"\[.*?\]", text)) >= kw["num_placeholders"],
    sample=lambda rng: {"num_placeholders": rng.choice([1, 2, 3])},
    conflicts={"placeholder"},
)


def build_docs() -> Iterator[dict[str, Any]]:
    """The prompts: a writing request plus one or two compatible instructions, distinct, reproducibly."""
    rng = random.Random(SEED)
    names = INSTRUCTIONS.names()
    seen: set[str] = set()
    while len(seen) < NUM_PROMPTS:
        chosen: list[str] = []
        for _ in range(1 if rng.random() < 0.5 else 2):
            taken = frozenset().union(*(INSTRUCTIONS.get(c).conflicts for c in chosen))
            chosen.append(rng.choice([n for n in names if not INSTRUCTIONS.get(n).conflicts & taken]))
        kwargs = [INSTRUCTIONS.get(name).sample(rng) for name in chosen]
        texts = [INSTRUCTIONS.get(name).template.format(**kw) for name, kw in zip(chosen, kwargs, strict=True)]
        prompt = " ".join([rng.choice(REQUESTS), *texts])
        if prompt not in seen:
            seen.add(prompt)
            yield {"key": len(seen) - 1, "prompt": prompt, "instruction_id_list": chosen, "kwargs": json.dumps(kwargs)}


def score(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """lm-eval ``process_results``: strict compliance of the response with each instruction."""
    response = results[0]
    followed = [
        INSTRUCTIONS.get(name).check(response, kw)
        for name, kw in zip(doc["instruction_id_list"], json.loads(doc["kwargs"]), strict=True)
    ]
    return {
        "prompt_level_strict_acc": float(all(followed)),
        "inst_level_strict_acc": sum(followed) / len(followed),
    }
