"""The Distil-xLSTM student (paper B) and its Delta-distillation loss, on a tiny Llama teacher."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM

from merge_xlstm.errors import UserError
from merge_xlstm.linearize.distil import DeltaDistilLoss, DeltaSchedule
from merge_xlstm.linearize.losses import LOSSES
from merge_xlstm.recipe import DistilSchedule, Stage2Spec, load_linearize_recipe
from merge_xlstm.student.cache import output_cache
from merge_xlstm.student.modeling_distil_xlstm import DistilXLSTMForCausalLM, build_distil_xlstm
from merge_xlstm.testing import tiny_teacher

REPO = Path(__file__).resolve().parents[1]
PAD = 0


def make_student(tie: bool = False) -> tuple[nn.Module, DistilXLSTMForCausalLM]:
    """A tiny teacher and its 3-block student (sLSTM, mLSTM, sLSTM): both block kinds, fast on CPU."""
    teacher = tiny_teacher("llama", tie_word_embeddings=tie)
    torch.manual_seed(0)
    return teacher, build_distil_xlstm(teacher, num_blocks=3, slstm_at=[0, 2], num_heads=4).eval()


@pytest.fixture(scope="module")
def student() -> DistilXLSTMForCausalLM:
    return make_student()[1]


def tokens(*lengths: int, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (1, n), generator=g) for n in lengths]


def left_pad(rows: list[Tensor]) -> tuple[Tensor, Tensor]:
    width = max(r.shape[1] for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - r.shape[1] :], mask[i, width - r.shape[1] :] = r[0], 1
    return ids, mask


# ----------------------------------------------------------------------------------------- model
@pytest.mark.parametrize("tie", [False, True])
def test_embedding_and_head_are_the_teachers_and_frozen(tie: bool) -> None:
    teacher, student = make_student(tie)
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert (student.lm_head.weight is student.model.embed_tokens.weight) == tie
    assert not student.model.embed_tokens.weight.requires_grad and not student.lm_head.weight.requires_grad
    trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("model.blocks.") for name in trainable)
    gains = 1 + student.model.blocks.post_blocks_norm.weight  # xlstm's LayerNorm scales by 1 + weight
    assert torch.allclose(gains, teacher.model.norm.weight)
    kinds = [type(b).__name__ for b in student.model.blocks.blocks]
    assert kinds == ["sLSTMBlock", "mLSTMBlock", "sLSTMBlock"]


def test_parallel_form_is_the_package_stack_and_the_recurrent_form_agrees(student: DistilXLSTMForCausalLM) -> None:
    ids = torch.cat(tokens(9, 9, seed=1))
    with torch.no_grad():
        parallel = student(ids).logits
        stack = student.lm_head(student.model.blocks(student.model.embed_tokens(ids)))
        whole = student(ids, use_cache=True)
        first = student(ids[:, :4], use_cache=True)
        rest = student(ids[:, 4:], cache=output_cache(first), use_cache=True)
    torch.testing.assert_close(parallel, stack, rtol=0, atol=1e-6)
    torch.testing.assert_close(whole.logits, parallel, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), parallel, rtol=1e-5, atol=1e-5)
    assert output_cache(whole).get_seq_length() == 9 and output_cache(rest).get_seq_length() == 9


def test_cached_generate_equals_an_uncached_rollout(student: DistilXLSTMForCausalLM) -> None:
    prompt = torch.cat(tokens(6, 6, seed=2))
    with torch.no_grad():
        generated = student.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=PAD)
        rollout = prompt
        for _ in range(8):
            next_token = student(rollout).logits[:, -1].argmax(-1, keepdim=True)
            rollout = torch.cat([rollout, next_token], 1)
    assert torch.equal(generated, rollout)


@pytest.mark.parametrize("tie", [False, True])
def test_save_and_reload_is_exact(tie: bool, tmp_path: Path) -> None:
    _, student = make_student(tie)
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is DistilXLSTMForCausalLM
    before, after = student.state_dict(), reloaded.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) == tie
    assert not reloaded.model.embed_tokens.weight.requires_grad and not reloaded.lm_head.weight.requires_grad
    ids = torch.cat(tokens(7, seed=3))
    with torch.no_grad():
        assert torch.equal(student(ids).logits, reloaded(ids).logits)


def test_packed_documents_do_not_see_each_other(student: DistilXLSTMForCausalLM) -> None:
    a, b, c = tokens(5, 9, 2, seed=4)
    packed = torch.cat([a, b, c], 1)
    position_ids = torch.cat([torch.arange(5), torch.arange(9), torch.arange(2)])[None]
    with torch.no_grad():
        alone = torch.cat([student(doc).logits for doc in (a, b, c)], 1)
        parallel = student(packed, position_ids=position_ids).logits
        recurrent = student(packed, position_ids=position_ids, use_cache=True).logits
    torch.testing.assert_close(parallel, alone, rtol=0, atol=1e-6)
    torch.testing.assert_close(recurrent, alone, rtol=1e-5, atol=1e-5)


def test_left_padded_batch_equals_each_row_alone(student: DistilXLSTMForCausalLM) -> None:
    rows = tokens(4, 9, 6, seed=5)
    ids, mask = left_pad(rows)
    with torch.no_grad():
        padded = student(ids, attention_mask=mask).logits
        cached = student(ids, attention_mask=mask, use_cache=True).logits
        generated = student.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
        for i, row in enumerate(rows):
            real = mask[i].bool()
            alone = student(row).logits[0]
            torch.testing.assert_close(padded[i, real], alone, rtol=0, atol=1e-6)
            torch.testing.assert_close(cached[i, real], alone, rtol=1e-5, atol=1e-5)
            own = student.generate(row, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
            assert torch.equal(generated[i, ids.shape[1] :], own[0, row.shape[1] :])


# -------------------------------------------------------------------------------------- schedule
def test_delta_schedule_follows_the_formula() -> None:
    alpha = DeltaSchedule(start=0.8, end=0.5, delta=0.05)
    for epoch, x0 in [(0, 0.8), (1, 0.8 * 0.95), (3, 0.8 * 0.95**3)]:
        assert alpha.epoch_start(epoch) == pytest.approx(x0)
        for k in (0, 1, 7, 1000):
            assert alpha.value(k, epoch) == pytest.approx(0.5 + (x0 - 0.5) / (1 + math.log(1 + k)))
    assert alpha.value(0, 0) == 0.8
    # max() is a floor: the restart value decays geometrically but never below x_final, then stays there.
    temperature = DeltaSchedule(start=2.0, end=1.0, delta=0.05)
    assert temperature.epoch_start(13) == pytest.approx(2.0 * 0.95**13) and 2.0 * 0.95**14 < 1.0
    assert temperature.epoch_start(14) == 1.0 and temperature.value(5, 20) == 1.0
    assert DeltaSchedule(start=0.8, end=0.5, delta=0.5).value(3, 1) == 0.5  # 0.8 * 0.5 < 0.5: floored
    with pytest.raises(ValueError, match="decreases"):
        DeltaSchedule(start=1.0, end=2.0, delta=0.05)


def test_loss_schedule_counts_steps_within_epochs() -> None:
    spec = Stage2Spec(tokens=1, distil=DistilSchedule(delta=0.1))
    loss = LOSSES.get("delta_distil")(spec, steps_per_epoch=10)
    x0_alpha, x0_t = 0.8 * 0.9, 2.0 * 0.9  # epoch 1 restarts at x_0 * (1 - delta)
    alpha, temperature = loss.schedule(13)  # epoch 1, step 3 of it
    assert alpha == pytest.approx(0.5 + (x0_alpha - 0.5) / (1 + math.log(4)))
    assert temperature == pytest.approx(1.0 + (x0_t - 1.0) / (1 + math.log(4)))
    with pytest.raises(UserError, match="stage2.distil"):
        DeltaDistilLoss(Stage2Spec(tokens=1, distil=DistilSchedule(alpha_start=0.2)), steps_per_epoch=10)


# ------------------------------------------------------------------------------------------ loss
class Fixed(nn.Module):
    """A stand-in model that returns fixed logits and hidden states and records its inputs."""

    def __init__(self, logits: list[list[float]], hidden: list[list[list[float]]]) -> None:
        super().__init__()
        self.logits, self.hidden = torch.tensor([logits]), tuple(torch.tensor([h]) for h in hidden)
        self.calls: list[dict] = []

    def forward(self, **kwargs) -> SimpleNamespace:
        self.calls.append(kwargs)
        return SimpleNamespace(logits=self.logits, hidden_states=self.hidden)


def test_loss_equals_a_hand_computation() -> None:
    # One row of two documents: tokens 0-1 and 2-3. Trained positions (next token in the same
    # document): t=0 -> label 2 and t=2 -> label 1.
    batch = {
        "input_ids": torch.tensor([[3, 2, 4, 1]]),
        "position_ids": torch.tensor([[0, 1, 0, 1]]),
        "labels": torch.tensor([[-100, 2, -100, 1]]),
    }
    zs = [[0.1, 1.0, -0.5, 0.3, 0.0], [9.0, 9.0, 9.0, 9.0, 9.0], [1.5, -1.0, 0.2, 0.0, 0.7], [9.0] * 5]
    zt = [[0.4, 0.2, 1.1, -0.3, 0.5], [0.0] * 5, [-0.2, 1.3, 0.0, 0.9, 0.1], [0.0] * 5]
    hs = [[0.5, -1.0, 2.0], [7.0, 7.0, 7.0], [0.0, 0.3, -0.4], [7.0, 7.0, 7.0]]
    emb = [[100.0] * 3] * 4  # the embedding output must not count
    h1 = [[1.0, 0.0, 1.0], [0.0] * 3, [0.2, 0.2, 0.2], [0.0] * 3]
    h2 = [[0.0, -2.0, 2.0], [0.0] * 3, [-0.6, 0.4, 0.0], [0.0] * 3]
    student, teacher = Fixed(zs, [hs, hs]), Fixed(zt, [emb, h1, h2])
    spec = Stage2Spec(tokens=1, distil=DistilSchedule(frobenius_weight=0.7))
    loss_fn = DeltaDistilLoss(spec, steps_per_epoch=4)
    loss, metrics = loss_fn(student, batch, step=6, teacher=teacher)  # epoch 1, step 2 of it

    a = 0.5 + (0.8 * 0.95 - 0.5) / (1 + math.log(3))
    t = 1.0 + (2.0 * 0.95 - 1.0) / (1 + math.log(3))

    def log_softmax(z: list[float], temp: float) -> list[float]:
        log_sum = math.log(sum(math.exp(v / temp) for v in z))
        return [v / temp - log_sum for v in z]

    ce = kl = sq = 0.0
    for pos, label in [(0, 2), (2, 1)]:
        ce -= log_softmax(zs[pos], 1.0)[label]
        lt, ls = log_softmax(zt[pos], t), log_softmax(zs[pos], t)
        kl += sum(math.exp(p) * (p - q) for p, q in zip(lt, ls))
        sq += sum(((x + y) / 2 - s) ** 2 for x, y, s in zip(h1[pos], h2[pos], hs[pos]))
    ce, kl, frob = ce / 2, kl / 2, math.sqrt(sq) / math.sqrt(2 * 3)
    expected = (1 - a) * ce + a * t**2 * kl + 0.7 * frob

    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics == pytest.approx({"ce": ce, "kl": kl, "frobenius": frob, "alpha": a, "temperature": t}, rel=1e-5)
    for model in (student, teacher):
        call = model.calls[0]
        assert torch.equal(call["position_ids"], batch["position_ids"]) and call["use_cache"] is False


def test_loss_trains_the_blocks_only() -> None:
    teacher, student = make_student()
    student.train()
    ids = torch.cat(tokens(10, 10, seed=6))
    batch = {"input_ids": ids, "position_ids": torch.arange(10).expand(2, 10), "labels": ids.clone()}
    batch["labels"][:, 0] = -100
    loss, metrics = LOSSES.get("delta_distil")(Stage2Spec(tokens=1), steps_per_epoch=5)(
        student, batch, step=0, teacher=teacher
    )
    loss.backward()
    assert metrics["alpha"] == 0.8 and metrics["temperature"] == 2.0 and math.isfinite(loss.item())
    assert student.model.embed_tokens.weight.grad is None and student.lm_head.weight.grad is None
    assert all(p.grad is not None for p in student.model.blocks.parameters())
    assert all(p.grad is None for p in teacher.parameters())


# ---------------------------------------------------------------------------------------- recipe
def test_recipe_loads_and_refuses_stage1() -> None:
    recipe = load_linearize_recipe(REPO / "recipes" / "distil-xlstm.yaml")
    assert recipe.student.kind == "distil_xlstm" and recipe.stage1 is None and recipe.stage2.distil is not None
    with pytest.raises(UserError, match="stage1: hidden-state alignment does not apply"):
        load_linearize_recipe(REPO / "recipes" / "distil-xlstm.yaml", ["stage1.tokens=1000"])
