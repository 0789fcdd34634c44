"""The merge-weight search finds weights that are known to be best.

The constructed case: a student that computes exactly the teacher (SWA mixer, window longer than the
rows) is theta*; experts are theta* + delta_i with sum_i c_i delta_i = 0, so the merge with weights c
(and, for task arithmetic, scaling lambda*) is theta* again, the only merge whose top-k KL to the
teacher is zero. The run's own search step (validation rows of the domain recipes, the teacher's
targets, merges in memory) must find c and lambda*.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import save_file

from merge_xlstm.cli import main as cli
from merge_xlstm.linearize.pipeline import recipe_key, seed_key, teacher_content
from merge_xlstm.merge.search import COMBINE, coordinate_search, search
from merge_xlstm.provenance import weights_digest, write_metadata
from merge_xlstm.recipe import load_linearize_recipe
from merge_xlstm.student import from_teacher
from merge_xlstm.testing import tiny_teacher, tiny_tokenizer

BEST = {"math": 0.5, "code": 0.3, "chat": 0.2}
SPEC = SimpleNamespace(strategy="coordinate", step=0.2, min_step=0.01, max_evaluations=80)


def test_coordinate_search_finds_the_minimum_of_a_known_function():
    target = list(BEST.values())
    found = coordinate_search(lambda w: sum((a - b) ** 2 for a, b in zip(w, target)), 3, SPEC)
    assert found == pytest.approx(target, abs=0.02) and sum(found) == pytest.approx(1.0)
    trace = search(lambda w, s: sum((a - b) ** 2 for a, b in zip(w, target)) + (s - 2.0) ** 2, 3, SPEC, [0.5, 1.0, 2.0])
    assert trace.best.scale == 2.0 and trace.best.weights == pytest.approx(target, abs=0.02)
    assert len(trace.evaluations) <= 3 * SPEC.max_evaluations


def test_in_memory_combinations_are_mergekits_formulas():
    base, a, b = (torch.randn(3, 4) for _ in range(3))
    torch.testing.assert_close(COMBINE.get("linear")(None, [a, b], [3.0, 1.0], 1.0), 0.75 * a + 0.25 * b)
    torch.testing.assert_close(COMBINE.get("task_arithmetic")(base, [a, b], [0.6, 0.4], 2.0),
                               base + 2.0 * (0.6 * (a - base) + 0.4 * (b - base)))


def _workspace(root: Path, method: str, scale: float) -> Path:
    """Teacher, three domain recipes, a seed and three experts built so that BEST (and `scale`) rebuild theta*.

    Paths in the recipes are relative to `root`, the working directory.
    """
    teacher = tiny_teacher("llama")
    teacher.save_pretrained(root / "teacher")
    tiny_tokenizer().save_pretrained(root / "teacher")
    student = {"kind": "hybrid", "mixer": "swa", "window_size": 64, "num_sink_tokens": 0}
    for i, name in enumerate(BEST):
        with (root / f"{name}.jsonl").open("w") as handle:
            for j in range(200):
                handle.write(json.dumps({"text": f"{name} {i * j % 97} plus {j} is {i * j % 97 + j}."}) + "\n")
        recipe = {"name": name, "teacher": "teacher", "student": student,
                  "data": {"sources": [{"path": f"{name}.jsonl"}], "seq_len": 32, "validation_fraction": 0.2},
                  "stage1": {"tokens": 32 * 8}, "stage2": {"tokens": 32 * 8 * 4, "top_k": 16},
                  "seed": "experts/seed", "output": f"experts/{name}"}
        (root / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
    # The KL to the teacher: its minimum is the merge that rebuilds the teacher (the default, the stage-II
    # loss, also rewards the experts' own cross-entropy, which has no known minimum here).
    search_spec = {"objective": "validation_kl", "rows_per_domain": 2, "step": 0.2, "min_step": 0.02,
                   "max_evaluations": 40}
    if method == "task_arithmetic":
        search_spec["lambdas"] = [1.0, 2.0]
    pipeline = {"name": "known", "domains": [f"{n}.yaml" for n in BEST],
                "merge": {"method": method, "search": search_spec}, "eval": {"suites": ["ci"]}}
    (root / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))

    theta_star = from_teacher(teacher, **student).state_dict()
    generator = torch.Generator().manual_seed(0)
    noise = [{k: 0.05 * torch.randn(v.shape, generator=generator) for k, v in theta_star.items()} for _ in range(3)]
    c = list(BEST.values())
    deltas = noise[:2] + [{k: -(c[0] * noise[0][k] + c[1] * noise[1][k]) / c[2] for k in theta_star}]
    seed = {k: v + noise[2][k] for k, v in theta_star.items()}  # theta_0, some other student
    # Task arithmetic: theta_0 + scale * sum_i c_i (theta_i - theta_0) = theta* when theta_i = theta_0 +
    # (theta* - theta_0) / scale + delta_i; for linear merges (scale 1) that is theta* + delta_i.
    experts = [{k: seed[k] + (theta_star[k] - seed[k]) / scale + d[k] for k in theta_star} for d in deltas]

    def write(path: Path, tensors: dict[str, torch.Tensor], record: dict) -> None:
        from_teacher(teacher, **student).save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
        save_file({k: v.contiguous() for k, v in tensors.items()}, path / "model.safetensors", metadata={"format": "pt"})
        write_metadata(path, record)

    recipes = {n: load_linearize_recipe(root / f"{n}.yaml") for n in BEST}
    digest = teacher_content(recipes["math"])[1]
    write(root / "experts" / "seed", seed,
          {"kind": "seed", "seed_key": seed_key(recipes["math"], digest), "teacher_digest": digest})
    seed_id = weights_digest(root / "experts" / "seed")
    for name, tensors in zip(BEST, experts):  # recorded as finished experts of these recipes
        write(root / "experts" / name, tensors,
              {"kind": "expert", "seed_id": seed_id, "recipe_key": recipe_key(recipes[name], digest)})
    return root


@pytest.mark.parametrize(("method", "scale"), [("linear", 1.0), ("task_arithmetic", 2.0)])
def test_the_search_step_finds_the_weights_that_rebuild_the_teacher(tmp_path, monkeypatch, method, scale):
    monkeypatch.chdir(tmp_path)
    root = _workspace(tmp_path, method, scale)
    assert cli(["run", "pipeline.yaml", "--only", "search"]) == 0
    result = json.loads((root / "experts" / ".run" / "search.json").read_text())
    searched, uniform = result["weightings"]["searched"], result["weightings"]["uniform"]
    assert searched["weights"] == pytest.approx(BEST, abs=0.03)
    assert searched["objective"] < 0.05 * uniform["objective"]
    if method == "task_arithmetic":
        assert searched["lambda"] == scale and uniform["lambda"] == 1.0
    else:
        assert searched["lambda"] is None
    assert min(e["objective"] for e in result["trace"]) == searched["objective"]
    shutil.rmtree(root / "experts")
