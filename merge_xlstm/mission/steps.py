"""The run as resumable steps: each has a key (what its result depends on) and a durable, atomic result.

    seed                      the shared stage-I seed (from the first domain's data)
    expert:<domain>           `linearize` of each domain recipe
    eval:teacher              every lm-eval suite, teacher and every expert, results under eval.output
    eval:<domain>
    search                    merge weights on the domains' validation rows -> <state_dir>/search.json
    merge:<weighting>         searched, uniform and fixed weights, mergekit into model directories
    eval:merged[-<w>]         the merges the pipeline evaluates
    report                    compare (C_alpha, alpha*) and the report page -> report.output

A step is done when its result carries its key: seed and expert directories their recipe's key (as
`linearize` itself checks), eval results a stamp file, merges their recipe in merge_xlstm.json, search
and report their JSON. Keys chain: an evaluation is keyed by the evaluated weights' digest, the report
by every key before it, so changing anything redoes exactly what depends on it and a finished run
redoes nothing. Results are written whole or not at all, so a run killed at any moment resumes.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merge_xlstm.io import atomic_dir, write_json
from merge_xlstm.linearize.pipeline import fingerprint, seed_key
from merge_xlstm.mission.spec import Mission
from merge_xlstm.provenance import read_metadata, weights_digest

STAMP = "merge_xlstm_run.json"  # in each eval results directory: the key it was made for
SEARCH_FILE = "search.json"


@dataclass
class Step:
    """One resumable piece of the run; `work` says how a launcher may place it (train, device, host)."""

    name: str
    work: str
    deps: tuple[str, ...]
    key: Callable[[], str]
    done: Callable[[str], bool]
    run: Callable[[str], None]
    budget: dict[str, Any] = field(default_factory=dict)  # tokens per stage or eval documents, for --dry-run


def build_steps(mission: Mission, device: str | None) -> list[Step]:
    """Every step of the run, in an order that respects their dependencies."""
    from merge_xlstm.mission import evaluation, weights

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
    from merge_xlstm.mission.report import report_step

    steps.append(report_step(mission, steps, models))
    return steps


def merged_label(weighting: str) -> str:
    """What a merge is called in results and the report: `merged` (searched weights) or `merged-<name>`."""
    return "merged" if weighting == "searched" else f"merged-{weighting}"


def memo(fn: Callable[[], str]) -> Callable[[], str]:
    """A key is computed once per process (it may hash a model's weights)."""
    return functools.cache(fn)


def model_key(path_or_id: str) -> str:
    """Identity of evaluated weights: the digest of a local directory, or the hub id / packaged name itself.

    A digest is computed once per process for each state of the files (name, size, modification time).
    """
    path = Path(path_or_id)
    if not path.is_dir():
        return path_or_id
    files = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(path.glob("*.safetensors")))
    return _digest(str(path.resolve()), files)


@functools.cache
def _digest(path: str, files: tuple[tuple[str, int, int], ...]) -> str:
    return weights_digest(path)


# ------------------------------------------------------------------------------ seed and experts
def _seed_step(mission: Mission, device: str | None) -> Step:
    recipe = mission.first
    key = memo(lambda: seed_key(recipe))

    def done(key: str) -> bool:
        meta = read_metadata(recipe.seed)
        return meta.get("kind") == "seed" and meta.get("seed_key") == key

    def run(key: str) -> None:
        from merge_xlstm.linearize.pipeline import build_seed

        build_seed(recipe, device=device)

    return Step("seed", "train", (), key, done, run, budget=_stage_tokens(recipe, seed=True))


def _expert_step(mission: Mission, name: str, device: str | None) -> Step:
    recipe = mission.domains[name]
    key = memo(lambda: fingerprint(recipe.model_dump()))  # linearize's own recipe_key

    def done(key: str) -> bool:
        meta = read_metadata(recipe.output)
        return meta.get("kind") == "expert" and meta.get("recipe_key") == key

    def run(key: str) -> None:
        from merge_xlstm.linearize.pipeline import linearize

        linearize(recipe, device=device)

    return Step(f"expert:{name}", "train", ("seed",), key, done, run, budget=_stage_tokens(recipe, seed=False))


def _stage_tokens(recipe: Any, *, seed: bool) -> dict[str, int]:
    """Tokens each stage of this step processes (what the dry run turns into time)."""
    from merge_xlstm.linearize.stage2 import steps_per_epoch, total_steps
    from merge_xlstm.linearize.training import num_steps

    seq_len = recipe.data.seq_len
    if seed:
        return {"stage1": num_steps(recipe.stage1, seq_len) * recipe.stage1.batch_size * seq_len if recipe.stage1 else 0}
    rows = steps_per_epoch(recipe) * recipe.stage2.batch_size
    validation = max(1, round(rows * recipe.data.validation_fraction))
    stored = recipe.student.kind == "hybrid" and recipe.stage2.targets == "stored"
    return {"targets": ((rows if stored else 0) + validation) * seq_len,
            "stage2": total_steps(recipe) * recipe.stage2.batch_size * seq_len,
            "online_targets": 0 if stored else total_steps(recipe) * recipe.stage2.batch_size * seq_len}


# ------------------------------------------------------------------------------------- helpers
def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def has_key(path: Path, key: str) -> bool:
    return read_json(path).get("key") == key


def remove_stale_temporaries(target: Path) -> None:
    """Remove what a killed writer of `target` left beside it (``atomic_dir``'s ``.<name>.tmp-*``).

    Only for outputs the run alone writes, one step at a time: a leftover results folder would
    otherwise be read by `merge-xlstm compare <results>/<model>` as a second copy of the model's tasks.
    """
    for leftover in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def write_dir_with_stamp(target: Path, key: str, fill: Callable[[Path], None]) -> None:
    """Fill a fresh directory and rename it over `target` with the key stamped inside (all or nothing)."""
    remove_stale_temporaries(target)
    with atomic_dir(target, overwrite=True) as tmp:
        fill(tmp)
        write_json(tmp / STAMP, {"key": key})

