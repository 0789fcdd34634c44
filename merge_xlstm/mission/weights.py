"""The run's merge-weight search and its merges (REFERENCE.md §3; the search itself is merge/search.py).

The search step reads each domain's held-out validation rows with the teacher's stored top-k targets
(the ones `linearize` computed for its validation report; computed here if the cache lost them), scores
candidate merges in memory and writes ``<state_dir>/search.json``: the searched weights (and scaling),
the uniform weights and every fixed weight set of the pipeline, each with its objective overall and per
domain, and the trace of every candidate scored. The merge steps then write the weightings the pipeline
evaluates as model directories through mergekit (`merge-xlstm merge`'s own code), so the searched merge
on disk is exactly what a user would get from a merge recipe with those weights.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from merge_xlstm.io import atomic_dir, write_json
from merge_xlstm.digests import fingerprint
from merge_xlstm.mission.evaluation import resolve_device
from merge_xlstm.mission.spec import Mission
from merge_xlstm.mission.steps import (
    SEARCH_FILE,
    Step,
    has_key,
    memo,
    model_key,
    read_json,
    remove_stale_temporaries,
)
from merge_xlstm.provenance import read_metadata
from merge_xlstm.recipe import MergeRecipe

if TYPE_CHECKING:  # accelerate is imported where the search runs, not when the CLI starts
    from accelerate import Accelerator


def search_path(mission: Mission) -> Path:
    return Path(mission.pipeline.state_dir) / SEARCH_FILE


def default_scale(mission: Mission) -> float:
    """The task-arithmetic scaling of the uniform and fixed weights (mergekit's default lambda is 1)."""
    return float(mission.pipeline.merge.parameters.get("lambda", 1.0))


def search_step(mission: Mission, device: str | None) -> Step:
    path = search_path(mission)
    spec = mission.pipeline.merge

    def key() -> str:
        models = [model_key(r.output) for r in mission.domains.values()] + [model_key(mission.first.seed)]
        return fingerprint({"models": models, "merge": spec.model_dump(exclude={"output", "dtype", "evaluate"})})

    def run(key: str) -> None:
        write_json(path, {"key": key, **run_search(mission, device)})

    deps = tuple(f"expert:{name}" for name in mission.domains)
    return Step("search", "device", deps, memo(key), lambda key: has_key(path, key), run)


def run_search(mission: Mission, device: str | None) -> dict[str, Any]:
    """Search the weights; score the searched, uniform and fixed weightings on every domain."""
    import torch
    from transformers import AutoModelForCausalLM

    from merge_xlstm.linearize.report import validation_metrics
    from merge_xlstm.linearize.training import make_accelerator, training_precision
    from merge_xlstm.merge.search import OBJECTIVES, InMemoryMerge, search

    device = resolve_device(device)
    spec, domains = mission.pipeline.merge, list(mission.domains)
    accelerator = make_accelerator(device, mission.first.precision)
    rows = validation_rows(mission, accelerator)
    model = AutoModelForCausalLM.from_pretrained(mission.first.seed, dtype=torch.float32).to(device).eval()
    experts = [_state_dict(recipe.output) for recipe in mission.domains.values()]
    base = _state_dict(mission.first.seed) if spec.method == "task_arithmetic" else None
    merger = InMemoryMerge(model, spec.method, experts, base)
    objective = OBJECTIVES.get(spec.search.objective)

    def per_domain(weights: list[float], scale: float) -> dict[str, float]:
        merger.apply(weights, scale)
        with training_precision(accelerator):  # as each expert's own validation was measured
            return {name: objective(validation_metrics(model, rows[name], torch.device(device), recipe.stage2.top_k),
                                    recipe.stage2) for name, recipe in mission.domains.items()}

    tokens = sum(len(r) * len(r[0]["input_ids"]) for r in rows.values())  # scored per candidate
    bar = tqdm(desc=f"merge-weight search ({spec.search.strategy})", unit="candidate")

    def score(weights: list[float], scale: float) -> float:
        began = time.perf_counter()
        value = _mean(per_domain(weights, scale))
        bar.update(1)
        bar.set_postfix(objective=f"{value:.4f}", tok_s=f"{tokens / (time.perf_counter() - began):,.0f}")
        return value

    scaled = spec.method == "task_arithmetic"
    trace = search(score, len(domains), spec.search, spec.search.lambdas or [default_scale(mission)])
    bar.close()
    best = trace.best
    weightings = {
        "searched": (best.weights, best.scale),
        "uniform": ([1.0 / len(domains)] * len(domains), default_scale(mission)),
        **{name: ([w[d] for d in domains], default_scale(mission)) for name, w in spec.fixed_weights.items()},
    }
    scored = {}
    for name, (weights, scale) in weightings.items():
        values = per_domain(list(weights), scale)
        scored[name] = {"weights": dict(zip(domains, weights)), "lambda": scale if scaled else None,
                        "objective": _mean(values), "per_domain": values}
    return {
        "objective": spec.search.objective,
        "strategy": spec.search.strategy,
        "method": spec.method,
        "domains": domains,
        "rows_per_domain": {name: len(r) for name, r in rows.items()},
        "weightings": scored,
        "trace": [{"weights": e.weights, "lambda": e.scale if scaled else None, "objective": e.value}
                  for e in trace.evaluations],
    }


def _mean(values: dict[str, float]) -> float:
    return math.fsum(values.values()) / len(values)


def _state_dict(model_dir: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    tensors: dict[str, Any] = {}
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        tensors |= load_file(shard)
    return tensors


def validation_rows(mission: Mission, accelerator: Accelerator) -> dict[str, list[dict[str, Any]]]:
    """The first `rows_per_domain` held-out rows of each domain with the teacher's top-k targets."""
    from merge_xlstm.linearize.pipeline import recipe_data, recipe_targets, recipe_teacher
    from merge_xlstm.linearize.targets import WithTargets, compute_targets

    teacher, tokenizer = recipe_teacher(mission.first, accelerator)
    rows = {}
    for name, recipe in mission.domains.items():
        data = recipe_data(recipe, tokenizer)
        directory = recipe_targets(recipe, data)
        count = min(mission.pipeline.merge.search.rows_per_domain, len(data.validation))
        compute_targets(teacher, data.validation, rows=len(data.validation), top_k=recipe.stage2.top_k,
                        directory=directory, split="validation", accelerator=accelerator,
                        dtype=recipe.stage2.targets_dtype)
        validation = WithTargets(data.validation, directory, "validation")
        rows[name] = [validation[i] for i in range(count)]
    return rows


# ---------------------------------------------------------------------------------------- merges
def merge_steps(mission: Mission) -> list[Step]:
    return [_merge_step(mission, name) for name in mission.pipeline.merge.evaluate]


def _merge_step(mission: Mission, name: str) -> Step:
    def recipe() -> MergeRecipe:
        chosen = read_json(search_path(mission))["weightings"][name]
        parameters = dict(mission.pipeline.merge.parameters)
        if chosen["lambda"] is not None:
            parameters["lambda"] = chosen["lambda"]
        return mission.merge_recipe(name, chosen["weights"], parameters)

    key = memo(lambda: fingerprint(_identity(recipe().model_dump(mode="json"))))

    def done(key: str) -> bool:
        record = read_metadata(recipe().output)
        return record.get("kind") == "merged" and fingerprint(_identity(record.get("recipe", {}))) == key

    def run(key: str) -> None:
        from merge_xlstm.merge.run import plan, write_merged

        planned = recipe()
        stale = read_metadata(planned.output).get("kind") == "merged"  # an earlier run's merge: replace it
        checked = MergeRecipe.model_validate({**planned.model_dump(), "overwrite": stale})
        merge = plan(checked, f"{mission.path}: merge ({name})")
        remove_stale_temporaries(Path(checked.output))
        with atomic_dir(checked.output, overwrite=stale) as tmp:
            write_merged(merge, tmp)
        print(f"merged {len(merge.experts)} experts ({checked.method}, {name} weights) into {checked.output}")

    return Step(f"merge:{name}", "host", ("search",), key, done, run)


def _identity(recipe: dict[str, Any]) -> dict[str, Any]:
    """What makes two merges the same (whether an output may be replaced is not part of it)."""
    return {k: v for k, v in recipe.items() if k != "overwrite"}
