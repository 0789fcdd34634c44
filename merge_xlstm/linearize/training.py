"""What every training stage shares: the accelerator, batches, LR schedules, checkpoints, metrics.

Checkpoints are safetensors (tensors) plus JSON (everything else): optimizer state included, so no
pickle is ever written or read. A checkpoint directory is replaced atomically, so a kill at any moment
leaves either the previous or the new checkpoint, and rerunning the command resumes from it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from merge_xlstm.errors import UserError
from merge_xlstm.io import atomic_dir, atomic_file, to_json
from merge_xlstm.linearize.sharding import clip_grad_norm_, full, like, reshard
from merge_xlstm.recipe import OptimSpec

CHECKPOINT = "checkpoint"


def make_accelerator(device: str | None, precision: str) -> Accelerator:
    """Single process by default; several under `accelerate launch` (DDP/FSDP) with the same code.

    `precision`: auto = bf16 autocast on GPU (fp32 master weights), fp32 on CPU.
    """
    cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    bf16 = precision == "bf16" or (precision == "auto" and not cpu)
    return Accelerator(cpu=cpu, mixed_precision="bf16" if bf16 else "no")


def training_precision(accelerator: Accelerator) -> torch.autocast:
    """The autocast the run trains under (bf16 or none), for measuring a trained model as it was trained."""
    return torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=accelerator.mixed_precision == "bf16")


def num_steps(spec: OptimSpec, seq_len: int) -> int:
    """Optimizer steps that cover `spec.tokens` (rounded up to whole global batches)."""
    return max(1, math.ceil(spec.tokens / (spec.batch_size * seq_len)))


def warmup_cosine(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    """Linear warm-up to `peak`, then cosine decay to `floor` at `total` (stage I, paper A)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def warmup_constant(step: int, warmup: int, peak: float) -> float:
    """Linear warm-up, then constant (stage II, paper A)."""
    return peak * min(1.0, (step + 1) / warmup) if warmup else peak


def micro_batches(
    dataset: Any, step: int, spec: OptimSpec, accelerator: Accelerator, rows_per_epoch: int
) -> Iterator[dict[str, Tensor]]:
    """This process's micro-batches of global step `step`.

    Rows are addressed by step (row = step x batch_size + i, modulo the rows of one epoch), so a
    resumed run sees exactly the rows it would have seen, with no data-loader state to save.
    """
    start = step * spec.batch_size
    rows = [(start + i) % rows_per_epoch for i in range(spec.batch_size)]
    mine = rows[accelerator.process_index :: accelerator.num_processes]
    for i in range(0, len(mine), spec.micro_batch_size):
        items = [dataset[r] for r in mine[i : i + spec.micro_batch_size]]
        yield {k: torch.stack([torch.as_tensor(it[k]) for it in items]).to(accelerator.device) for k in items[0]}


@dataclass
class Checkpoint:
    """The latest resumable state of one stage, in `<work dir>/checkpoint/`.

    Tensors are saved whole, gathered from FSDP's shards on every rank and written by the `main`
    process alone; every rank loads them and keeps its own shard (merge_xlstm.linearize.sharding).
    `save` returns on every rank only once the checkpoint is on disk (`wait`, the processes' barrier):
    a rank that dies right after saving, and takes the launcher's other processes with it, cannot cut
    the main process's write short.
    """

    directory: Path
    main: bool = True
    wait: Callable[[], None] = lambda: None

    @property
    def path(self) -> Path:
        return self.directory / CHECKPOINT

    def load(self, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer) -> int:
        """Restore parameters and optimizer; return the step to continue from (0 when none)."""
        if not (self.path / "state.json").is_file():
            return 0
        meta = json.loads((self.path / "state.json").read_text())
        tensors = load_file(self.path / "params.safetensors")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(like(tensors[name], p))
        opt_tensors = load_file(self.path / "optimizer.safetensors")
        by_index = [p for group in optimizer.param_groups for p in group["params"]]
        state: dict[int, dict[str, Any]] = {}
        for key, tensor in opt_tensors.items():
            idx, field = key.split(".", 1)
            param = by_index[int(idx)]  # moments are shaped (and sharded) like their parameter; `step` is a scalar
            state.setdefault(int(idx), {})[field] = like(tensor, param) if tensor.shape == param.shape else tensor
        for idx, scalars in meta["optimizer_scalars"].items():
            state.setdefault(int(idx), {}).update(scalars)
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        return int(meta["step"])

    def save(self, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, step: int) -> None:
        opt = optimizer.state_dict()
        tensors, scalars = {}, {}
        for idx, fields in opt["state"].items():
            for field, value in fields.items():
                if isinstance(value, Tensor):
                    tensors[f"{idx}.{field}"] = full(value)  # every rank takes part in FSDP's gather
                else:
                    scalars.setdefault(str(idx), {})[field] = value
        whole = {n: full(p) for n, p in params.items()}
        if self.main:
            with atomic_dir(self.path, overwrite=True) as tmp:
                save_file({n: t.detach().cpu().contiguous() for n, t in whole.items()}, tmp / "params.safetensors")
                save_file({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, tmp / "optimizer.safetensors")
                meta = {"step": step, "param_groups": opt["param_groups"], "optimizer_scalars": scalars}
                (tmp / "state.json").write_text(json.dumps(meta))
        self.wait()


class MetricsLog:
    """`metrics.jsonl`: one row per logged step; rows past a resumed checkpoint are dropped."""

    def __init__(self, path: Path, *, stage: str, resume_step: int) -> None:
        self.path, self.stage = path, stage
        rows = self.read(path)
        keep = [r for r in rows if r["stage"] != stage or r["step"] <= resume_step]
        if len(keep) != len(rows):
            with atomic_file(path) as handle:
                handle.writelines(to_json(r) + "\n" for r in keep)

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def write(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(to_json({"stage": self.stage, **row}) + "\n")


StepFn = Callable[[dict[str, Tensor], int], tuple[Tensor, dict[str, float]]]


def train_loop(
    *,
    stage: str,
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    spec: OptimSpec,
    total_steps: int,
    lr_at: Callable[[int], float],
    dataset: Any,
    rows_per_epoch: int,
    seq_len: int,
    step_fn: StepFn,
    work_dir: Path,
) -> None:
    """Run optimizer steps from the last checkpoint to `total_steps`, logging and checkpointing.

    No checkpoint is written at the end: the caller's atomically written result (seed or expert
    directory) is the stage's completion mark, and the work directory is removed after it. A step
    whose loss or gradient norm is not finite stops the run (:func:`diverged`) before the optimizer
    applies it, so no checkpoint and no result ever holds what a diverged step made.

    `step_fn(micro_batch, step)` returns the micro-batch's loss (mean over its tokens) and its parts;
    micro-batch losses are averaged into one optimizer step of `spec.batch_size` rows. The trained
    parameters are the prepared model's own (`requires_grad`): FSDP replaces the parameter objects.
    """
    params = {name: p for name, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
    checkpoint = Checkpoint(work_dir / stage, main=accelerator.is_main_process, wait=accelerator.wait_for_everyone)
    start = checkpoint.load(params, optimizer)
    log = MetricsLog(work_dir / "metrics.jsonl", stage=stage, resume_step=start)
    if start >= total_steps:
        return
    if start:
        accelerator.print(f"{stage}: resuming at step {start}/{total_steps}")
    tokens_per_step = spec.batch_size * seq_len
    bar = tqdm(total=total_steps, initial=start, desc=stage, unit="step", disable=not accelerator.is_main_process)
    micro_per_step = math.ceil(math.ceil(spec.batch_size / accelerator.num_processes) / spec.micro_batch_size)
    model.train()
    saved = start
    for step in range(start, total_steps):
        began = time.perf_counter()
        lr = lr_at(step)
        for group in optimizer.param_groups:  # a group may step at a share of the schedule (stage1.gate_lr_scale)
            group["lr"] = lr * group.get("lr_scale", 1.0)
        sums: dict[str, float] = {}
        batches = list(micro_batches(dataset, step, spec, accelerator, rows_per_epoch))
        for i, batch in enumerate(batches):
            sync = i == len(batches) - 1
            with (nullcontext() if sync else accelerator.no_sync(model)), accelerator.autocast():
                loss, parts = step_fn(batch, step)
            accelerator.backward(loss / micro_per_step)
            for key, value in {"loss": loss.item(), **parts}.items():
                sums[key] = sums.get(key, 0.0) + value / len(batches)
        # One host sync per step: the global norm, the same on every process, so all of them stop together.
        grad_norm = float(clip_grad_norm_(accelerator, list(params.values()), spec.grad_clip))
        if not (math.isfinite(sums["loss"]) and math.isfinite(grad_norm)):
            bar.close()  # the error goes on a line of its own
            raise diverged(stage, step + 1, f"loss {sums['loss']:g}, gradient norm {grad_norm:g}", checkpoint, saved)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tok_s = tokens_per_step / (time.perf_counter() - began)
        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{sums['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
        if done % spec.log_every == 0 or done == total_steps or done == 1:  # a resumed run logs what an unbroken one does
            sums = _mean_over_processes(accelerator, sums)
            if accelerator.is_main_process:
                log.write({"step": done, "tokens": done * tokens_per_step, "lr": lr,
                           "grad_norm": grad_norm, "tokens_per_s": tok_s, **sums})
        if done % spec.save_every == 0 and done < total_steps:
            checkpoint.save(params, optimizer, done)
            saved = done
    bar.close()
    # The last update has no next step to show its loss: one more forward on its last micro-batch does.
    with torch.no_grad(), accelerator.autocast():
        final = float(accelerator.reduce(step_fn(batches[-1], total_steps - 1)[0].detach(), reduction="sum"))
    reshard(model)
    if not math.isfinite(final):
        raise diverged(stage, total_steps, f"loss {final:g} after its update", checkpoint, saved)


def _mean_over_processes(accelerator: Accelerator, values: dict[str, float]) -> dict[str, float]:
    """Each process saw its share of the global batch: the logged loss is the mean over all of them."""
    if accelerator.num_processes == 1:
        return values
    means = accelerator.reduce(torch.tensor(list(values.values()), device=accelerator.device), reduction="mean")
    return dict(zip(values, means.tolist()))


def diverged(stage: str, step: int, what: str, checkpoint: Checkpoint, saved: int) -> UserError:
    """The one-line error of a non-finite step: which stage and step, and what a rerun resumes from."""
    if saved:
        kept = f"the last good checkpoint (step {saved}) is kept in {checkpoint.path} and a rerun resumes from it"
    else:
        kept = "no checkpoint had been written yet, so a rerun starts the stage over"
    return UserError(
        f"{stage} diverged at step {step} ({what}); no model was written; {kept}: lower {stage}.lr (or raise "
        f"{stage}.warmup_steps) and run the recipe again"
    )
