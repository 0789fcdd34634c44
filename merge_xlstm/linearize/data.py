"""Training data for `linearize`: recipe sources -> tokenised documents -> packed rows of ``seq_len``.

Rows are filled back to back with documents, as in paper A (REFERENCE.md §2), but no token may
see another document: attention or recurrent state crossing a boundary hurt there. The boundary is
carried by ``position_ids``, which restart at 0 at every document start; transformers 5 reads packed
sequences from them (teacher called with ``position_ids`` and no attention mask) and the student
follows the same convention. A document that does not fit the rest of a row continues at the start
of the next row as a new document (positions restart there too). ``labels`` are ``input_ids`` with
-100 at each document's first token, so no position is trained to predict across a boundary, and
on the padding that fills the validation set's last row.

Sources are mixed by *token* share, deterministically from the seed. Each source is tokenised whole
once with ``datasets.map`` (cached next to the source's Arrow files), then documents are drawn from it
in a shuffled order: first the validation documents, held out for good, then training documents,
cycling over the rest in a new order each pass when the source is too small for its share.
Generated (endless) packaged sources are read in order instead: validation takes their first
documents, training the ones after. The packed result is saved with ``save_to_disk`` under
``cache_dir``, keyed by everything it depends on, so a rerun reuses it without tokenising.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import gzip
import itertools
import json
import math
import platform
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from merge_xlstm.data import heldout
from merge_xlstm.data.training import PACKAGED, Record
from merge_xlstm.digests import fingerprint
from merge_xlstm.errors import UserError
from merge_xlstm.io import atomic_dir
from merge_xlstm.recipe import PACKAGED_PREFIX, DataSource, DataSpec

CACHE_VERSION = 1  # bump when tokenisation or packing changes what a cached dataset holds
COLUMNS = ("input_ids", "position_ids", "labels")
SPLITS = ("train", "validation")
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}
_HEAD_BYTES = 1 << 16  # how much of a local file is read up front to tell text from binary
_TEXT_FORMATS = {".jsonl": "JSON lines", ".json": "JSON", ".txt": "plain text", ".csv": "CSV"}


@dataclass(frozen=True)
class PackedData:
    """Packed rows of exactly ``seq_len`` tokens; items are LongTensors ``input_ids, position_ids, labels``.

    ``fingerprint`` is the cache key of the rows (spec, source contents, tokenizer, budget, seed): key
    anything computed from them, such as stored teacher targets, on it.
    """

    train: datasets.Dataset
    validation: datasets.Dataset
    fingerprint: str


def build_packed_dataset(spec: DataSpec, tokenizer: Any, *, num_tokens: int, seed: int, cache_dir: Path) -> PackedData:
    """Rows for ``num_tokens`` training tokens (plus held-out validation rows), built once and cached.

    Train has ``ceil(num_tokens / seq_len)`` rows, filled completely; validation has
    ``max(1, round(train rows * validation_fraction))`` rows from documents training never sees.
    """
    check_sources(spec)
    key = packed_key(spec, tokenizer, num_tokens, seed)
    target = Path(cache_dir) / f"packed-{key}"
    if not target.exists():
        try:
            with atomic_dir(target) as tmp:
                for split, rows in zip(SPLITS, _build(spec, tokenizer, num_tokens, seed, Path(cache_dir))):
                    rows.save_to_disk(str(tmp / split))
        except FileExistsError:
            # Another process built the same key meanwhile: its result is identical, so use it.
            if not target.exists():
                raise
    train, validation = (datasets.load_from_disk(str(target / split)).with_format("torch") for split in SPLITS)
    return PackedData(train, validation, key)


def check_sources(spec: DataSpec) -> None:
    """Refuse evaluation data, unknown packaged sources and unreadable local files before any work is done."""
    for i, source in enumerate(spec.sources):
        where = f"data.sources[{i}]"
        heldout.check_source(source.path, source.split, where=where)
        if source.path.startswith(PACKAGED_PREFIX):
            name = source.path.removeprefix(PACKAGED_PREFIX)
            if name not in PACKAGED:
                raise UserError(f"unknown packaged source {name!r} (known: {', '.join(PACKAGED.names())})", where=where)
        elif Path(source.path).expanduser().is_file():
            _check_local_file(Path(source.path).expanduser(), where)


def _check_local_file(path: Path, where: str) -> None:
    """An empty or binary file would otherwise fail deep inside `datasets` with a message about neither."""
    suffix = Path(path.name.removesuffix(".gz")).suffix
    if suffix not in _BUILDERS:
        return  # _load_records names the formats it reads
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as handle:
            head = handle.read(_HEAD_BYTES)
    except (OSError, EOFError) as exc:  # EOFError: a truncated .gz
        raise UserError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}", where=where) from None
    if suffix == ".parquet":
        if not head.startswith(b"PAR1"):
            raise UserError(f"{path} is not a Parquet file (it does not start with PAR1)", where=where)
        return
    expected = _TEXT_FORMATS[suffix]
    if not head.strip():
        raise UserError(f"{path} is empty; expected {expected} with documents", where=where)
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head.replace(b"\0", b"\xff"))  # NUL: binary too
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (binary data at byte {exc.start}); expected {expected}",
                        where=where) from None  # fmt: skip
    if suffix == ".jsonl":
        lines = text.splitlines()
        number, line = next((i, line) for i, line in enumerate(lines, 1) if line.strip())
        complete = len(head) < _HEAD_BYTES or number < len(lines)  # a first line longer than the head is not judged
        try:
            record = json.loads(line) if complete else {}
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise UserError(f"{path}: line {number} is not a JSON object; expected {expected}", where=where)


# ------------------------------------------------------------------------------------ cache keys
def _tokenizer_key(tokenizer: Any) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    probe = tokenizer("Hello world")["input_ids"]  # catches settings such as adding a bos token
    return fingerprint((tokenizer.name_or_path, vocab, tokenizer.chat_template, tokenizer.eos_token_id, probe))


def _source_key(source: DataSource) -> str:
    """What a source's content depends on beyond its recipe entry (local file stats, packaged code)."""
    if source.path.startswith(PACKAGED_PREFIX):
        # The stdlib source changes with the interpreter; every packaged source with its code.
        code = PACKAGED.get(source.path.removeprefix(PACKAGED_PREFIX)).code_digest()
        return fingerprint((source.model_dump(exclude={"weight"}), code, platform.python_version()))
    path = Path(source.path).expanduser()
    stat = path.stat() if path.is_file() else None
    return fingerprint(
        (source.model_dump(exclude={"weight"}), str(path.resolve()), stat and (stat.st_size, stat.st_mtime_ns))
    )


def packed_key(spec: DataSpec, tokenizer: Any, num_tokens: int, seed: int) -> str:
    """The key of the packed rows (`PackedData.fingerprint`), known before anything is built."""
    return fingerprint((
        CACHE_VERSION,
        spec.model_dump(),
        [_source_key(s) for s in spec.sources],
        _tokenizer_key(tokenizer),
        num_tokens,
        seed,
    ))


# --------------------------------------------------------------------------------------- records
def _load_records(source: DataSource, where: str, cache_dir: Path) -> tuple[datasets.Dataset, str, bool]:
    """A local file, a local dataset folder or a hub dataset: (records, field to read, is it a chat).

    A local file has one split; ``source.split`` names the split of a folder or hub dataset.
    """
    path = Path(source.path).expanduser()
    builder = _BUILDERS.get(Path(path.name.removesuffix(".gz")).suffix) if path.is_file() else None
    if path.is_file() and builder is None:
        raise UserError(f"expected a {'/'.join(_BUILDERS)} file (optionally .gz), got {source.path!r}", where=where)
    try:
        if builder:
            # One document per line for .txt (datasets' default); one per record otherwise.
            records = datasets.load_dataset(
                builder, data_files=str(path), split="train", cache_dir=str(cache_dir / "datasets")
            )
        else:
            records = datasets.load_dataset(source.path, source.config, split=source.split)
    except Exception as exc:  # offline hub, bad file, unknown split: all mean "fix the recipe"
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load {source.path!r} (split {source.split!r}): {message}", where=where) from None
    field = source.messages_field or source.text_field
    if field not in records.column_names:
        raise UserError(
            f"no field {field!r} (fields: {', '.join(records.column_names)}); set text_field or messages_field",
            where=where,
        )
    if source.max_documents:
        records = records.select(range(min(source.max_documents, len(records))))
    return records, field, source.messages_field is not None


def _packaged_records(name: str, seed: int, start: int, stop: int | None) -> Iterator[Record]:
    entry = PACKAGED.get(name)
    yield from itertools.islice(entry.records(seed) if entry.endless else entry.records(), start, stop)


def _generate(
    source: DataSource, seed: int, start: int, stop: int | None, cache_dir: Path
) -> tuple[datasets.Dataset, str, bool]:
    """Records ``start:stop`` of a packaged source as an Arrow dataset cached under ``cache_dir``."""
    name = source.path.removeprefix(PACKAGED_PREFIX)
    records = datasets.Dataset.from_generator(
        _packaged_records,
        gen_kwargs={"name": name, "seed": seed, "start": start, "stop": stop},
        cache_dir=str(cache_dir / "datasets"),
        fingerprint=fingerprint((_source_key(source), seed, start, stop)),
    )
    field = "messages" if "messages" in records.column_names else "text"
    return records, field, field == "messages"


# ------------------------------------------------------------------------------------ tokenising
@dataclass(frozen=True)
class Documents:
    """Tokenised documents of one source, flat: document i is ``tokens[offsets[i]:offsets[i + 1]]``."""

    tokens: np.ndarray
    offsets: np.ndarray

    @functools.cached_property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    @classmethod
    def concatenate(cls, parts: Sequence[Documents]) -> Documents:
        shifts = np.cumsum([0] + [len(p.tokens) for p in parts[:-1]])
        offsets = [parts[0].offsets[:1]] + [p.offsets[1:] + s for p, s in zip(parts, shifts)]
        return cls(np.concatenate([p.tokens for p in parts]), np.concatenate(offsets))


def _encode(batch: dict[str, list], *, tokenizer: Any, field: str, chat: bool, bar: tqdm) -> dict[str, list[list[int]]]:
    """Render and tokenise a batch: chats with the chat template (it places bos/eos), text + eos."""
    if chat:
        texts = [tokenizer.apply_chat_template(m, tokenize=False) if m else "" for m in batch[field]]
        ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    else:
        texts = [t or "" for t in batch[field]]
        eos = tokenizer.eos_token_id
        ids = tokenizer(texts, verbose=False)["input_ids"]  # adds a bos where the tokenizer does
        ids = [x + [eos] if x[-1:] != [eos] else x for x in ids]
    ids = [x if text.strip() else [] for x, text in zip(ids, texts)]  # nothing to learn from blanks
    bar.update(sum(map(len, ids)))
    return {"input_ids": ids}


@contextlib.contextmanager
def _token_progress(desc: str) -> Iterator[tqdm]:
    """A tokens/s bar in place of datasets' examples/s one while a source is tokenised."""
    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        with tqdm(desc=desc, unit="tok", unit_scale=True, leave=False) as bar:
            yield bar
    finally:
        if enabled:
            datasets.enable_progress_bars()


def _tokenize(
    records: datasets.Dataset, field: str, chat: bool, tokenizer: Any, key: str, desc: str, where: str
) -> Documents:
    heldout.check_records(records, field, chat, where=where)  # every training document passes here first
    with _token_progress(desc) as bar:
        encoded = records.map(
            _encode,
            batched=True,
            batch_size=256,
            remove_columns=records.column_names,
            fn_kwargs={"tokenizer": tokenizer, "field": field, "chat": chat, "bar": bar},
            features=datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))}),
            new_fingerprint=fingerprint((CACHE_VERSION, key, _tokenizer_key(tokenizer))),
        )
    column = encoded.data.column("input_ids").combine_chunks()
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
    tokens = column.flatten().to_numpy(zero_copy_only=False).astype(np.int32)
    return Documents(tokens, np.concatenate([[0], np.cumsum(lengths)]))


# ------------------------------------------------------------------------------------- selecting
def _quotas(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` tokens by weight into integers that add up exactly (largest remainder)."""
    shares = np.asarray(weights, dtype=np.float64) / sum(weights) * total
    quotas = np.floor(shares).astype(np.int64)
    quotas[np.argsort(quotas - shares)[: total - quotas.sum()]] += 1
    return quotas.tolist()


def _count_for(lengths: np.ndarray, quota: int) -> int:
    """How many documents of these lengths, from the front, hold ``quota`` tokens (all if they fall short)."""
    if quota <= 0:
        return 0
    return min(int(np.searchsorted(np.cumsum(lengths), quota)) + 1, len(lengths))


def _take(docs: Documents, order: np.ndarray, quota: int) -> list[np.ndarray]:
    """Documents in ``order`` until ``quota`` tokens; the last one is cut so the count is exact."""
    chosen = order[: _count_for(docs.lengths[order], quota)]
    taken = [docs[i] for i in chosen if docs.lengths[i] > 0]
    excess = int(docs.lengths[chosen].sum()) - quota
    if excess > 0:
        taken[-1] = taken[-1][: len(taken[-1]) - excess]
    return taken


def _cycled(docs: Documents, pool: np.ndarray, quota: int, rng: np.random.Generator) -> np.ndarray:
    """``pool`` followed by fresh shufflings of it, enough passes to hold ``quota`` tokens."""
    pool_tokens = int(docs.lengths[pool].sum())
    passes = max(1, math.ceil(quota / pool_tokens))
    return np.concatenate([pool] + [rng.permutation(pool) for _ in range(passes - 1)])


def _endless_documents(
    source: DataSource, seed: int, need: int, tokenizer: Any, cache_dir: Path, desc: str, where: str
) -> Documents:
    """Generate and tokenise records of an endless source until they hold ``need`` tokens."""
    parts: list[Documents] = []
    start, count, have = 0, 1024, 0
    while have < need:
        records, field, chat = _generate(source, seed, start, start + count, cache_dir)
        key = fingerprint((_source_key(source), seed, start, count))
        parts.append(_tokenize(records, field, chat, tokenizer, key, desc, where))
        have += len(parts[-1].tokens)
        start += count
        count = math.ceil((need - have) / max(1.0, have / start) * 1.1) + 16  # estimate from the mean length
    return Documents.concatenate(parts)


def _source_documents(
    source: DataSource, index: int, quotas: tuple[int, int], spec: DataSpec, tokenizer: Any, seed: int, cache_dir: Path
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(validation documents, training documents) of one source, exactly ``quotas`` tokens each when it can."""
    where, desc = f"data.sources[{index}]", f"tokenising {source.path}"
    val_quota, train_quota = quotas
    rng = np.random.default_rng([seed, 1, index])
    packaged = source.path.startswith(PACKAGED_PREFIX)
    endless = packaged and PACKAGED.get(source.path.removeprefix(PACKAGED_PREFIX)).endless
    # Finite packaged sources ignore the seed: 0 lets every recipe seed share their cached records.
    generator_seed = int(rng.integers(2**31)) if endless else 0
    if endless and not source.max_documents:
        # Generated documents are all distinct: read them in order, validation first, never cycle.
        need = val_quota + train_quota + 4 * spec.seq_len  # margin: validation's last document overshoots
        docs = _endless_documents(source, generator_seed, need, tokenizer, cache_dir, desc, where)
        order, cap = np.arange(len(docs)), len(docs)
    else:
        if packaged:
            records, field, chat = _generate(source, generator_seed, 0, source.max_documents, cache_dir)
        else:
            records, field, chat = _load_records(source, where, cache_dir)
        if chat and tokenizer.chat_template is None:
            raise UserError("source is a chat but the teacher's tokenizer has no chat template", where=where)
        docs = _tokenize(records, field, chat, tokenizer, _source_key(source), desc, where)
        order = rng.permutation(len(docs))
        # Hold out at most this share of a finite source's documents (a single document trains).
        cap = max(1, int(spec.validation_fraction * len(docs))) if len(docs) > 1 else 0
    held_out = _count_for(docs.lengths[order[:cap]], val_quota)
    pool = order[held_out:]
    if not pool.size or not docs.lengths[pool].any():
        raise UserError("source has no text left for training", where=where)
    return _take(docs, order[:held_out], val_quota), _take(docs, _cycled(docs, pool, train_quota, rng), train_quota)


# --------------------------------------------------------------------------------------- packing
def pack_documents(docs: Sequence[np.ndarray], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Pack documents back to back into (rows, seq_len) int32 arrays ``input_ids, position_ids, labels``.

    Positions restart at each document start and at each row start (a document split across rows
    is a new document in the next row); labels are -100 there and on the padding that fills the
    last row, which is a segment of its own so nothing attends to it either.
    """
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    used = int(lengths.sum())
    rows = max(1, math.ceil(used / seq_len))
    ids = np.full(rows * seq_len, pad_id, dtype=np.int32)
    if used:
        ids[:used] = np.concatenate(docs)
    starts = np.zeros(rows * seq_len + 1, dtype=bool)
    starts[np.cumsum(lengths) - lengths] = True
    starts[used] = True  # the padding segment (or one past the end)
    starts[::seq_len] = True
    starts = starts[:-1]
    index = np.arange(rows * seq_len)
    positions = index - np.maximum.accumulate(np.where(starts, index, 0))
    labels = np.where(starts, -100, ids)
    labels[used:] = -100
    return {name: a.astype(np.int32).reshape(rows, seq_len) for name, a in zip(COLUMNS, (ids, positions, labels))}


def _as_dataset(arrays: dict[str, np.ndarray]) -> datasets.Dataset:
    """Fixed-length int32 Arrow lists (no Python lists of ints in between); torch format gives int64."""
    table = pa.table(
        {name: pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1]) for name, a in arrays.items()}
    )
    return datasets.Dataset(table)


def _build(
    spec: DataSpec, tokenizer: Any, num_tokens: int, seed: int, cache_dir: Path
) -> tuple[datasets.Dataset, datasets.Dataset]:
    if tokenizer.eos_token_id is None:
        raise UserError("the teacher's tokenizer has no eos token to end documents with", where="teacher")
    train_rows = math.ceil(num_tokens / spec.seq_len)
    val_rows = max(1, round(train_rows * spec.validation_fraction))
    weights = [s.weight for s in spec.sources]
    quotas = zip(_quotas(val_rows * spec.seq_len, weights), _quotas(train_rows * spec.seq_len, weights))
    per_source = [
        _source_documents(source, i, source_quotas, spec, tokenizer, seed, cache_dir)
        for i, (source, source_quotas) in enumerate(zip(spec.sources, quotas))
    ]
    if not any(val for val, _ in per_source):
        raise UserError("no document could be held out for validation; add documents or sources", where="data")
    rng = np.random.default_rng([seed, 0])
    train = _interleave([train for _, train in per_source], rng)
    validation = _interleave([val for val, _ in per_source], rng)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return (
        _as_dataset(pack_documents(train, spec.seq_len, pad_id)),
        _as_dataset(pack_documents(validation, spec.seq_len, pad_id)),
    )


def _interleave(per_source: list[list[np.ndarray]], rng: np.random.Generator) -> list[np.ndarray]:
    """Merge the sources' document lists in a random order that keeps each source's own order.

    Every stretch of the stream then mixes the sources by their shares, and a cycled source still
    shows each document once per pass.
    """
    labels = rng.permutation(np.repeat(np.arange(len(per_source)), [len(docs) for docs in per_source]))
    readers = [iter(docs) for docs in per_source]
    return [next(readers[i]) for i in labels]
