"""The data side of packing: rows isolate documents (positions, labels), mixing, caching, refusals.

The tiny tokenizer is character-level, so a decoded row shows exactly which document each token
came from; documents carry an id ("#00042") at their start to follow them through packing.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from merge_xlstm.errors import UserError
from merge_xlstm.linearize import data
from merge_xlstm.linearize.data import build_packed_dataset, check_sources, pack_documents
from merge_xlstm.data.training import PACKAGED
from merge_xlstm.recipe import DataSpec

EOS = 2  # tiny_tokenizer: 0 pad, 1 bos, 2 eos


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def text_docs(tmp_path: Path, name: str, count: int, letter: str, length: int) -> Path:
    """`count` documents "#<id> <letter * length>" of distinct ids; lengths vary around `length`."""
    return write_jsonl(
        tmp_path / f"{name}.jsonl", [{"text": f"#{name}{i:05d} " + letter * (length + i % 7)} for i in range(count)]
    )


def spec(*sources: dict, seq_len: int = 64, validation_fraction: float = 0.1) -> DataSpec:
    return DataSpec(sources=list(sources), seq_len=seq_len, validation_fraction=validation_fraction)


def build(s: DataSpec, tokenizer, tmp_path: Path, num_tokens: int = 2048, seed: int = 0) -> data.PackedData:
    return build_packed_dataset(s, tokenizer, num_tokens=num_tokens, seed=seed, cache_dir=tmp_path / "cache")


def segments(rows) -> list[list[int]]:
    """Documents of packed rows: split where positions restart, then rejoin a document that ran on
    into the next row (a segment that starts a row and follows one without eos)."""
    out: list[list[int]] = []
    for ids, pos in zip(rows["input_ids"].tolist(), rows["position_ids"].tolist()):
        for j, (token, p) in enumerate(zip(ids, pos)):
            continues = j == 0 and out and out[-1][-1] != EOS
            if p == 0 and not continues:
                out.append([])
            out[-1].append(token)
    return out


# ------------------------------------------------------------------------------------ packing
def test_pack_round_trip_positions_and_labels() -> None:
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 100, size=n).astype(np.int32) for n in (5, 1, 30, 150, 7, 64, 12)]
    packed = pack_documents(docs, seq_len=64, pad_id=0)
    ids, pos, labels = (packed[k] for k in ("input_ids", "position_ids", "labels"))
    used = sum(map(len, docs))
    assert ids.shape == pos.shape == labels.shape == (-(-used // 64), 64)

    flat_ids, flat_pos, flat_labels = ids.reshape(-1), pos.reshape(-1), labels.reshape(-1)
    np.testing.assert_array_equal(flat_ids[:used], np.concatenate(docs))  # round trip, in order
    assert (flat_ids[used:] == 0).all() and (flat_labels[used:] == -100).all()
    starts = {0, used} | {int(s) for s in np.cumsum([0] + [len(d) for d in docs[:-1]])} | set(range(0, ids.size, 64))
    for t in range(ids.size):
        assert (flat_pos[t] == 0) == (t in starts), t
        assert flat_pos[t] == 0 or flat_pos[t] == flat_pos[t - 1] + 1
        assert (flat_labels[t] == -100) == (t in starts or t >= used)
        assert flat_labels[t] in (-100, flat_ids[t])


# -------------------------------------------------------------------------------- end to end
def test_rows_hold_whole_documents_in_order_of_the_source(tmp_path: Path, tokenizer) -> None:
    path = text_docs(tmp_path, "a", 40, "x", 20)
    packed = build(spec({"path": str(path)}), tokenizer, tmp_path, num_tokens=1000)
    train, val = packed.train, packed.validation
    assert len(train) == -(-1000 // 64) and len(val) >= 1
    assert tuple(train[0]["input_ids"].shape) == (64,) and str(train[0]["input_ids"].dtype) == "torch.int64"
    assert set(train[0]) == {"input_ids", "position_ids", "labels"}

    encoded = [tokenizer(json.loads(line)["text"])["input_ids"] + [EOS] for line in path.read_text().splitlines()]
    train_docs = segments(train[:])
    assert sum(map(len, train_docs)) == len(train) * 64  # training rows are full: no padding
    cut = [doc for doc in train_docs if doc not in encoded]
    # Every document comes back whole, except the one cut at the end of the source's token share.
    assert len(cut) <= 1 and all(any(full[: len(doc)] == doc for full in encoded) for doc in cut)
    # Labels are -100 exactly where positions restart (training rows have no padding).
    np.testing.assert_array_equal(train[:]["labels"] == -100, train[:]["position_ids"] == 0)

    # Validation documents are held out: none of their ids occurs in training.
    val_ids = {tokenizer.decode(d[:7]) for d in segments(val[:]) if tokenizer.decode(d[:1]) == "#"}
    train_ids = {tokenizer.decode(d[:7]) for d in train_docs if tokenizer.decode(d[:1]) == "#"}
    assert val_ids and not val_ids & train_ids


def test_small_source_cycles_in_a_new_order_each_pass(tmp_path: Path, tokenizer) -> None:
    path = text_docs(tmp_path, "a", 12, "x", 20)  # ~330 tokens, asked for 10x that
    packed = build(spec({"path": str(path)}, validation_fraction=0.0), tokenizer, tmp_path, num_tokens=3200)
    ids = [tokenizer.decode(d[:7]) for d in segments(packed.train[:]) if tokenizer.decode(d[:1]) == "#"]
    assert len(packed.train) == 50
    passes = [ids[i : i + 11] for i in range(0, 44, 11)]  # 11 documents train, 1 is held out
    assert all(sorted(p) == sorted(passes[0]) for p in passes) and len({tuple(p) for p in passes}) > 1


def test_mixing_weights_are_token_shares(tmp_path: Path, tokenizer) -> None:
    s = spec(
        {"path": str(text_docs(tmp_path, "a", 300, "a", 30)), "weight": 3},
        {"path": str(text_docs(tmp_path, "b", 300, "b", 60)), "weight": 1},
        {"path": "packaged:math_word_problems", "weight": 1},
    )
    rows = build(s, tokenizer, tmp_path, num_tokens=6400).train[:]
    docs = segments(rows)
    share = {"a": 0, "b": 0, "other": 0}
    for doc in docs:
        head = tokenizer.decode(doc[:2])
        share[head[1] if head in ("#a", "#b") else "other"] += len(doc)
    total = rows["input_ids"].numel()
    assert abs(share["a"] / total - 0.6) < 0.03 and abs(share["b"] / total - 0.2) < 0.03, share


def test_deterministic_given_seed(tmp_path: Path, tokenizer) -> None:
    s = spec({"path": str(text_docs(tmp_path, "a", 100, "x", 20))}, {"path": "packaged:math_symbolic"})
    first = build(s, tokenizer, tmp_path, seed=1)
    again = build_packed_dataset(s, tokenizer, num_tokens=2048, seed=1, cache_dir=tmp_path / "elsewhere")
    other = build(s, tokenizer, tmp_path, seed=2)
    rows = [p.train[:]["input_ids"] for p in (first, again, other)]
    assert rows[0].equal(rows[1]) and first.fingerprint == again.fingerprint  # rebuilt from scratch: same rows
    assert not rows[0].equal(rows[2]) and first.fingerprint != other.fingerprint


def test_cache_is_reused(tmp_path: Path, tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    s = spec({"path": str(text_docs(tmp_path, "a", 50, "x", 20))})
    first = build(s, tokenizer, tmp_path).train[:]["input_ids"]

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(data, "_tokenize", no_tokenising)
    assert build(s, tokenizer, tmp_path).train[:]["input_ids"].equal(first)
    with pytest.raises(AssertionError, match="tokenised again"):  # another budget is another dataset
        build(s, tokenizer, tmp_path, num_tokens=4096)


def test_chat_sources_use_the_chat_template(tmp_path: Path, tokenizer) -> None:
    chats = [
        [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"answer {i}."}]
        for i in range(20)
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"conversation": chat} for chat in chats])
    rows = build(
        spec({"path": str(path), "messages_field": "conversation"}), tokenizer, tmp_path, num_tokens=256
    ).train[:]
    rendered = [
        tokenizer(tokenizer.apply_chat_template(chat, tokenize=False), add_special_tokens=False)["input_ids"]
        for chat in chats
    ]
    first = segments(rows)[0]
    assert first in rendered and tokenizer.decode(first).startswith("<|user|>\nquestion")


# ---------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("split", ["test", "train+test", "test[:10%]"])
def test_test_splits_are_refused(tmp_path: Path, tokenizer, split: str) -> None:
    s = spec({"path": str(text_docs(tmp_path, "a", 5, "x", 5)), "split": split})
    with pytest.raises(UserError, match="test split"):
        build(s, tokenizer, tmp_path)


def test_humaneval_is_refused(tmp_path: Path, tokenizer) -> None:
    path = write_jsonl(tmp_path / "HumanEval.jsonl", [{"text": "def f(): pass"}])
    with pytest.raises(UserError, match="evaluation-only"):
        build(spec({"path": str(path)}), tokenizer, tmp_path)


def test_unknown_packaged_source_lists_the_known_ones(tmp_path: Path, tokenizer) -> None:
    with pytest.raises(UserError, match=r"unknown packaged source 'nope' \(known: .*python_stdlib"):
        build(spec({"path": "packaged:nope"}), tokenizer, tmp_path)


def test_unreachable_hub_dataset_is_a_one_line_error(tmp_path: Path, tokenizer) -> None:
    with pytest.raises(UserError, match="cannot load 'no-such-org/no-such-data'") as err:
        build(spec({"path": "no-such-org/no-such-data", "split": "validation"}), tokenizer, tmp_path)
    assert "\n" not in str(err.value)


def test_missing_field_names_the_fields(tmp_path: Path, tokenizer) -> None:
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "why?"}] * 3)
    with pytest.raises(UserError, match="no field 'text' \\(fields: question\\)"):
        build(spec({"path": str(path)}), tokenizer, tmp_path)


# --------------------------------------------------------------------------- packaged sources
@pytest.mark.parametrize("name", PACKAGED.names())
def test_packaged_source_yields_sensible_records(name: str) -> None:
    entry = PACKAGED.get(name)
    assert entry.split != "test" and "test" not in entry.split.split("+")
    assert "Origin:" in entry.description
    records = list(itertools.islice(entry.records(0) if entry.endless else entry.records(), 20))
    assert len(records) == 20
    for record in records:
        if "messages" in record:
            roles = [m["role"] for m in record["messages"]]
            assert roles[:2] == ["user", "assistant"] and all(m["content"].strip() for m in record["messages"])
        else:
            assert record["text"].strip()
    if entry.endless:  # deterministic given the seed, different for another seed
        assert records == list(itertools.islice(entry.records(0), 20)) != list(itertools.islice(entry.records(1), 20))


# ------------------------------------------------------------------------------------- recipes
def test_domain_recipes_load_and_share_what_makes_experts_mergeable() -> None:
    from merge_xlstm.recipe import load_linearize_recipe

    recipes = {name: load_linearize_recipe(f"recipes/{name}.yaml") for name in ("math", "code", "stem", "chat")}
    for field in ("teacher", "student", "stage1", "seed", "random_seed"):
        assert len({repr(getattr(r, field)) for r in recipes.values()}) == 1, field
    assert len({r.data.seq_len for r in recipes.values()}) == 1
    for name, recipe in recipes.items():
        assert recipe.output == f"experts/{name}"
        check_sources(recipe.data)  # no test split, only known packaged sources


def test_chitchat_training_skips_the_conversations_the_chat_eval_scores():
    from merge_xlstm.data.heldout import is_heldout_conversation as is_heldout
    from merge_xlstm.data.packages import package_dir
    from merge_xlstm.data.training import chat

    everything = json.loads(
        (package_dir("chitchat_dataset") / "dataset.json").read_text()
    )
    training = chat._chitchat()
    assert not any(is_heldout(cid) for cid in training)
    assert set(training) | {cid for cid in everything if is_heldout(cid)} == set(everything)
    assert 0.85 < len(training) / len(everything) < 0.95
