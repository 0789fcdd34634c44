"""The teacher's top-k next-token distributions, computed once and stored (REFERENCE.md §2).

Stage II then needs no live teacher. Targets live in a directory of safetensors shards, one per
`SHARD_ROWS` packed rows: `topk_logprobs` (rows, T, k) float16, `topk_indices` (rows, T, k) int32 and
`teacher_nll` (rows, T) float32 (the teacher's own loss on the next token, for reporting). Each shard
is written atomically and existing shards are skipped, so a killed computation resumes; the
directory is keyed by teacher, data and k, so every run on the same data reuses it.
"""

from __future__ import annotations

import json
import time
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

SHARD_ROWS = 64
DONE = "done.json"


def shard_path(directory: Path, split: str, index: int) -> Path:
    return directory / f"{split}-{index:05d}.safetensors"


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
                logits = teacher(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
            logprobs = F.log_softmax(logits.float(), dim=-1)
            top = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)  # a vocabulary may be smaller than k
            values.append(top.values.half().cpu())
            indices.append(top.indices.int().cpu())
            next_lp = logprobs[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)
            nll.append(F.pad(-next_lp, (0, 1)).cpu())
            bar.update(input_ids.numel())
            bar.set_postfix(tok_s=f"{input_ids.numel() / (time.perf_counter() - began):,.0f}")
        tensors = {"topk_logprobs": torch.cat(values), "topk_indices": torch.cat(indices), "teacher_nll": torch.cat(nll)}
        with atomic_path(shard_path(directory, split, shard)) as tmp:
            save_file(tensors, tmp)
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(done_file, {"rows": rows, "top_k": top_k, "shard_rows": SHARD_ROWS})


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
        return item


def bytes_per_row(seq_len: int, top_k: int) -> int:
    """Disk bytes of one packed row's stored targets: fp16 log-probs and int32 indices per kept token, fp32 NLL."""
    return seq_len * (top_k * (2 + 4) + 4)
