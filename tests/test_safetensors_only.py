"""Safetensors only, everywhere (issue 14, item 7): a directory holding only pickled weights
(pytorch_model.bin) is refused by every command before anything could unpickle it, and the loads that
remain ask transformers for safetensors and never for the directory's own code.
"""

from __future__ import annotations

from pathlib import Path

import lm_eval.models.huggingface
import pytest
import torch
from test_linearize_safety import linearize, make_workspace, refusal, write_recipe
from test_merge import make_expert, make_seed, recipe_for, run_merge
from test_preflight import fake_seed

import merge_xlstm.linearize.pipeline as pipeline
from merge_xlstm.cli import main as cli
from merge_xlstm.eval.sandbox import available_backends
from merge_xlstm.testing import tiny_teacher

CODE_FLAGS = [] if available_backends() else ["--allow-unsafe-code"]


def pickle_weights(model_dir: Path) -> None:
    """Replace the directory's safetensors with the same weights as a pickle, the way old checkpoints ship."""
    torch.save(tiny_teacher("llama").state_dict(), model_dir / "pytorch_model.bin")
    (model_dir / "model.safetensors").unlink()


@pytest.mark.parametrize("role", ["teacher", "seed", "eval-model", "merge-expert"])
def test_pickled_weights_are_refused_and_never_unpickled(tmp_path, capsys, monkeypatch, role):
    root = make_workspace(tmp_path)
    recipe = write_recipe(root, "code")
    if role == "merge-expert":
        seed = make_seed(tmp_path / "seed")
        experts = [make_expert(seed, tmp_path / f"e{i}", i) for i in range(2)]
        model = experts[1]
        run = lambda: run_merge(tmp_path, recipe_for(tmp_path, "linear", experts, [1, 1]))  # noqa: E731
    elif role == "seed":
        model, run = fake_seed(root, recipe), lambda: linearize(recipe)
    elif role == "teacher":
        model, run = root / "teacher", lambda: linearize(recipe)
    else:
        model = root / "teacher"
        run = lambda: cli(["eval", str(model), "--suite", "ci", "--output", str(tmp_path / "r"), *CODE_FLAGS])  # noqa: E731
    pickle_weights(model)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was loaded"))
    monkeypatch.setattr(pipeline, "load_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    line = refusal(capsys, run())
    assert line == (f"{model}: no model.safetensors (nor model.safetensors.index.json) (pytorch_model.bin holds "
                    "pickled weights, which are never loaded: save as safetensors)")  # fmt: skip
    assert not (tmp_path / "merged").exists() and not (tmp_path / "r").exists()
    assert not (root / "experts" / "code").exists() and not (root / "experts" / "code.partial").exists()


class _Loaded(Exception):
    """Raised by the stand-in loaders once they have recorded how they were called."""


def test_evaluated_models_and_the_seed_load_as_safetensors_without_custom_code(tmp_path, monkeypatch):
    root = make_workspace(tmp_path)
    calls: list[tuple[str, dict]] = []

    def record_hflm(**kwargs):
        calls.append((kwargs["pretrained"], kwargs))
        raise _Loaded

    monkeypatch.setattr(lm_eval.models.huggingface, "HFLM", record_hflm)
    with pytest.raises(_Loaded):
        cli(["eval", str(root / "teacher"), "--suite", "stem", "--limit", "1", "--output", str(tmp_path / "r")])

    real = pipeline.AutoModelForCausalLM.from_pretrained
    seed = root / "experts" / "seed"

    def record_seed_load(path, **kwargs):
        if Path(path) != seed:  # the teacher's own load (teacher.load_teacher) goes through
            return real(path, **kwargs)
        calls.append((str(path), kwargs))
        raise _Loaded

    monkeypatch.setattr(pipeline.AutoModelForCausalLM, "from_pretrained", record_seed_load)
    with pytest.raises(_Loaded):  # the seed is loaded after stage I and the targets
        linearize(write_recipe(root, "code"))
    assert [(path, c["use_safetensors"], c["trust_remote_code"]) for path, c in calls] == [
        (str(root / "teacher"), True, False), (str(seed), True, False)
    ]  # fmt: skip
