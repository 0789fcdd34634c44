"""Stage losses, targets, schedules and checkpoints of `linearize`, on tiny models and tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from merge_xlstm.linearize.losses import SparseKDLoss, next_token_mask, sparse_topk_kl
from merge_xlstm.linearize.stage1 import Stage1Job, run_stage1
from merge_xlstm.linearize.targets import WithTargets, compute_targets
from merge_xlstm.linearize.training import Checkpoint, MetricsLog, make_accelerator, warmup_constant, warmup_cosine
from merge_xlstm.recipe import LinearizeRecipe, Stage2Spec
from merge_xlstm.student import from_teacher, new_parameters
from merge_xlstm.testing import tiny_teacher


def packed_rows(n: int, seq_len: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Rows of two documents each, in the format of merge_xlstm.linearize.data."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        cut = int(torch.randint(3, seq_len - 3, (1,), generator=g))
        ids = torch.randint(3, 128, (seq_len,), generator=g)
        pos = torch.cat([torch.arange(cut), torch.arange(seq_len - cut)])
        labels = ids.clone()
        labels[pos == 0] = -100
        rows.append({"input_ids": ids, "position_ids": pos, "labels": labels})
    return rows


def test_sparse_kd_loss_equals_a_hand_computation():
    torch.manual_seed(0)
    V, T, k = 6, 4, 3
    logits = torch.randn(1, T, V)
    teacher_logits = torch.randn(1, T, V)
    ids = torch.tensor([[1, 4, 2, 5]])
    labels = torch.tensor([[-100, 4, -100, 5]])  # a document starts at t=2
    top = F.log_softmax(teacher_logits, -1).topk(k, -1)

    class Fixed(torch.nn.Module):
        def forward(self, **kwargs):
            return type("Out", (), {"logits": logits})

    spec = Stage2Spec(tokens=1, ce_weight=0.9, kl_weight=0.1)
    batch = {"input_ids": ids, "position_ids": torch.tensor([[0, 1, 0, 1]]), "labels": labels,
             "topk_logprobs": top.values, "topk_indices": top.indices}
    loss, parts = SparseKDLoss(spec, steps_per_epoch=1)(Fixed(), batch, step=0)

    # by hand: positions 0 and 2 predict labels 4 and 5; position 1 would predict a document start
    ce = []
    kl = []
    for t, target in ((0, 4), (2, 5)):
        ce.append(-F.log_softmax(logits[0, t], -1)[target])
        p = torch.softmax(teacher_logits[0, t][top.indices[0, t]], -1)  # teacher renormalised on its top-k
        q = torch.softmax(logits[0, t][top.indices[0, t]], -1)  # student renormalised on the same support
        kl.append((p * (p.log() - q.log())).sum())
    want_ce, want_kl = torch.stack(ce).mean(), torch.stack(kl).mean()
    assert parts["ce"] == pytest.approx(want_ce.item(), rel=1e-5)
    assert parts["kl"] == pytest.approx(want_kl.item(), rel=1e-5)
    assert loss.item() == pytest.approx(0.9 * want_ce.item() + 0.1 * want_kl.item(), rel=1e-5)


def test_sparse_kl_is_zero_when_student_matches_teacher_on_the_support():
    logits = torch.randn(2, 5, 10)
    top = F.log_softmax(logits, -1).topk(4, -1)
    kl = sparse_topk_kl(logits + 3.0, top.values, top.indices)  # a shift leaves the softmax unchanged
    assert kl.abs().max() < 1e-6


def test_next_token_mask_skips_document_starts_and_the_last_position():
    labels = torch.tensor([[-100, 5, 6, -100, 7]])
    assert next_token_mask(labels).tolist() == [[True, True, False, True, False]]


def test_lr_schedules():
    assert warmup_cosine(0, 100, 10, 1e-2, 1e-5) == pytest.approx(1e-3)
    assert warmup_cosine(9, 100, 10, 1e-2, 1e-5) == pytest.approx(1e-2)
    assert warmup_cosine(100, 100, 10, 1e-2, 1e-5) == pytest.approx(1e-5)
    mid = warmup_cosine(55, 100, 10, 1e-2, 1e-5)
    assert mid == pytest.approx(1e-5 + 0.5 * (1e-2 - 1e-5) * (1 + math.cos(math.pi * 0.5)))
    assert warmup_constant(4, 10, 1e-5) == pytest.approx(5e-6) and warmup_constant(50, 10, 1e-5) == 1e-5


def test_topk_targets_round_trip(tmp_path):
    teacher = tiny_teacher("llama")
    rows = packed_rows(5, 16)
    accelerator = make_accelerator("cpu", "fp32")
    compute_targets(teacher, rows, rows=5, top_k=7, directory=tmp_path, split="train", accelerator=accelerator)
    stored = WithTargets(rows, tmp_path, "train")
    assert len(stored) == 5
    for r in (0, 4):
        item = stored[r]
        ids, pos = rows[r]["input_ids"], rows[r]["position_ids"]
        cut = int((pos == 0).nonzero()[1])
        with torch.no_grad():  # each document alone: the stored targets must not see across documents
            logits = torch.cat([teacher(input_ids=ids[None, :cut]).logits[0], teacher(input_ids=ids[None, cut:]).logits[0]])
        want = F.log_softmax(logits, -1).topk(7, -1)
        assert torch.equal(item["topk_indices"].long(), want.indices)
        torch.testing.assert_close(item["topk_logprobs"].float(), want.values, atol=2e-3, rtol=1e-3)  # float16
        assert torch.equal(item["input_ids"], rows[r]["input_ids"])
    mtime = (tmp_path / "train-00000.safetensors").stat().st_mtime_ns
    compute_targets(teacher, rows, rows=5, top_k=7, directory=tmp_path, split="train", accelerator=accelerator)
    assert (tmp_path / "train-00000.safetensors").stat().st_mtime_ns == mtime  # reused, not recomputed


def test_optimizer_checkpoint_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    params = dict(model.named_parameters())
    Checkpoint(tmp_path).save(params, opt, step=7)
    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    assert Checkpoint(tmp_path).load(dict(fresh.named_parameters()), fresh_opt) == 7
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    for sa, sb in zip(opt.state.values(), fresh_opt.state.values()):
        assert all(torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])) for k in sa)


def test_stage1_loss_falls_and_only_new_parameters_change(tmp_path):
    teacher = tiny_teacher("llama")
    student = from_teacher(teacher, mixer="hybrid", window_size=4, num_sink_tokens=2)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    recipe = LinearizeRecipe.model_validate({
        "name": "t", "teacher": "org/tiny", "data": {"sources": [{"path": "org/data"}], "seq_len": 32},
        "stage1": {"tokens": 32 * 4 * 30, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-2, "warmup_steps": 3,
                   "log_every": 1, "loss": {"output": 1.0, "gate": 0.0, "memory": 0.0}},  # paper A's loss
        "stage2": {"tokens": 1}, "seed": str(tmp_path / "seed"), "output": str(tmp_path / "out"),
    })
    run_stage1(Stage1Job.of(recipe), teacher=teacher, student=student, dataset=packed_rows(16, 32),
               accelerator=make_accelerator("cpu", "fp32"), work_dir=tmp_path / "work")
    rows = MetricsLog.read(tmp_path / "work" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]
    new = {id(p) for p in new_parameters(student)}
    for name, p in student.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (id(p) in new), name


def test_stage1_steps_the_output_gate_at_its_share_of_the_learning_rate(tmp_path):
    """Adam's first step moves every parameter by lr * g / (|g| + eps): with gate_lr_scale s the output
    gates move s times as far as at scale 1 and every other new parameter exactly as far."""
    teacher = tiny_teacher("llama")
    moved = []
    for scale in (1.0, 0.1):
        torch.manual_seed(0)
        student = from_teacher(teacher, mixer="hybrid", window_size=4, num_sink_tokens=2)
        before = {n: p.detach().clone() for n, p in student.named_parameters()}
        recipe = LinearizeRecipe.model_validate({
            "name": "t", "teacher": "org/tiny", "data": {"sources": [{"path": "org/data"}], "seq_len": 32},
            "stage1": {"tokens": 32 * 4, "batch_size": 4, "micro_batch_size": 4, "lr": 1e-2, "warmup_steps": 0,
                       "gate_lr_scale": scale},
            "stage2": {"tokens": 1}, "seed": str(tmp_path / "seed"), "output": str(tmp_path / "out"),
        })
        run_stage1(Stage1Job.of(recipe), teacher=teacher, student=student, dataset=packed_rows(4, 32),
                   accelerator=make_accelerator("cpu", "fp32"), work_dir=tmp_path / f"work{scale}")
        moved.append({n: p.detach() - before[n] for n, p in student.named_parameters()})
    gates = [n for n in moved[0] if ".ogate." in n]
    assert gates and all(moved[0][n].abs().max() > 1e-3 for n in gates)
    for name, full in moved[0].items():
        want = full * 0.1 if name in gates else full
        torch.testing.assert_close(moved[1][name], want, rtol=1e-4, atol=1e-9, msg=name)


ALL_TERMS = {"output": 1.0, "gate": 1.0, "memory": 1.0, "memory_share": 1.0, "attention_transfer": 1.0}


def stage1_on_every_term(teacher: torch.nn.Module, student: torch.nn.Module, tmp_path) -> list[dict]:
    """15 stage-I steps of every term (attention transfer at 8 sampled queries); the metrics rows."""
    recipe = LinearizeRecipe.model_validate({
        "name": "t", "teacher": "org/tiny", "data": {"sources": [{"path": "org/data"}], "seq_len": 32},
        "stage1": {"tokens": 32 * 4 * 15, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-2, "warmup_steps": 2,
                   "log_every": 1, "loss": ALL_TERMS, "attention_queries": 8},
        "stage2": {"tokens": 1}, "seed": str(tmp_path / "seed"), "output": str(tmp_path / "out"),
    })
    run_stage1(Stage1Job.of(recipe), teacher=teacher, student=student, dataset=packed_rows(16, 32),
               accelerator=make_accelerator("cpu", "fp32"), work_dir=tmp_path / "work")
    return MetricsLog.read(tmp_path / "work" / "metrics.jsonl")


@pytest.mark.parametrize("feature_dim", [None, 48])
def test_stage1_trains_every_term_on_the_evicted_memory(tmp_path, feature_dim):
    """All of stage I's terms at once, attention transfer at sampled queries included, on the default
    memory (evicted keys), with the head dim's features and with more (the evictedf256 variant's kind):
    each is logged per layer, finite, and the loss falls."""
    teacher = tiny_teacher("qwen2")
    student = from_teacher(teacher, mixer="hybrid", window_size=4, num_sink_tokens=2, feature_dim=feature_dim)
    assert student.model.layers[0].self_attn.phi_q.shape[-1] == (feature_dim or student.model.layers[0].self_attn.head_dim)
    assert student.config.memory_keys == "evicted"
    rows = stage1_on_every_term(teacher, student, tmp_path)
    layers = len(student.model.layers)
    for name in ALL_TERMS:
        assert all(math.isfinite(r[f"{name}_l{layer}"]) for r in rows for layer in range(layers)), name
    assert rows[-1]["attention_transfer"] > 0 and rows[-1]["loss"] < 0.9 * rows[0]["loss"]


def test_stage1_trains_only_the_memory_layers(tmp_path):
    """student.memory_layers [1]: layer 0 is the window alone, so its split terms are 0 and nothing of it
    trains; layer 1 trains every term, and its loss falls."""
    teacher = tiny_teacher("qwen2")
    student = from_teacher(teacher, mixer="hybrid", window_size=4, num_sink_tokens=2, memory_layers=[1])
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    rows = stage1_on_every_term(teacher, student, tmp_path)
    assert all(r[f"{name}_l0"] == 0 for r in rows for name in ALL_TERMS if name != "output")
    assert all(r["output_l0"] > 0 and all(r[f"{name}_l1"] > 0 for name in ALL_TERMS) for r in rows)
    layer1 = [sum(r[f"{name}_l1"] for name in ALL_TERMS) for r in rows]  # layer 0 has nothing to train
    assert layer1[-1] < 0.9 * layer1[0]
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("model.layers.1.self_attn.") for n in changed)
