"""The trained model handed back after training computes as itself, and is validated in the run's precision.

accelerate patches an autocast into `forward` of a model it prepares under mixed precision, and
`unwrap_model` keeps that patch by default; FSDP's gathered copy never has it. Kept, one process and DDP
validated experts in bf16 and FSDP in float32 (on 2 x H200: student CE 1.804 / 1.805 against 1.740 for
the same training curve). These tests pin the plain model and the explicit precision.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from merge_xlstm.linearize.sharding import plain_model
from merge_xlstm.linearize.training import training_precision
from merge_xlstm.testing import tiny_teacher


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state; a bf16 accelerator needs it fresh, and leaves it fresh."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_the_model_handed_back_has_no_autocast_of_the_training_run_and_validation_chooses_it():
    model = tiny_teacher("llama").float()
    reference = copy.deepcopy(model)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    prepared = accelerator.prepare(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        patched = prepared(input_ids=ids).logits  # what training sees: bf16 autocast
        plain = plain_model(accelerator, prepared)(input_ids=ids).logits
        assert torch.equal(plain, reference(input_ids=ids).logits)  # float32, as saved
        assert not torch.equal(plain, patched)
        with training_precision(accelerator):
            measured = plain_model(accelerator, prepared)(input_ids=ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(measured, reference(input_ids=ids).logits)
    assert not torch.is_autocast_enabled("cpu")
    float32_run = SimpleNamespace(device=torch.device("cpu"), mixed_precision="no")
    with training_precision(float32_run):  # a float32 run measures in float32
        assert not torch.is_autocast_enabled("cpu")
