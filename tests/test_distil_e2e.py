"""Distil-xLSTM through the same commands: linearize two experts -> merge them -> compare with the teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from merge_xlstm.cli import main as cli
from merge_xlstm.linearize.pipeline import linearize
from merge_xlstm.provenance import read_metadata
from merge_xlstm.recipe import load_linearize_recipe
from merge_xlstm.testing import tiny_teacher, tiny_tokenizer

CORPORA = {
    "code": ["def", "return", "class", "import", "lambda", "yield"],
    "math": ["12", "+", "7", "=", "19", "*", "3"],
}


@torch.no_grad()
def next_token_accuracy(model_dir: Path, text: str) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tiny_tokenizer()(text, return_tensors="pt")["input_ids"]
    predicted = model(ids).logits[0, :-1].argmax(-1)
    return (predicted == ids[0, 1:]).float().mean().item()


def test_distil_xlstm_linearize_merge_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    teacher = tiny_teacher("llama")
    teacher.save_pretrained(tmp_path / "teacher")
    tiny_tokenizer().save_pretrained(tmp_path / "teacher")
    experts = []
    for name, words in CORPORA.items():
        with (tmp_path / f"{name}.jsonl").open("w") as handle:
            for i in range(200):
                handle.write(json.dumps({"text": " ".join(words[(i * j) % len(words)] for j in range(25))}) + "\n")
        recipe = {
            "name": name,
            "teacher": str(tmp_path / "teacher"),
            "student": {"kind": "distil_xlstm", "num_blocks": 2, "slstm_at": [0], "num_heads": 2},
            "data": {"sources": [{"path": str(tmp_path / f"{name}.jsonl")}], "seq_len": 64},
            "stage2": {"tokens": 64 * 4 * 4, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-3, "warmup_steps": 1,
                       "log_every": 1, "distil": {"epochs": 2}},
            "seed": str(tmp_path / "experts" / "seed"),
            "output": str(tmp_path / "experts" / name),
            # the sLSTM runs token by token on CPU: a small long-context report
            "longctx": {"ce": {"documents": 1, "max_tokens": 256}, "passkey_lengths": [256], "passkey_trials": 1},
        }
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
        experts.append(linearize(load_linearize_recipe(tmp_path / f"{name}.yaml"), device="cpu"))
    seed_id = read_metadata(tmp_path / "experts" / "seed")["seed_id"]
    assert all(read_metadata(e)["seed_id"] == seed_id for e in experts)
    rows = [json.loads(r) for r in (experts[0] / "metrics.jsonl").read_text().splitlines()]
    assert {"alpha", "temperature", "frobenius"} <= set(rows[-1])  # the Delta schedule was logged
    assert set(read_metadata(experts[0])["long_context"]["ce_by_position"]) >= {"expert", "teacher"}

    merge_recipe = {
        "method": "linear",
        "base": str(tmp_path / "experts" / "seed"),
        "experts": [{"path": str(e), "weight": 0.5} for e in experts],
        "output": str(tmp_path / "experts" / "merged"),
    }
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(merge_recipe))
    assert cli(["merge", str(tmp_path / "merge.yaml")]) == 0
    merged = tmp_path / "experts" / "merged"
    assert type(AutoModelForCausalLM.from_pretrained(merged)).__name__ == "DistilXLSTMForCausalLM"

    held_out = {name: " ".join(words[(7 * j) % len(words)] for j in range(40)) for name, words in CORPORA.items()}
    for label, model_dir in (("teacher", tmp_path / "teacher"), ("merged", merged)):
        scores = {task: next_token_accuracy(model_dir, text) for task, text in held_out.items()}
        (tmp_path / f"{label}.yaml").write_text(yaml.safe_dump(scores))
    capsys.readouterr()
    assert cli(["compare", str(tmp_path / "teacher.yaml"), str(tmp_path / "merged.yaml"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["candidates"][0]
    assert set(report["tasks"]) == set(CORPORA)
    assert 0 <= report["alpha_star"] <= 1 and set(report["c_alpha"]) >= {"0", "0.4"}
