"""Teacher top-k targets: the compact stored form (its size on disk) and the online mode give the same loss."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from safetensors import safe_open

from merge_xlstm.linearize.data import pack_documents
from merge_xlstm.linearize.losses import SparseKDLoss
from merge_xlstm.linearize.targets import (
    TARGET_MODES,
    WithTargets,
    compute_targets,
    index_dtype,
    shard_path,
    stored_bytes_per_token,
)
from merge_xlstm.recipe import Stage2Spec
from merge_xlstm.student import from_teacher
from merge_xlstm.testing import tiny_teacher

SEQ_LEN, ROWS, TOP_K = 32, 6, 16


@pytest.fixture(scope="module")
def rows() -> list[dict[str, torch.Tensor]]:
    """Packed rows of a few random documents (several per row, so positions restart inside rows)."""
    generator = torch.Generator().manual_seed(0)
    docs = [torch.randint(7, 100, (int(n),), generator=generator).numpy()
            for n in torch.randint(5, 40, (20,), generator=generator)]
    packed = pack_documents(docs, SEQ_LEN, pad_id=0)
    return [{k: torch.as_tensor(v[i]).long() for k, v in packed.items()} for i in range(ROWS)]


def _batch(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_stored_and_online_targets_give_the_same_loss(rows, tmp_path, dtype):
    teacher = tiny_teacher("llama")
    # A student far from the teacher, so the KL is large and its relative rounding error meaningful.
    student = from_teacher(tiny_teacher("llama", seed=1), kind="hybrid", mixer="hybrid", window_size=8,
                           num_sink_tokens=2).eval()
    spec = Stage2Spec(tokens=1, top_k=TOP_K, targets_dtype=dtype)
    accelerator = Accelerator(cpu=True)
    stored_rows, live = TARGET_MODES.get("stored")(teacher, rows, count=ROWS, spec=spec, directory=tmp_path,
                                                   accelerator=accelerator)
    online_rows, online_teacher = TARGET_MODES.get("online")(teacher, rows, count=ROWS, spec=spec,
                                                             directory=tmp_path, accelerator=accelerator)
    assert live is None and online_teacher is teacher and online_rows is rows

    loss = SparseKDLoss(spec, steps_per_epoch=1)
    stored_batch = _batch([stored_rows[i] for i in range(ROWS)])
    assert stored_batch["topk_logprobs"].dtype == getattr(torch, dtype)
    with torch.no_grad():
        stored_loss, stored_parts = loss(student, stored_batch, step=0)
        online_loss, online_parts = loss(student, _batch(rows), step=0, teacher=teacher)
    assert stored_parts["ce"] == online_parts["ce"]  # CE never reads the targets
    # The KL differs only by the rounding of the stored log-probabilities (2^-11 relative for fp16, 2^-8 bf16).
    rounding = {"float16": 2e-3, "bfloat16": 1e-2}[dtype]
    assert stored_parts["kl"] == pytest.approx(online_parts["kl"], rel=rounding)
    assert stored_loss.item() == pytest.approx(online_loss.item(), rel=rounding / 10)
    assert stored_parts["kl"] != online_parts["kl"]  # the two paths really are different computations


def test_stored_targets_take_the_bytes_per_token_claimed(rows, tmp_path):
    teacher = tiny_teacher("llama")  # vocabulary 128: indices fit in 16 bits
    compute_targets(teacher, rows, rows=ROWS, top_k=TOP_K, directory=tmp_path, split="train",
                    accelerator=Accelerator(cpu=True))
    shard = shard_path(tmp_path, "train", 0)
    with safe_open(shard, framework="pt") as handle:
        assert handle.get_slice("topk_indices").get_dtype() == "U16"
        assert handle.get_slice("topk_logprobs").get_dtype() == "F16"
        assert handle.get_slice("teacher_nll").get_dtype() == "F32"
    claimed = stored_bytes_per_token(TOP_K, teacher.config.vocab_size)
    assert claimed == TOP_K * 4 + 4
    header = 1024  # safetensors' JSON header: names, dtypes, shapes, offsets
    assert claimed * ROWS * SEQ_LEN <= shard.stat().st_size <= claimed * ROWS * SEQ_LEN + header
    assert stored_bytes_per_token(256, 49152) == 1028  # SmolLM2: 1,028 bytes per token at k = 256
    assert index_dtype(65536) == torch.uint16 and index_dtype(65537) == torch.int32
    assert stored_bytes_per_token(256, 151_936) == 256 * 6 + 4  # Qwen2's vocabulary needs int32 indices

    # Read back, the indices are the teacher's own top-k, exactly.
    item = WithTargets(rows, tmp_path, "train")[3]
    with torch.no_grad():
        logits = teacher(input_ids=rows[3]["input_ids"][None], position_ids=rows[3]["position_ids"][None],
                         use_cache=False).logits
    assert torch.equal(item["topk_indices"], logits.float().log_softmax(-1).topk(TOP_K).indices[0])
