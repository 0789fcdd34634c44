"""The pipeline YAML of `merge-xlstm run`: which domain recipes, how to merge and search, what to evaluate.

Strict like every recipe (unknown keys are errors, one line naming file and field, exit 2). Numbers
live here and in the domain recipes: budgets, eval limits, search settings, the paper's fixed merge
weights, the goals the report checks, the throughput figures the dry run estimates time from.

    name: smollm2
    domains: [recipes/math.yaml, recipes/code.yaml, recipes/stem.yaml, recipes/chat.yaml]
    overrides: {stage2.tokens: 4000000}     # set in every domain recipe, like linearize --set
    merge: {method: linear, output: experts/merged, fixed_weights: {paper: {math: 0.35, ...}}, search: {...}}
    eval: {suites: [math, code, stem, chat], limit: 50}
    report: {output: reports/smollm2}

A directory argument means ``<dir>/pipeline.yaml``. Paths are relative to the working directory, as in
the domain recipes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from merge_xlstm.errors import UserError
from merge_xlstm.recipe import (
    LinearizeRecipe,
    MergeExpert,
    MergeRecipe,
    Strict,
    load_linearize_recipe,
    load_recipe,
    load_yaml,
)

PIPELINE_FILE = "pipeline.yaml"
BUILT_IN_WEIGHTS = ("searched", "uniform")  # weightings every run has; fixed ones are named in the pipeline


class SearchSpec(Strict):
    """Merge weights chosen on the domains' validation rows (never a test split), each candidate merged in memory."""

    # The experts' own stage-II loss, not the KL to the teacher: where the memory is off (documents within
    # the window) the seed is the teacher, every expert's training moves away from it, and a KL objective
    # picks whichever expert moved least instead of keeping each domain's gains (make demo's experts: the
    # seed has KL 0 on every domain and the highest CE; each expert has the lowest loss on its own domain).
    objective: str = Field(
        "validation_loss", description="merge.search.OBJECTIVES entry, averaged over domains (validation_loss: "
        "each domain's stage-II loss, ce_weight * CE + kl_weight * top-k KL; validation_kl; validation_ce)."
    )
    strategy: str = Field("coordinate", description="merge.search.STRATEGIES entry.")
    rows_per_domain: int = Field(8, ge=1, description="Held-out validation rows of each domain the objective reads.")
    step: float = Field(0.2, gt=0, lt=1, description="First move on the simplex: this share of weight shifted.")
    min_step: float = Field(0.025, gt=0, lt=1, description="The search stops once moves this small do not help.")
    max_evaluations: int = Field(60, ge=1, description="Candidate merges scored at most (per scaling).")
    lambdas: list[float] | None = Field(
        None, min_length=1, description="task_arithmetic: scalings tried, each with its own weight search "
        "(default: parameters.lambda alone)."
    )


class MergeStage(Strict):
    method: str = Field("linear", description="linear or task_arithmetic: the methods a search can merge in memory.")
    parameters: dict[str, float | bool] = Field(
        default_factory=dict, description="The method's parameters for the fixed and uniform weights ({lambda: 1.0})."
    )
    output: str = Field("experts/merged", description="The merge with searched weights; others go to <output>-<name>.")
    dtype: str = "float32"
    fixed_weights: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="Named weight sets compared beside the searched and uniform ones."
    )
    evaluate: list[str] = Field(
        default_factory=lambda: ["searched"],
        description="Which merges (searched, uniform, a fixed_weights name) the suites evaluate; all get the "
        "validation objective.",
    )
    search: SearchSpec = Field(default_factory=SearchSpec)

    @field_validator("fixed_weights")
    @classmethod
    def _names_free(cls, value: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        for name, weights in value.items():
            if name in BUILT_IN_WEIGHTS:
                raise ValueError(f"{name!r} is the name of a built-in weighting; choose another")
            if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
                raise ValueError(f"{name}: weights must be >= 0 with a positive sum")
        return value

    @model_validator(mode="after")
    def _evaluated_exist(self) -> "MergeStage":
        known = [*BUILT_IN_WEIGHTS, *self.fixed_weights]
        for name in self.evaluate:
            if name not in known:
                raise ValueError(f"evaluate: unknown weighting {name!r} (known: {', '.join(known)})")
        if "searched" not in self.evaluate:
            raise ValueError("evaluate: must include 'searched' (it is the run's merged model)")
        return self



class EvalSpec(Strict):
    suites: list[str] = Field(default_factory=lambda: ["math", "code", "stem", "chat"], min_length=1)
    limit: int | None = Field(None, ge=1, description="Documents per task (default: all).")
    batch_size: int = Field(8, ge=1)
    max_gen_toks: int | None = Field(None, ge=1, description="Cap on generated tokens for every generation task.")
    output: str = Field("results", description="lm-eval results per model and suite: <output>/<model>/<suite>/.")
    allow_unsafe_code: bool = Field(False, description="Run code suites where no sandbox isolates them.")


class Goals(Strict):
    """What the report checks the merged model against (issue 13's goals by default)."""

    alpha_star: float = Field(0.05, ge=0, le=1, description="Merged model's alpha* over all suites at most this.")
    in_domain: float = Field(0.95, ge=0, description="Merged score / expert score on each expert's own domain.")


class ReportSpec(Strict):
    output: str = "reports/mission"
    goals: Goals = Field(default_factory=Goals)


class Throughput(Strict):
    """Figures the dry run turns budgets into minutes with (defaults: SmolLM2-135M on one H200, measured)."""

    stage1: float = Field(80_000, gt=0, description="Stage-I tokens per second per device.")
    targets: float = Field(60_000, gt=0, description="Teacher top-k tokens per second per device.")
    stage2: float = Field(30_000, gt=0, description="Stage-II tokens per second per device.")
    eval_docs: float = Field(2.0, gt=0, description="Evaluated documents per second per device (all tasks mixed).")


class Pipeline(Strict):
    """`merge-xlstm run`: the whole mission in one file."""

    name: str = Field(pattern=r"^[\w.-]+$")
    domains: list[str] = Field(min_length=1, description="Domain linearize recipes, one expert each.")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Recipe fields set in every domain recipe, e.g. {stage2.tokens: 8192}."
    )
    experts_dir: str | None = Field(
        None, description="Put the seed at <dir>/seed and each expert at <dir>/<name> instead of the recipes' paths."
    )
    launcher: str = Field("auto", description="auto, inprocess, per_gpu or accelerate (mission.launch.LAUNCHERS).")
    launch_command: list[str] | None = Field(
        None, min_length=1, description="launcher accelerate: what starts one training worker over all GPUs, e.g. "
        "[accelerate, launch, --config_file, configs/accelerate/fsdp.yaml] (or torchrun --nproc_per_node N)."
    )
    device: str | None = Field(None, description="torch device for in-process steps (default: cuda if available).")
    state_dir: str = Field("experts/.run", description="What is neither model nor result: search, step logs.")
    seed_data: Literal["all", "first"] = Field(
        "all", description="The shared seed's stage-I data: every domain's sources, each domain an equal share "
        "(all), or the first domain's alone, as a lone `linearize` of that recipe would (first)."
    )
    merge: MergeStage = Field(default_factory=MergeStage)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    report: ReportSpec = Field(default_factory=ReportSpec)
    throughput: Throughput = Field(default_factory=Throughput)

    @field_validator("domains")
    @classmethod
    def _recipes_exist(cls, value: list[str]) -> list[str]:
        for path in value:
            if not Path(path).is_file():
                raise ValueError(f"no such recipe file: {path}")
        return value



@dataclass(frozen=True)
class Mission:
    """A validated pipeline with its domain recipes loaded (overrides applied) and checked to be mergeable."""

    pipeline: Pipeline
    path: str  # the pipeline file, for messages and for workers that re-read it
    overrides: tuple[str, ...]  # the command line's --set, which workers repeat
    domains: dict[str, LinearizeRecipe]  # by recipe name, in the pipeline's order

    @property
    def first(self) -> LinearizeRecipe:
        """The first listed domain: its recipe names the teacher, the seed and (with seed_data: first) the seed's data."""
        return next(iter(self.domains.values()))

    @property
    def seed_recipe(self) -> LinearizeRecipe:
        """The recipe the shared seed is built from: the first domain's, reading every domain's sources
        when `seed_data` is all. Every expert starts from this seed, so its stage I should align the
        memory on all of their text: on 2026-11-30 (docs/results) a seed aligned on math alone left the
        code expert at top-256 KL 0.79 after stage II, against 0.04 for math and stem."""
        first = self.first
        if self.pipeline.seed_data == "first":
            return first
        sources = []
        for recipe in self.domains.values():
            total = sum(source.weight for source in recipe.data.sources)
            sources += [source.model_copy(update={"weight": source.weight / total}) for source in recipe.data.sources]
        return first.model_copy(update={"data": first.data.model_copy(update={"sources": sources})})

    def merge_output(self, weighting: str) -> str:
        """The searched merge is the run's merged model; the others are written beside it."""
        output = self.pipeline.merge.output
        return output if weighting == "searched" else f"{output}-{weighting}"

    def merge_recipe(self, name: str, weights: dict[str, float], parameters: dict[str, float | bool]) -> MergeRecipe:
        """The `merge` recipe of one weighting: the experts with these weights, the shared seed as base."""
        spec = self.pipeline.merge
        return MergeRecipe.model_construct(
            method=spec.method, base=self.first.seed, parameters=parameters, output=self.merge_output(name),
            dtype=spec.dtype,
            experts=[_expert(recipe.output, weights[domain]) for domain, recipe in self.domains.items()],
            random_seed=0, overwrite=False,
        )


def _expert(path: str, weight: float) -> MergeExpert:
    return MergeExpert.model_construct(path=path, weight=weight, parameters={})


def load_mission(path_text: str, overrides: list[str] | None = None) -> Mission:
    """Read and check a pipeline (file, or a directory holding pipeline.yaml) and its domain recipes."""
    path = Path(path_text)
    if path.is_dir():
        if not (path / PIPELINE_FILE).is_file():
            raise UserError(f"no {PIPELINE_FILE} in this directory", where=path_text)
        path = path / PIPELINE_FILE
    pipeline: Pipeline = load_recipe(path, Pipeline, overrides)
    where = str(path)
    _check_names(pipeline, where)
    domains: dict[str, LinearizeRecipe] = {}
    for i, recipe_path in enumerate(pipeline.domains):
        recipe = load_linearize_recipe(recipe_path, _domain_overrides(pipeline, recipe_path))
        if recipe.name in domains:
            raise UserError(f"two recipes are named {recipe.name!r}", where=f"{where}: domains.{i}")
        domains[recipe.name] = recipe
    _check_mergeable(domains, where)
    for name, weights in pipeline.merge.fixed_weights.items():
        if set(weights) != set(domains):
            raise UserError(f"expected a weight for each domain ({', '.join(domains)}), got {', '.join(weights)}",
                            where=f"{where}: merge.fixed_weights.{name}")
    return Mission(pipeline, where, tuple(overrides or ()), domains)


def _domain_overrides(pipeline: Pipeline, recipe_path: str) -> list[str]:
    """The pipeline's overrides as `--set` strings (JSON is YAML), then the experts_dir placement."""
    pairs = [f"{key}={json.dumps(value)}" for key, value in _flatten(pipeline.overrides)]
    if pipeline.experts_dir is not None:
        name = load_yaml(recipe_path).get("name", Path(recipe_path).stem)
        pairs += [f"seed={json.dumps(str(Path(pipeline.experts_dir) / 'seed'))}",
                  f"output={json.dumps(str(Path(pipeline.experts_dir) / str(name)))}"]
    return pairs


def _flatten(mapping: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """{stage2: {tokens: 1}} and {stage2.tokens: 1} alike become [("stage2.tokens", 1)]: fields, not sections."""
    pairs = []
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            pairs += _flatten(value, f"{prefix}{key}.")
        else:
            pairs.append((f"{prefix}{key}", value))
    return pairs


def _check_names(pipeline: Pipeline, where: str) -> None:
    """Registry names in the pipeline, checked before any work (the registries live with their code)."""
    from merge_xlstm.eval.suites import suites
    from merge_xlstm.merge.search import COMBINE, OBJECTIVES, STRATEGIES
    from merge_xlstm.mission.launch import LAUNCHERS

    checks = [
        ("merge.method", [pipeline.merge.method], COMBINE),
        ("merge.search.objective", [pipeline.merge.search.objective], OBJECTIVES),
        ("merge.search.strategy", [pipeline.merge.search.strategy], STRATEGIES),
        ("launcher", [pipeline.launcher], LAUNCHERS),
        ("eval.suites", pipeline.eval.suites, suites()),
    ]
    for field, names, registry in checks:
        for name in names:
            if name not in registry:
                raise UserError(f"unknown {registry.kind} {name!r} (known: {', '.join(registry.names())})",
                                where=f"{where}: {field}")
    if pipeline.launcher == "accelerate" and pipeline.launch_command is None:
        raise UserError("launcher accelerate needs it, e.g. [accelerate, launch, --config_file, "
                        "configs/accelerate/fsdp.yaml]", where=f"{where}: launch_command")
    if pipeline.merge.search.lambdas is not None and pipeline.merge.method != "task_arithmetic":
        raise UserError(f"method {pipeline.merge.method} has no scaling to search; remove it",
                        where=f"{where}: merge.search.lambdas")


def _check_mergeable(domains: dict[str, LinearizeRecipe], where: str) -> None:
    """One teacher, one student config, one stage I and one seed directory: the condition for merging."""
    first_name, first = next(iter(domains.items()))
    outputs = {first.output: first_name}
    for name, recipe in list(domains.items())[1:]:
        for field, same in (("seed", recipe.seed == first.seed), ("teacher and student", (recipe.teacher, recipe.student) == (first.teacher, first.student)),
                            ("stage1", recipe.stage1 == first.stage1)):
            if not same:
                raise UserError(f"{name} and {first_name} differ in {field}; experts must grow from one seed to merge",
                                where=f"{where}: domains")
        if recipe.output in outputs:
            raise UserError(f"{name} and {outputs[recipe.output]} write the same output {recipe.output}",
                            where=f"{where}: domains")
        outputs[recipe.output] = name
