"""Where each step of a run executes: in this process, in a worker on one GPU, or under `accelerate launch`.

A launcher maps a step's kind of work (``train``: seed and experts; ``device``: evaluations and the
weight search; ``host``: merges and the report) to a :class:`Placement`. A worker is this same command,
``merge-xlstm run PIPELINE --only STEP``, started with ``CUDA_VISIBLE_DEVICES`` set to its GPUs; it
re-reads the pipeline and runs that one step, so workers need no state from the parent.

- ``inprocess``: every step here, one after another (CPU, or one GPU).
- ``per_gpu``: one worker per GPU for each train or device step, as many at once as there are GPUs:
  the four experts train in parallel on four GPUs (paper A's experts are independent given the seed).
- ``accelerate``: train steps as one worker over all GPUs, started by the pipeline's ``launch_command``
  (``accelerate launch --config_file configs/accelerate/fsdp.yaml`` or ``ddp.yaml``; ``torchrun
  --nproc_per_node N`` works too), one after another; device steps per GPU.
- ``auto``: per_gpu when two or more GPUs are visible, else inprocess.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from merge_xlstm.registry import Registry

ALL_GPUS = -1


@dataclass(frozen=True)
class Placement:
    gpus: int  # 0: in this process; 1: a worker on one GPU; ALL_GPUS: one worker on every GPU
    prefix: tuple[str, ...] = (sys.executable, "-m")  # what runs `merge_xlstm run ... --only STEP`


IN_PROCESS = Placement(0)
ONE_GPU = Placement(1)
Launcher = Callable[[str, "list[str] | None"], Placement]  # (work, launch_command) -> placement
LAUNCHERS: Registry[Launcher] = Registry("launcher")


@LAUNCHERS.register("inprocess")
def _inprocess(work: str, command: list[str] | None) -> Placement:
    return IN_PROCESS


@LAUNCHERS.register("per_gpu")
def _per_gpu(work: str, command: list[str] | None) -> Placement:
    return {"train": ONE_GPU, "device": ONE_GPU, "host": IN_PROCESS}[work]


@LAUNCHERS.register("accelerate")
def _accelerate(work: str, command: list[str] | None) -> Placement:
    launch = Placement(ALL_GPUS, (*(command or ()), "-m"))
    return {"train": launch, "device": ONE_GPU, "host": IN_PROCESS}[work]


@LAUNCHERS.register("auto")
def _auto(work: str, command: list[str] | None) -> Placement:
    return LAUNCHERS.get("per_gpu" if len(visible_gpus()) >= 2 else "inprocess")(work, command)


def visible_gpus() -> list[str]:
    """The GPU ids workers may be pinned to (CUDA_VISIBLE_DEVICES entries, or 0..n-1)."""
    import torch

    count = torch.cuda.device_count()
    listed = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return listed[:count] if listed else [str(i) for i in range(count)]
