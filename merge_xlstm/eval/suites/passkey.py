"""Pass-key retrieval (Mohtashami & Jaggi, 2023): a 5-digit number hidden in filler, asked for at the end.

Each prompt is an instruction, filler text with the pass-key sentence at a random depth, and the
question "What is the pass key? The pass key is". The depth is drawn from the first ``max_depth`` of
the filler (the task YAML's 0.5), so a prompt of L tokens asks for a key at least ~L/2 tokens back:
a 512-token window alone cannot answer from 1K tokens on (with uniform depths it would answer about
half of the 1K prompts), while the 256-token task checks retrieval inside any window. It is sized in the evaluated model's own tokens:
filler words are added while the prompt fits ``length`` tokens, so it has that many, or fewer by
less than one filler word's tokens (mostly exactly that many with SmolLM2's tokenizer), capped at
the model's context less the answer's budget. Equal lengths also let lm-eval batch a task without
padding, which matters where pad = eos (SmolLM2): transformers' ``generate`` cannot tell such
padding from text.

Scoring: greedy generation, exact match of the first number in the answer with the key. Generation
rather than log-likelihood ranking, because ranking needs distractor keys whose choice sets the
chance level (1/4 with four candidates, and a model may prefer some keys for their digits alone),
while a model that cannot see the key matches by chance with probability 1e-5; and because the
issue's reference figures (teacher 10/10, 8/10, 4/10, 2/10 at 256 / 1K / 2K / 4K) were taken so.

Determinism: the key and depth of trial ``i`` at length ``L`` come from
``random.Random(f"passkey:{L}:{i}")``, independent of tokenizer, trial count and ``--limit``; the rest
is fixed text. The filler (the classic "The grass is green..." line) is held out of training
(`merge_xlstm.data.heldout`).
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Iterator
from typing import Any

import datasets

from merge_xlstm.errors import UserError

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
_WORDS = FILLER.split()  # one cycle of filler words
_NUMBER = re.compile(r"\d+")


def trial(length: int, index: int, max_depth: float) -> tuple[str, float]:
    """(key, depth in [0, max_depth)) of trial `index` at nominal `length`: the same for every model and run."""
    r = random.Random(f"passkey:{length}:{index}")
    return str(r.randint(10000, 99999)), r.random() * max_depth


def _prompt(key: str, depth: float, words: int) -> str:
    """The prompt with `words` filler words, the needle at the sentence end nearest `depth` of them."""
    filler = [_WORDS[i % len(_WORDS)] for i in range(words)]
    ends = [0] + [i + 1 for i, word in enumerate(filler) if word.endswith(".")] + [words]
    cut = min(ends, key=lambda end: abs(end - depth * words))
    return "\n".join((INTRO, " ".join([*filler[:cut], NEEDLE.format(key=key), *filler[cut:]]), QUESTION))


def build_doc(tokenizer: Any, length: int, index: int, *, max_depth: float, size: int | None = None) -> dict[str, Any]:
    """Trial `index` of nominal `length`, as a prompt of `size` (default `length`) tokens of `tokenizer`."""
    size = size or length
    key, depth = trial(length, index, max_depth)

    def tokens(words: int) -> int:
        return len(tokenizer(_prompt(key, depth, words))["input_ids"])

    if tokens(0) > size:
        raise UserError(f"a pass-key prompt needs more than {size} tokens of this tokenizer", where="passkey length")
    low, high = 0, size  # the most filler words that fit, by bisection (no word has fewer than 1 token)
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if tokens(middle) <= size else (low, middle - 1)
    prompt = _prompt(key, depth, low)
    return {"prompt": prompt, "passkey": key, "depth": round(depth, 4), "length": length, "tokens": tokens(low)}


def context_length(config: Any) -> int | None:
    """The positions a model was trained for (None if its config does not say): what prompts must fit."""
    return getattr(config, "max_position_embeddings", None)


def prompt_size(length: int, context: int | None, answer_tokens: int) -> int:
    """Tokens of a prompt of nominal `length`: capped so that prompt and answer fit the context."""
    return length if context is None else min(length, context - answer_tokens)


@functools.cache
def _model_files(path: str) -> tuple[Any, int | None]:
    from transformers import AutoConfig, AutoTokenizer

    from merge_xlstm.teacher import resolve_teacher

    directory = resolve_teacher(path)
    return (AutoTokenizer.from_pretrained(directory, trust_remote_code=False),
            context_length(AutoConfig.from_pretrained(directory, trust_remote_code=False)))


def load(
    length: int,
    trials: int,
    answer_tokens: int,
    max_depth: float,
    pretrained: str | None = None,
    tokenizer: str | None = None,
    **_: Any,
) -> datasets.DatasetDict:
    """lm-eval's ``custom_dataset`` hook: `trials` prompts of nominal `length` for the evaluated model.

    lm-eval passes the task's ``dataset_kwargs`` and metadata, and the run's metadata: ``merge-xlstm
    eval`` adds the model directory as ``pretrained`` (and ``--metadata trials=N``); lm-eval's own
    CLI passes ``--model_args`` (``pretrained=DIR``) and ``--metadata``. ``tokenizer`` overrides it.
    """
    source = tokenizer or pretrained
    if not source:
        raise UserError("pass-key prompts are sized in the model's tokens: give model_args pretrained=DIR",
                        where="passkey")  # fmt: skip
    if int(trials) < 1:
        raise UserError(f"must be at least 1, got {trials}", where="passkey trials")
    if not 0 <= float(max_depth) <= 1:
        raise UserError(f"must lie in [0, 1], got {max_depth}", where="passkey max_depth")
    model_tokenizer, context = _model_files(str(source))
    size = prompt_size(int(length), context, int(answer_tokens))
    docs = [build_doc(model_tokenizer, int(length), i, max_depth=float(max_depth), size=size)
            for i in range(int(trials))]  # fmt: skip
    return datasets.DatasetDict({"generated": datasets.Dataset.from_list(docs)})


def answer(response: str) -> str | None:
    """The first number of a response (the model's pass key), None if it has none."""
    match = _NUMBER.search(response)
    return match.group() if match else None


def score(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """lm-eval's ``process_results``: exact match of the answered number with the key."""
    return {"exact_match": float(answer(results[0]) == doc["passkey"])}


def task_settings() -> dict[str, Any]:
    """What the mx_passkey_* tasks' shared YAML sets: trials, depths, the answer's token budget, stop strings.

    Read by native runs (`merge_xlstm.eval.longctx.passkey_accuracy`) so they generate as lm-eval does.
    """
    from merge_xlstm.eval.suites import SUITES_DIR, read_yaml

    config = read_yaml(SUITES_DIR / "longctx" / "_passkey_template.yaml")
    return {
        "trials": int(config["metadata"]["trials"]),
        "max_depth": float(config["metadata"]["max_depth"]),
        "answer_tokens": int(config["generation_kwargs"]["max_gen_toks"]),
        "until": list(config["generation_kwargs"]["until"]),
    }


def held_out_texts() -> Iterator[tuple[str, str]]:
    """The filler, which training must not read (its one line is what the held-out check compares)."""
    yield "pass-key filler", FILLER
