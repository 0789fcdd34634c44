"""Suite measures: what a suite computes beside its lm-eval tasks (registry ``MEASURES``).

lm-eval scores documents one request at a time; some evaluations do not fit that shape, such as
cross-entropy by position on long documents (``ce_by_position``), which needs every position's loss
from one pass over each document. A suite's ``_suite.yaml`` lists its measures under
``metadata.measures`` with their settings (validated by the measure's pydantic schema, whose
defaults fill what the YAML leaves out); `merge-xlstm eval` runs each after the suite's tasks into
the model's results folder (next to lm-eval's files, which `compare` reads), then lets it combine the
models of the run into ``<output>/``. ``--metadata KEY=VALUE`` overrides a setting of the tasks'
metadata or of a measure.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from merge_xlstm.errors import UserError
from merge_xlstm.eval.suites import Suite
from merge_xlstm.io import write_json
from merge_xlstm.recipe import PositionCESpec, format_validation_error, parse_overrides
from merge_xlstm.registry import Registry

# run(model dir, results folder, settings, device, --limit) -> summary lines
RunFn = Callable[[Path, Path, Any, str, "int | None"], list[str]]
# combine(output dir, [(model name, results folder)]) -> summary lines
CombineFn = Callable[[Path, list[tuple[str, Path]]], list[str]]


@dataclass(frozen=True)
class Measure:
    schema: type[BaseModel]  # its settings
    run: RunFn
    combine: CombineFn


MEASURES: Registry[Measure] = Registry("suite measure")


def metadata_overrides(suite: Suite, pairs: list[str] | None) -> dict[str, Any]:
    """``--metadata KEY=VALUE`` pairs as a mapping, checked before any model runs.

    Every key must be a setting of the suite's tasks or measures, and every measure's settings must
    validate with them.
    """
    overrides = dict(parse_overrides(pairs, where="--metadata"))
    known = {key for task in suite.tasks for key in task.settings}
    known |= {key for name in suite.measures for key in MEASURES.get(name).schema.model_fields}
    for key in overrides:
        if key not in known:
            raise UserError(f"suite {suite.name} has no setting {key!r} (settings: {', '.join(sorted(known))})",
                            where="--metadata")  # fmt: skip
    for name in suite.measures:
        settings(suite, name, overrides)
    return overrides


def settings(suite: Suite, name: str, overrides: dict[str, Any]) -> BaseModel:
    """The measure's settings: the suite YAML's, then the overrides, validated."""
    schema = MEASURES.get(name).schema
    values = {**suite.measures[name], **{k: v for k, v in overrides.items() if k in schema.model_fields}}
    try:
        return schema.model_validate(values)
    except ValidationError as err:
        raise UserError(format_validation_error(err), where=f"suite {suite.name}, measure {name}") from None


def run_measures(
    suite: Suite, path: Path, target: Path, *, device: str, limit: int | None, overrides: dict[str, Any]
) -> list[str]:
    """Run every measure of `suite` on the model in `path`, writing into its results folder `target`."""
    lines = []
    for name in suite.measures:
        lines += MEASURES.get(name).run(path, target, settings(suite, name, overrides), device, limit)
    return lines


def combine_measures(suite: Suite, output: Path, models: list[tuple[str, Path]]) -> list[str]:
    """Let every measure of `suite` combine the models of a run (name, results folder) into `output`."""
    return [line for name in suite.measures for line in MEASURES.get(name).combine(output, models)]


# ----------------------------------------------------------------------------- ce_by_position
CE_FILE = "ce_by_position"


def _ce_run(path: Path, target: Path, spec: PositionCESpec, device_name: str, limit: int | None) -> list[str]:
    """CE by position of one model on the held-out long documents: JSON + PNG in its results folder."""
    import torch
    from transformers import AutoTokenizer

    from merge_xlstm.eval import longctx, longdocs
    from merge_xlstm.eval.suites import passkey

    count = min(spec.documents, limit) if limit else spec.documents
    if count == 0:
        return ["  ce_by_position: 0 documents, skipped"]
    device = torch.device(device_name)
    model = longctx.load_model(path, device)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    length = min(spec.max_tokens, passkey.context_length(model.config) or spec.max_tokens)
    docs = longdocs.token_documents(tokenizer, count, length, where="ce_by_position documents")
    losses = longctx.position_losses(model, docs, chunk_tokens=spec.chunk_tokens, batch_size=spec.batch_size,
                                     device=device)  # fmt: skip
    bins = losses.bins(spec.bins)
    write_json(target / f"{CE_FILE}.json", {
        "model": str(path), "documents": [d.path for d in longdocs.LONG_DOCUMENTS[:count]],
        "tokens_per_document": length, "bins": bins, "output_gate_medians": losses.gates,
        "settings": spec.model_dump(),
    })  # fmt: skip
    longctx.plot_ce_curves({path.name: bins}, target / f"{CE_FILE}.png", title=f"CE by position ({count} documents)")
    return ["  ce_by_position  " + "  ".join(f"{longctx.bin_label(b)} {b['ce']:.3f}" for b in bins)]


def _ce_combine(output: Path, models: list[tuple[str, Path]]) -> list[str]:
    """All models' bins in one JSON and PNG, each bin's gain = CE of the first model - CE of this one."""
    from merge_xlstm.eval import longctx

    found = [(name, folder / f"{CE_FILE}.json") for name, folder in models]
    runs = {name: json.loads(file.read_text())["bins"] for name, file in found if file.is_file()}
    if not runs:
        return []
    reference = next(iter(runs.values()))
    for bins in runs.values():
        for mine, ref in zip(bins, reference):
            mine["gain"] = ref["ce"] - mine["ce"]
    write_json(output / f"{CE_FILE}.json", {"reference": next(iter(runs)), "models": runs})
    longctx.plot_ce_curves(runs, output / f"{CE_FILE}.png", title="CE by position on held-out long documents")
    width = max(map(len, runs))
    lines = [f"CE by position (gain over {next(iter(runs))}): {output / CE_FILE}.json, .png"]
    lines.append(" " * (width + 2) + "".join(f"{longctx.bin_label(b):>16}" for b in reference))
    for name, bins in runs.items():
        lines.append(f"  {name:<{width}}" + "".join(f"{b['ce']:.3f} ({b['gain']:+.3f})".rjust(16) for b in bins))
    return lines


MEASURES.register("ce_by_position")(Measure(PositionCESpec, _ce_run, _ce_combine))
