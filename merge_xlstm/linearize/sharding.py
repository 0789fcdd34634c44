"""Full tensors from FSDP's shards and back, so checkpoints and saved models never depend on the sharding.

Under `accelerate launch` with FSDP2 (configs/accelerate/fsdp.yaml) every trained parameter and its
optimizer state is a DTensor holding this rank's shard; under DDP or one process they are plain tensors
and every function here is the identity. Checkpoints hold full tensors (gathered on every rank, written
by the main process) and are loaded on every rank by taking each rank's own shard of them, so a run may
resume under another number of processes; a trained student is gathered into a plain model before it is
validated and saved.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor


def full(tensor: Tensor) -> Tensor:
    """The whole tensor (an all-gather of a DTensor, which every rank must call; the tensor itself otherwise)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like(whole: Tensor, reference: Tensor) -> Tensor:
    """`whole` on `reference`'s device and dtype, as this rank's shard when `reference` is a DTensor (no communication)."""
    whole = whole.detach().to(reference.device, reference.dtype)
    if isinstance(reference, DTensor):
        return distribute_tensor(whole, reference.device_mesh, reference.placements, src_data_rank=None)
    return whole


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


@torch.no_grad()
def gathered(model: nn.Module) -> nn.Module:
    """`model` itself, or, when FSDP sharded it, a plain copy with the full weights (collective: all ranks call it).

    The copy is built from the model's config, so it is the model class transformers registered, without
    FSDP's hooks, and can run and be saved by one process alone.
    """
    if not is_sharded(model):
        return model
    from transformers import AutoModelForCausalLM

    state = {name: full(value).detach() for name, value in model.state_dict().items()}
    device = next(iter(state.values())).device
    plain = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    plain.load_state_dict(state)
    return plain.to(device)


def plain_model(accelerator: Accelerator, prepared: nn.Module) -> nn.Module:
    """The trained model as a plain module (collective under FSDP): without DDP's wrapper, FSDP's shards
    or the autocast accelerate patches into `forward` under mixed precision. A validation then computes
    in the precision it asks for, the same whichever way the run was launched (kept, that patch made
    one process and DDP validate in bf16 and FSDP, whose gathered copy has no patch, in float32)."""
    return gathered(accelerator.unwrap_model(prepared, keep_fp32_wrapper=False))


def reshard(model: nn.Module) -> None:
    """Drop the full parameters FSDP2 keeps after a forward with no backward (its root module keeps them
    for the backward it expects); nothing without FSDP."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def clip_grad_norm_(accelerator: Accelerator, params: list[Tensor], max_norm: float) -> Tensor:
    """The global gradient norm, clipped to `max_norm`: accelerate's clip, or torch's own under FSDP2.

    accelerate 1.15 looks for the model owning `params` with `params == list(model.parameters())`, which
    compares DTensors element-wise and fails once a second model of the same size was prepared (stage II
    after stage I); torch's clip computes the norm of DTensor gradients across ranks itself.
    """
    if not any(isinstance(p, DTensor) for p in params):
        return accelerator.clip_grad_norm_(params, max_norm)
    accelerator.unscale_gradients()
    return full(torch.nn.utils.clip_grad_norm_(params, max_norm))
