"""The teacher's top-k next-token distributions: stored once on disk, or computed online (REFERENCE.md §2).

Two modes, chosen by ``stage2.targets`` (entries of :data:`TARGET_MODES`):

- ``stored`` (the paper's way): computed once, so stage II needs no live teacher. Targets live in a
  directory of safetensors shards, one per `SHARD_ROWS` packed rows: ``topk_logprobs`` (rows, T, k) in
  ``stage2.targets_dtype`` (float16 or bfloat16), ``topk_indices`` (rows, T, k) as uint16 when the
  vocabulary has at most 65,536 entries (int32 otherwise) and ``teacher_nll`` (rows, T) float32 (the
  teacher's own loss on the next token, for reporting): k·(2 + 2) + 4 bytes per token, 1,028 at
  k = 256 (:func:`stored_bytes_per_token`), i.e. 103 GB for 100M tokens instead of the 154 GB of int32
  indices. Each shard is written atomically and existing shards are skipped, so a killed computation
  resumes; the directory is keyed by teacher, data, k and dtype, so every run on the same data reuses it.
- ``online``: the teacher stays loaded in stage II and :func:`teacher_topk` runs on each micro-batch
  (in float32, nothing rounded): no disk at all, for budgets whose targets would not fit. It costs one
  teacher forward per training token, the same as storing them once when every row is trained on once.

Validation targets are always stored: they are few, and the report and the merge-weight search read them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from merge_xlstm.io import atomic_path, write_json
from merge_xlstm.recipe import Stage2Spec
from merge_xlstm.registry import Registry

SHARD_ROWS = 64
DONE = "done.json"
UINT16_VOCAB = 1 << 16  # indices of a vocabulary up to this size fit in 16 bits
LOGPROB_BYTES = 2  # float16 or bfloat16
NLL_BYTES = 4  # float32


def stored_bytes_per_token(top_k: int, vocab_size: int) -> int:
    """Disk bytes per token of stored targets (safetensors headers aside)."""
    return top_k * (LOGPROB_BYTES + (2 if vocab_size <= UINT16_VOCAB else 4)) + NLL_BYTES


def index_dtype(vocab_size: int) -> torch.dtype:
    return torch.uint16 if vocab_size <= UINT16_VOCAB else torch.int32


def shard_path(directory: Path, split: str, index: int) -> Path:
    return directory / f"{split}-{index:05d}.safetensors"


@torch.no_grad()
def teacher_topk(teacher: nn.Module, input_ids: Tensor, position_ids: Tensor, top_k: int) -> dict[str, Tensor]:
    """The teacher's top-k log-probabilities (float32), their indices (int64) and its next-token NLL.

    Runs under the caller's autocast, as stage II's forward does; a vocabulary may be smaller than k.
    """
    logits = teacher(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    logprobs = F.log_softmax(logits.float(), dim=-1)
    top = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)
    next_lp = logprobs[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return {"topk_logprobs": top.values, "topk_indices": top.indices, "teacher_nll": F.pad(-next_lp, (0, 1))}


@torch.no_grad()
def compute_targets(
    teacher: nn.Module,
    dataset: Any,
    *,
    rows: int,
    top_k: int,
    directory: Path,
    split: str,
    accelerator: Accelerator,
    dtype: str = "float16",
    micro_batch_size: int = 1,
) -> None:
    """Store the teacher's top-k log-probabilities for rows [0, rows) of `dataset` (resumable)."""
    done_file = directory / f"{split}-{DONE}"
    if done_file.is_file():
        return
    directory.mkdir(parents=True, exist_ok=True)
    shards = range((rows + SHARD_ROWS - 1) // SHARD_ROWS)
    mine = [s for s in shards if s % accelerator.num_processes == accelerator.process_index]
    todo = [s for s in mine if not shard_path(directory, split, s).is_file()]
    seq_len = len(dataset[0]["input_ids"])

    def shard_tokens(shards: list[int]) -> int:
        return sum(min(rows, (s + 1) * SHARD_ROWS) - s * SHARD_ROWS for s in shards) * seq_len

    bar = tqdm(total=shard_tokens(mine), initial=shard_tokens([s for s in mine if s not in todo]),
               desc=f"teacher top-{top_k} ({split})", unit="tok", unit_scale=True,
               disable=not accelerator.is_main_process)
    for shard in todo:
        lo, hi = shard * SHARD_ROWS, min(rows, (shard + 1) * SHARD_ROWS)
        values, indices, nll = [], [], []
        for start in range(lo, hi, micro_batch_size):
            items = [dataset[r] for r in range(start, min(hi, start + micro_batch_size))]
            input_ids = torch.stack([torch.as_tensor(it["input_ids"]) for it in items]).to(accelerator.device)
            position_ids = torch.stack([torch.as_tensor(it["position_ids"]) for it in items]).to(accelerator.device)
            began = time.perf_counter()
            with accelerator.autocast():
                top = teacher_topk(teacher, input_ids, position_ids, top_k)
            values.append(top["topk_logprobs"].to(getattr(torch, dtype)).cpu())
            indices.append(top["topk_indices"].cpu().to(index_dtype(teacher.config.vocab_size)))  # uint16: CPU op
            nll.append(top["teacher_nll"].cpu())
            bar.update(input_ids.numel())
            bar.set_postfix(tok_s=f"{input_ids.numel() / (time.perf_counter() - began):,.0f}")
        tensors = {"topk_logprobs": torch.cat(values), "topk_indices": torch.cat(indices), "teacher_nll": torch.cat(nll)}
        with atomic_path(shard_path(directory, split, shard)) as tmp:
            save_file(tensors, tmp)
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(done_file, {"rows": rows, "top_k": top_k, "shard_rows": SHARD_ROWS, "dtype": dtype})


class WithTargets:
    """A packed dataset whose rows also carry the stored teacher targets (memory-mapped, per row)."""

    def __init__(self, dataset: Any, directory: Path, split: str) -> None:
        meta = json.loads((directory / f"{split}-{DONE}").read_text())
        self.dataset, self.directory, self.split, self.rows = dataset, directory, split, meta["rows"]

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, row: int) -> dict[str, Tensor]:
        shard, offset = divmod(row, SHARD_ROWS)
        item = {k: torch.as_tensor(v) for k, v in self.dataset[row].items()}
        with safe_open(shard_path(self.directory, self.split, shard), framework="pt") as handle:
            for key in ("topk_logprobs", "topk_indices", "teacher_nll"):
                item[key] = handle.get_slice(key)[offset : offset + 1][0]
        item["topk_indices"] = item["topk_indices"].long()  # stored compactly; gather wants int64
        return item


def bytes_per_row(seq_len: int, top_k: int, vocab_size: int) -> int:
    """Disk bytes of one packed row's stored targets: 2-byte log-probs, uint16 (or int32) indices, fp32 NLL."""
    index_bytes = torch.empty((), dtype=index_dtype(vocab_size)).element_size()
    return seq_len * (top_k * (2 + index_bytes) + 4)


# ------------------------------------------------------------------------------------------ modes
TargetMode = Callable[..., tuple[Any, nn.Module | None]]
TARGET_MODES: Registry[TargetMode] = Registry("stage-2 target mode")


@TARGET_MODES.register("stored")
def stored_targets(
    teacher: nn.Module, rows: Any, *, count: int, spec: Stage2Spec, directory: Path, accelerator: Accelerator
) -> tuple[Any, nn.Module | None]:
    """Compute the training rows' targets once (resumable), then train from disk with no teacher."""
    compute_targets(teacher, rows, rows=count, top_k=spec.top_k, directory=directory, split="train",
                    accelerator=accelerator, dtype=spec.targets_dtype)
    return WithTargets(rows, directory, "train"), None


@TARGET_MODES.register("online")
def online_targets(teacher: nn.Module, rows: Any, **_: Any) -> tuple[Any, nn.Module | None]:
    """Keep the teacher: the stage-II loss asks it for each batch's top-k (see SparseKDLoss)."""
    return rows, teacher
