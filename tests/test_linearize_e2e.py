"""`linearize` end to end on a tiny teacher: experts from one seed, no-op rerun, kill and resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import merge_xlstm.linearize.training as training
from merge_xlstm.linearize.pipeline import linearize
from merge_xlstm.provenance import read_metadata, weights_digest
from merge_xlstm.recipe import load_linearize_recipe
from merge_xlstm.testing import tiny_teacher, tiny_tokenizer

TEXT = "def add(a, b):\n    return a + b\n"


def write_teacher_and_corpora(root: Path, **config: Any) -> Path:
    """A tiny llama teacher directory (`root/teacher`, `config` overriding tiny_config's fields) and two
    small local corpora (`root/{code,math}.jsonl`)."""
    teacher = tiny_teacher("llama", **config)
    teacher.save_pretrained(root / "teacher")
    tiny_tokenizer().save_pretrained(root / "teacher")
    for name, words in (("code", ["def", "return", "class", "import"]), ("math", ["12", "+", "7", "=", "19"])):
        with (root / f"{name}.jsonl").open("w") as handle:
            for i in range(300):
                handle.write(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(20 + i % 9))}) + "\n")
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_teacher_and_corpora(tmp_path_factory.mktemp("linearize"))


def write_recipe(root: Path, name: str, *, stage2_tokens: int = 64 * 4 * 6) -> Path:
    recipe = {
        "name": name,
        "teacher": str(root / "teacher"),
        "student": {"kind": "hybrid", "mixer": "hybrid", "window_size": 16, "num_sink_tokens": 2},
        "data": {"sources": [{"path": str(root / f"{name}.jsonl")}], "seq_len": 64, "validation_fraction": 0.1},
        "stage1": {"tokens": 64 * 4 * 4, "batch_size": 4, "micro_batch_size": 2, "warmup_steps": 1, "log_every": 1},
        "stage2": {"tokens": stage2_tokens, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-3, "warmup_steps": 1,
                   "top_k": 8, "log_every": 1, "save_every": 2},
        "seed": str(root / "experts" / "seed"),
        "output": str(root / "experts" / name),
        "longctx": {"ce": {"documents": 2}, "passkey_lengths": [256], "passkey_trials": 2},  # a CPU budget
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_two_experts_from_one_seed_and_a_noop_rerun(
    workspace: Path, capsys: pytest.CaptureFixture[str], deprecations
):
    code = linearize(load_linearize_recipe(write_recipe(workspace, "code")), device="cpu")
    assert deprecations() == []
    seed = workspace / "experts" / "seed"
    seed_meta = read_metadata(seed)
    assert seed_meta["kind"] == "seed" and seed_meta["seed_id"] == weights_digest(seed)
    seed_mtime = (seed / "model.safetensors").stat().st_mtime_ns

    math_dir = linearize(load_linearize_recipe(write_recipe(workspace, "math")), device="cpu")
    assert (seed / "model.safetensors").stat().st_mtime_ns == seed_mtime  # stage I ran once
    assert "reusing the shared seed" in capsys.readouterr().out
    for expert in (code, math_dir):
        meta = read_metadata(expert)
        assert meta["kind"] == "expert" and meta["seed_id"] == seed_meta["seed_id"]
        assert {"student_ce", "teacher_ce", "top8_kl"} <= set(meta["validation"])
        assert {"expert", "teacher", "swa_only"} <= set(meta["long_context"]["ce_by_position"])
        rows = [json.loads(line) for line in (expert / "metrics.jsonl").read_text().splitlines()]
        assert {r["stage"] for r in rows} == {"stage1", "stage2"}
        assert {"step", "tokens", "loss", "ce", "kl", "lr"} <= set(rows[-1])
        assert (expert / "loss.png").stat().st_size > 0 and "seed_id" in (expert / "README.md").read_text()
        assert not expert.with_name(expert.name + ".partial").exists()
    # both experts share the seed's shapes and tokenizer, and learned different things
    a, b = load_file(code / "model.safetensors"), load_file(math_dir / "model.safetensors")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)

    model = AutoModelForCausalLM.from_pretrained(code)
    tokens = tiny_tokenizer()(TEXT, return_tensors="pt")
    out = model.generate(**tokens, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == tokens["input_ids"].shape[1] + 5

    mtime = (code / "model.safetensors").stat().st_mtime_ns
    linearize(load_linearize_recipe(write_recipe(workspace, "code")), device="cpu")
    assert "nothing to do" in capsys.readouterr().out
    assert (code / "model.safetensors").stat().st_mtime_ns == mtime


def test_killed_run_resumes_to_the_same_expert(workspace: Path, monkeypatch: pytest.MonkeyPatch):
    """A run killed after its first checkpoint resumes from it and ends where an unbroken run ends."""
    recipe_path = write_recipe(workspace, "code", stage2_tokens=64 * 4 * 6)
    unbroken = load_linearize_recipe(recipe_path)
    unbroken.output = str(workspace / "experts" / "unbroken")
    linearize(unbroken, device="cpu")

    broken = load_linearize_recipe(recipe_path)
    broken.output = str(workspace / "experts" / "broken")
    real_save = training.Checkpoint.save

    def save_then_die(self, params, optimizer, step):
        real_save(self, params, optimizer, step)
        if step == 4:
            raise KeyboardInterrupt  # what a kill looks like right after a checkpoint

    monkeypatch.setattr(training.Checkpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        linearize(broken, device="cpu")
    partial = workspace / "experts" / "broken.partial"
    assert not Path(broken.output).exists() and (partial / "stage2" / "checkpoint" / "state.json").is_file()
    monkeypatch.setattr(training.Checkpoint, "save", real_save)
    linearize(load_linearize_recipe(recipe_path).model_copy(update={"output": broken.output}), device="cpu")
    steps = [json.loads(r)["step"] for r in (Path(broken.output) / "metrics.jsonl").read_text().splitlines()
             if json.loads(r)["stage"] == "stage2"]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # resumed rows replace, never duplicate
    a = load_file(Path(unbroken.output) / "model.safetensors")
    b = load_file(Path(broken.output) / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
