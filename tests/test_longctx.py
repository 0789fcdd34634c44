"""Long-context evaluation (issue 12): CE by position, pass-key, held-out documents, the longctx suite."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from merge_xlstm.cli import main as cli
from merge_xlstm.data import heldout
from merge_xlstm.data.training import PACKAGED
from merge_xlstm.errors import UserError
from merge_xlstm.eval import longctx, longdocs
from merge_xlstm.eval.scores import load_scores
from merge_xlstm.eval.suites import get_suite, passkey
from merge_xlstm.linearize.data import build_packed_dataset
from merge_xlstm.linearize.report import long_context_report, model_card
from merge_xlstm.recipe import DataSpec, LongContextSpec, PositionCESpec, load_linearize_recipe
from merge_xlstm.student import from_teacher
from merge_xlstm.testing import tiny_teacher, tiny_tokenizer

CPU = torch.device("cpu")


def random_docs(lengths: list[int], seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=generator).tolist() for n in lengths]


# ------------------------------------------------------------------------------ CE by position
@pytest.mark.parametrize("kind", ["teacher", "hybrid"])
def test_ce_by_position_equals_full_forward_passes_binned_by_hand(kind):
    """Chunks continuing the model's cache, batches of two and a shorter document give a full pass's CE."""
    teacher = tiny_teacher("llama")
    model = teacher if kind == "teacher" else from_teacher(teacher, window_size=16, num_sink_tokens=2).eval()
    docs = random_docs([100, 100, 70])
    edges = [0, 8, 40, 100]
    losses = longctx.position_losses(model, docs, chunk_tokens=32, batch_size=2, device=CPU)

    per_position: list[list[float]] = [[] for _ in range(100)]
    with torch.no_grad():
        for doc in docs:
            ids = torch.tensor([doc])
            ce = F.cross_entropy(model(input_ids=ids).logits[0, :-1], ids[0, 1:], reduction="none")
            for position, value in enumerate(ce.tolist(), start=1):  # logits at t predict position t + 1
                per_position[position].append(value)
    for entry, (start, end) in zip(losses.bins(edges), zip(edges, edges[1:]), strict=True):
        values = [v for p in range(start, end) for v in per_position[p]]
        assert (entry["start"], entry["end"], entry["tokens"]) == (start, end, len(values))
        assert entry["ce"] == pytest.approx(float(np.mean(values)), abs=1e-5)
    assert (losses.gates is None) == (kind == "teacher")


def test_bins_are_right_at_their_edges():
    """The token at position e belongs to the bin starting at e; the last bin is cut at the documents' end."""
    length, edges = 600, [0, 128, 512, 1024, 2048]
    counts = np.ones(length)
    counts[0] = 0  # nothing predicts position 0
    flat = longctx.PositionLosses(np.zeros(length), counts, None)
    assert [(b["start"], b["end"], b["tokens"]) for b in flat.bins(edges)] == [(0, 128, 127), (128, 512, 384),
                                                                               (512, 600, 88)]  # fmt: skip
    for edge in (128, 512):
        for position, bin_index in ((edge - 1, edges.index(edge) - 1), (edge, edges.index(edge))):
            sums = np.zeros(length)
            sums[position] = 1.0
            means = [b["ce"] for b in longctx.PositionLosses(sums, counts, None).bins(edges)]
            assert [i for i, m in enumerate(means) if m > 0] == [bin_index], (edge, position)


PERIOD, FIRST, COUNT = 16, 8, 32  # documents repeat a block of PERIOD tokens drawn from ids FIRST..FIRST+COUNT-1


def copying_teacher() -> torch.nn.Module:
    """A one-layer llama built to copy the token PERIOD - 1 positions back, which continues a repeated block.

    Every head attends by position only: q and k read a constant embedding channel into each RoPE
    frequency pair, q turned back by the angle of PERIOD - 1 steps, so the score is the sum over
    frequencies of cos(w (t - s - PERIOD + 1)), largest at that offset. Values carry the token's one-hot
    code (half of the codes per KV head), o_proj writes it to channels of its own, lm_head reads them.
    """
    model = tiny_teacher("llama", hidden_size=96, num_hidden_layers=1)
    config, attn = model.config, model.model.layers[0].self_attn
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim, half, per_kv = config.hidden_size // heads, config.hidden_size // heads // 2, COUNT // kv_heads
    turn = -model.model.rotary_emb.inv_freq * (PERIOD - 1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(0.0)
        for norm in (model.model.layers[0].input_layernorm, model.model.layers[0].post_attention_layernorm,
                     model.model.norm):  # fmt: skip
            norm.weight.fill_(1.0)
        model.model.embed_tokens.weight[:, 0] = 1.0  # the constant channel
        for code in range(COUNT):
            model.model.embed_tokens.weight[FIRST + code, 1 + code] = 1.0
            model.lm_head.weight[FIRST + code, 1 + COUNT + code] = 2.0
        for head in range(heads):
            attn.q_proj.weight[head * dim : head * dim + half, 0] = 12 * torch.cos(turn)
            attn.q_proj.weight[head * dim + half : (head + 1) * dim, 0] = 12 * torch.sin(turn)
        for group in range(kv_heads):
            attn.k_proj.weight[group * dim : group * dim + half, 0] = 12.0
            head = group * (heads // kv_heads)  # the first query head reading this KV head
            for j in range(per_kv):
                attn.v_proj.weight[group * dim + j, 1 + group * per_kv + j] = 1.0
                attn.o_proj.weight[1 + COUNT + group * per_kv + j, head * dim + j] = 1.0
    return model.eval()


def test_a_model_that_sees_the_context_beats_one_that_cannot():
    """Copying from PERIOD - 1 tokens back: the teacher can, its SWA student with a window of 4 cannot.

    Inside the window the two are the same model; beyond it, CE by position must show the gap, and
    the recovery figure must put the teacher at 1 and the SWA student at 0.
    """
    teacher = copying_teacher()
    swa = from_teacher(teacher, mixer="swa", window_size=4, num_sink_tokens=0).eval()
    generator = torch.Generator().manual_seed(0)
    docs = [torch.randint(FIRST, FIRST + COUNT, (PERIOD,), generator=generator).repeat(4).tolist() for _ in range(6)]
    edges = [0, 4, PERIOD, 4 * PERIOD]
    curves = {name: longctx.position_losses(m, docs, chunk_tokens=24, batch_size=3, device=CPU).bins(edges)
              for name, m in (("teacher", teacher), ("swa", swa))}  # fmt: skip
    assert curves["teacher"][0]["ce"] == pytest.approx(curves["swa"][0]["ce"], abs=1e-5)
    assert curves["teacher"][2]["ce"] < 0.01 < 1.0 < curves["swa"][2]["ce"]
    recovery = {name: longctx.recovery(curve, curves["teacher"], curves["swa"], start=PERIOD)
                for name, curve in curves.items()}  # fmt: skip
    assert [r["recovery"] for r in recovery["teacher"]] == [1.0]
    assert [r["recovery"] for r in recovery["swa"]] == [0.0]


def test_ce_curves_png(tmp_path):
    bins = [{"start": 0, "end": 128, "ce": 2.0}, {"start": 128, "end": 512, "ce": 1.5}]
    longctx.plot_ce_curves({"a": bins, "b": bins}, tmp_path / "ce.png", title="t")
    assert (tmp_path / "ce.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------ pass-key
@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """A tiny llama teacher and its hybrid student (window 16, 2 sinks), saved with the tiny tokenizer."""
    root = tmp_path_factory.mktemp("longctx")
    teacher = tiny_teacher("llama")
    dirs = {"teacher": root / "teacher", "student": root / "student"}
    teacher.save_pretrained(dirs["teacher"])
    from_teacher(teacher, window_size=16, num_sink_tokens=2).save_pretrained(dirs["student"])
    for path in dirs.values():
        tiny_tokenizer().save_pretrained(path)
    return dirs


def fits(tokens: int, size: int) -> bool:
    """A prompt of the character-level tokenizer fills `size` up to less than one more filler word and space."""
    return size - 1 - max(map(len, passkey.FILLER.split())) < tokens <= size


def test_passkey_documents_are_deterministic_and_contain_the_key(tiny_dirs):
    context = tiny_teacher("llama").config.max_position_embeddings
    settings = passkey.task_settings()
    common = {"answer_tokens": settings["answer_tokens"], "max_depth": settings["max_depth"],
              "pretrained": str(tiny_dirs["teacher"])}  # fmt: skip
    loaded = passkey.load(length=300, trials=6, **common)["generated"]
    again = passkey.load(length=300, trials=4, **common)["generated"]
    docs = list(loaded)
    assert docs[:4] == list(again)  # the same trials whatever their number
    assert len({d["passkey"] for d in docs}) == 6 and len({d["depth"] for d in docs}) == 6
    tokenizer = tiny_tokenizer()
    for doc in docs:
        assert len(doc["passkey"]) == 5 and doc["prompt"].count(passkey.NEEDLE.format(key=doc["passkey"])) == 1
        assert fits(doc["tokens"], 300) and doc["tokens"] == len(tokenizer(doc["prompt"])["input_ids"])
        assert doc["prompt"].endswith(passkey.QUESTION)
        filler = doc["prompt"].split("\n")[1]
        before = filler[: filler.index(passkey.NEEDLE.format(key=doc["passkey"]))].split()
        words = len(filler.split()) - len(passkey.NEEDLE.split())
        assert abs(len(before) - doc["depth"] * words) <= 3  # at the sentence end nearest its depth
        assert 0 <= doc["depth"] < settings["max_depth"]  # in the first part: far from the question
    capped = passkey.load(length=4096, trials=2, **common)["generated"]
    assert all(fits(d["tokens"], context - settings["answer_tokens"]) for d in capped)
    assert [d["length"] for d in capped] == [4096, 4096]


def test_passkey_scoring_is_exact_match_of_the_first_number():
    doc = {"passkey": "40312"}
    assert passkey.score(doc, [" 40312. Remember"]) == {"exact_match": 1.0}
    assert passkey.score(doc, [" 4031"]) == {"exact_match": 0.0}
    assert passkey.score(doc, [" 403125"]) == {"exact_match": 0.0}
    assert passkey.score(doc, [" unknown"]) == {"exact_match": 0.0}


# ------------------------------------------------------------------------------- held-out text
def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_training_refuses_a_source_containing_a_held_out_document(tmp_path, tokenizer):
    name, text = next(longdocs.held_out_texts())
    reindented = "\n".join("  " + line for line in text.splitlines()[:3000])  # a part, inside a larger file
    chat = [{"role": "user", "content": f"Hi.\n{passkey.FILLER}  {passkey.FILLER}"},
            {"role": "assistant", "content": "ok"}]  # fmt: skip
    code = [{"text": "clean"}, {"text": f"# vendored\n{reindented}\n# end"}]
    cases = [
        (write_jsonl(tmp_path / "code.jsonl", code), {}, name),
        (write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}]), {"messages_field": "messages"}, "pass-key filler"),
    ]
    clean = write_jsonl(tmp_path / "clean.jsonl", [{"text": f"document {i}"} for i in range(20)])
    for path, fields, refused in cases:
        spec = DataSpec(sources=[{"path": str(clean)}, {"path": str(path), **fields}], seq_len=64)
        with pytest.raises(UserError, match=r"^data\.sources\[1\]: contains the held-out document") as error:
            build_packed_dataset(spec, tokenizer, num_tokens=256, seed=0, cache_dir=tmp_path / "cache")
        assert refused in str(error.value)
    # A few shared lines (a header, an idiom) are no copy.
    path = write_jsonl(tmp_path / "excerpt.jsonl", [{"text": "\n".join(text.splitlines()[:40])}, {"text": "more"}])
    spec = DataSpec(sources=[{"path": str(path)}], seq_len=64)
    assert len(build_packed_dataset(spec, tokenizer, num_tokens=256, seed=0, cache_dir=tmp_path / "cache").train)


def test_packaged_training_sources_hold_no_held_out_text():
    """What every shipped recipe trains on (python_stdlib, python_functions, chitchat, ...) passes the check."""
    for name in PACKAGED.names():
        entry = PACKAGED.get(name)
        records = list(itertools.islice(entry.records(0), 2000) if entry.endless else entry.records())
        table = datasets.Dataset.from_list(records)
        field = "messages" if "messages" in table.column_names else "text"
        heldout.check_records(table, field, field == "messages", where=name)


def test_held_out_documents_are_long_enough_and_pinned():
    assert len(longdocs.LONG_DOCUMENTS) >= 16
    assert len({d.package for d in longdocs.LONG_DOCUMENTS[:5]}) == 5  # a prefix mixes the packages
    texts = [longdocs.read_text(doc) for doc in longdocs.LONG_DOCUMENTS]
    assert all(len(text) > 4 * 8192 for text in texts)  # SmolLM2 needs ~4 characters a token on them
    with pytest.raises(UserError, match="fewer than max_tokens"):
        longdocs.token_documents(tiny_tokenizer(), 1, 10**7, where="x")


# -------------------------------------------------------------------- the longctx suite and report
def test_longctx_suite_runs_through_eval_and_compare_reads_it(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "results"
    argv = ["eval", str(tiny_dirs["teacher"]), str(tiny_dirs["student"]), "--suite", "longctx", "--output", str(out),
            "--limit", "1", "--metadata", "max_tokens=200", "--metadata", "chunk_tokens=64"]
    assert cli(argv) == 0
    printed = capsys.readouterr().out
    assert "ce_by_position" in printed and "gain over" in printed
    tasks = {task.name for task in get_suite("longctx").tasks}
    folders = {name: next(out.glob(f"*{name}/longctx")) for name in tiny_dirs}
    for folder in folders.values():
        scores = load_scores(str(folder))
        assert set(scores.tasks) == tasks and {s.domain for s in scores.tasks.values()} == {"longctx"}
        assert all(len(s.docs.values) == 1 for s in scores.tasks.values())
        result = json.loads((folder / "ce_by_position.json").read_text())
        assert [b["end"] for b in result["bins"]] == [128, 200] and result["tokens_per_document"] == 200
        assert len(result["documents"]) == 1 and (folder / "ce_by_position.png").is_file()
    combined = json.loads((out / "ce_by_position.json").read_text())
    assert combined["reference"] == folders["teacher"].parent.name
    assert all(b["gain"] == 0 for b in combined["models"][combined["reference"]])
    ref, other = (combined["models"][folders[name].parent.name] for name in ("teacher", "student"))
    assert [b["gain"] for b in other] == [r["ce"] - b["ce"] for r, b in zip(ref, other)]
    assert cli(["compare", str(folders["teacher"]), str(folders["student"])]) == 0
    assert "mx_passkey_8k" in capsys.readouterr().out

    # The report's native pass-key run generates what lm-eval generated.
    (samples,) = folders["student"].glob("samples_mx_passkey_256_*.jsonl")
    logged = sorted((json.loads(line) for line in samples.open()), key=lambda s: s["doc_id"])
    student = longctx.load_model(tiny_dirs["student"], CPU)
    (native,) = longctx.passkey_accuracy(student, tiny_tokenizer(), [256], 1, device=CPU, batch_size=1)
    assert [a["response"] for a in native["answers"]] == [s["filtered_resps"][0] for s in logged]


def test_eval_refuses_unknown_or_bad_settings(tiny_dirs, capsys):
    assert cli(["eval", str(tiny_dirs["teacher"]), "--suite", "longctx", "--metadata", "trails=3"]) == 2
    err = capsys.readouterr().err
    assert "--metadata: suite longctx has no setting 'trails'" in err and "trials" in err
    assert cli(["eval", str(tiny_dirs["teacher"]), "--suite", "longctx", "--metadata", "bins=[0, 64, 32]"]) == 2
    assert "measure ce_by_position: bins: bin edges must start at 0 and increase" in capsys.readouterr().err


def test_long_context_report_and_card(tiny_dirs):
    student = longctx.load_model(tiny_dirs["student"], CPU)
    spec = LongContextSpec(ce=PositionCESpec(documents=2, max_tokens=300, bins=[0, 16, 64, 300], chunk_tokens=100),
                           passkey_lengths=[300], passkey_trials=2, recovery_from=64)  # fmt: skip
    report = long_context_report(student, tiny_tokenizer(), spec, teacher=str(tiny_dirs["teacher"]), device=CPU)
    ce = report["ce_by_position"]
    assert {"expert", "teacher", "swa_only"} <= set(ce) and ce["tokens_per_document"] == 300
    # inside the window (16) the student's SWA-only twin is its teacher
    assert ce["swa_only"][0]["ce"] == pytest.approx(ce["teacher"][0]["ce"], abs=1e-5)
    assert [r["start"] for r in report["recovery"]] == [64]
    assert [r["trials"] for r in report["passkey"]["expert"]] == [2]
    card = model_card(name="x", recipe={"teacher": "t", "student": {}}, provenance={"long_context": report},
                      metrics={}, gates=None)  # fmt: skip
    assert "| 16–64 |" in card and "Pass-key retrieval, teacher: " in card
    off = LongContextSpec(ce=PositionCESpec(documents=0), passkey_trials=0)
    assert long_context_report(student, tiny_tokenizer(), off, teacher="unused", device=CPU) is None


def test_recipe_longctx_settings_are_validated(write_text):
    recipe = write_text("r.yaml", """
        name: code
        teacher: org/model
        data: {sources: [{path: "packaged:python_stdlib"}]}
        stage1: {tokens: 10}
        stage2: {tokens: 10}
        seed: s
        output: o
    """)
    assert load_linearize_recipe(recipe).longctx == LongContextSpec()
    with pytest.raises(UserError, match=r"longctx\.ce\.bins: bin edges must start at 0 and increase"):
        load_linearize_recipe(recipe, ["longctx.ce.bins=[0, 512, 128]"])
