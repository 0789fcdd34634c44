"""The run's steps in order (see steps.py for what a step is): training, evaluations, search, merges, report."""

from __future__ import annotations

from typing import Any

from merge_xlstm.linearize.pipeline import build_seed, linearize, recipe_key, seed_key, teacher_content
from merge_xlstm.linearize.stage1 import Stage1Job
from merge_xlstm.linearize.stage2 import Stage2Job
from merge_xlstm.mission import evaluation, weights
from merge_xlstm.mission.report import report_step
from merge_xlstm.mission.spec import Mission
from merge_xlstm.mission.steps import Step, memo, merged_label
from merge_xlstm.provenance import read_metadata


def build_steps(mission: Mission, device: str | None) -> list[Step]:
    """Every step of the run, in an order that respects their dependencies."""
    steps: list[Step] = [_seed_step(mission, device)]
    steps += [_expert_step(mission, name, device) for name in mission.domains]
    models = {"teacher": (mission.first.teacher, ())}
    models |= {name: (recipe.output, (f"expert:{name}",)) for name, recipe in mission.domains.items()}
    merges = {name: mission.merge_output(name) for name in mission.pipeline.merge.evaluate}
    models |= {merged_label(name): (output, (f"merge:{name}",)) for name, output in merges.items()}
    evals = [evaluation.eval_step(mission, label, path, deps, device) for label, (path, deps) in models.items()]
    before_merge = [s for s in evals if not s.deps or s.deps[0].startswith("expert:")]
    steps += before_merge
    steps.append(weights.search_step(mission, device))
    steps += weights.merge_steps(mission)
    steps += [s for s in evals if s not in before_merge]
    steps.append(report_step(mission, steps, models))
    return steps


# ------------------------------------------------------------------------------ seed and experts
def _seed_step(mission: Mission, device: str | None) -> Step:
    recipe = mission.seed_recipe
    key = memo(lambda: seed_key(recipe, teacher_content(recipe)[1]))

    def done(key: str) -> bool:
        meta = read_metadata(recipe.seed)
        return meta.get("kind") == "seed" and meta.get("seed_key") == key

    def run(key: str) -> None:
        build_seed(recipe, device=device)

    return Step("seed", "train", (), key, done, run, budget=_stage_tokens(recipe, seed=True))


def _expert_step(mission: Mission, name: str, device: str | None) -> Step:
    recipe = mission.domains[name]
    key = memo(lambda: recipe_key(recipe, teacher_content(recipe)[1]))  # linearize's own

    def done(key: str) -> bool:
        meta = read_metadata(recipe.output)
        return meta.get("kind") == "expert" and meta.get("recipe_key") == key

    def run(key: str) -> None:
        linearize(recipe, device=device)

    return Step(f"expert:{name}", "train", ("seed",), key, done, run, budget=_stage_tokens(recipe, seed=False))


def _stage_tokens(recipe: Any, *, seed: bool) -> dict[str, int]:
    """Tokens each stage of this step processes (what the dry run turns into time)."""
    if seed:
        return {"stage1": Stage1Job.of(recipe).tokens if recipe.stage1 else 0}
    stage2, seq_len = Stage2Job.of(recipe), recipe.data.seq_len
    rows = stage2.rows_per_epoch
    validation = max(1, round(rows * recipe.data.validation_fraction))
    stored = recipe.student.trains_from_targets() and recipe.stage2.targets == "stored"
    return {"targets": ((rows if stored else 0) + validation) * seq_len,
            "stage2": stage2.tokens,
            "online_targets": 0 if stored else stage2.tokens}
