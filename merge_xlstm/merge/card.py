"""What a merged directory says about itself: the provenance record and the README model card.

A merged model is only interpretable with its recipe and the experts behind it, so both travel with
the weights: machine-readable in ``merge_xlstm.json`` (kind "merged"), human-readable in README.md.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

import yaml

from merge_xlstm.io import to_json
from merge_xlstm.merge.checks import ModelDir
from merge_xlstm.merge.methods import MergeMethodInfo
from merge_xlstm.recipe import MergeRecipe


def effective_weights(recipe: MergeRecipe, method: MergeMethodInfo) -> list[float]:
    """The coefficient each expert's weight becomes: normalised where the method normalises."""
    weights = [expert.weight for expert in recipe.experts]
    if method.fixed.get("normalize"):
        return [w / sum(weights) for w in weights]
    return weights


def merged_record(
    recipe: MergeRecipe, method: MergeMethodInfo, base: ModelDir | None, experts: list[ModelDir], seed_id: str | None
) -> dict[str, Any]:
    """The merged directory's ``merge_xlstm.json``."""
    return {
        "kind": "merged",
        "seed_id": seed_id,
        "method": recipe.method,
        "mergekit": {"version": version("mergekit"), "method": method.mergekit_name, "fixed": dict(method.fixed)},
        "recipe": recipe.model_dump(mode="json"),
        "base": {"path": base.label, "provenance": base.provenance} if base else None,
        "experts": [
            {"path": e.label, "weight": spec.weight, "effective_weight": w, "provenance": e.provenance}
            for e, spec, w in zip(experts, recipe.experts, effective_weights(recipe, method))
        ],
    }


def model_card(record: dict[str, Any], method: MergeMethodInfo, name: str) -> str:
    """README.md for the merged directory, rendered from its provenance record."""
    seed = f" of stage-I seed `{record['seed_id'][:12]}`" if record["seed_id"] else ""
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, mergekit, merge-xlstm]",
        "---",
        f"# {name}",
        "",
        f"Merged by merge-xlstm from {len(record['experts'])} experts{seed} with mergekit "
        f"{record['mergekit']['version']} method `{method.mergekit_name}`: {method.summary}.",
        "",
    ]
    if method.fixed.get("normalize"):
        lines += ["Weights are normalised to sum to 1 (mergekit `normalize: true`), so the merge is a convex "
                  "combination: each expert enters with its weight divided by the sum of all weights.", ""]
    if record["base"] and method.needs_base:
        lines += [f"Task vectors are taken against the base `{record['base']['path']}` (theta_0).", ""]
    lines += ["| expert | weight | coefficient | kind | seed |", "|---|---|---|---|---|"]
    for e in record["experts"]:
        prov = e["provenance"]
        lines.append(f"| `{e['path']}` | {e['weight']:g} | {e['effective_weight']:.4g} | "
                     f"{prov.get('kind', 'unrecorded')} | {(prov.get('seed_id') or '-')[:12]} |")
    lines += [
        "",
        "## Recipe",
        "",
        "```yaml",
        yaml.safe_dump(record["recipe"], sort_keys=False).rstrip(),
        "```",
        "",
        "## Provenance of the inputs",
        "",
        "As recorded in each input's `merge_xlstm.json` (also in this directory's `merge_xlstm.json`).",
        "",
        "```json",
        to_json({"base": record["base"], "experts": record["experts"]}, indent=2),
        "```",
        "",
    ]
    return "\n".join(lines)
