"""Checks run before any merge work: same student, same tokenizer, same seed, finite weights.

Averaging parameters is only meaningful between models of one architecture grown from one stage-I
seed (REFERENCE.md §2-3). mergekit would happily average two unrelated checkpoints of equal shapes,
so every mismatch is caught here, from config files, safetensors headers and provenance records
alone, and reported as one error naming the model and the first difference. Only the last check,
that every input holds finite numbers (a flipped byte can decode to NaN), reads the tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merge_xlstm.errors import UserError
from merge_xlstm.model_files import (
    TOKENIZER_FILES,
    check_model_dir,
    first_non_finite,
    read_json_object,
    tensor_shapes,
)
from merge_xlstm.provenance import read_metadata, weights_digest

# Written per save, not part of what the model is.
VOLATILE_CONFIG_KEYS = frozenset({"_name_or_path", "transformers_version", "dtype", "torch_dtype"})


@dataclass(frozen=True)
class ModelDir:
    """What the checks compare of one model directory: `label` is the path as the recipe wrote it."""

    label: str
    path: Path
    shards: list[Path]
    config: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    tokenizer: dict[str, Any]
    provenance: dict[str, Any]

    @property
    def seed_id(self) -> str | None:
        return self.provenance.get("seed_id")


def _read_tokenizer_file(path: Path, where: str) -> Any:
    # JSON is compared parsed, so re-serialisation (key order, spacing) is no difference.
    return read_json_object(path, where) if path.suffix == ".json" else path.read_bytes()


def read_model_dir(label: str) -> ModelDir:
    """Read a model directory's config, tensor shapes, tokenizer files and provenance."""
    path = Path(label)
    shards = check_model_dir(path, label)
    shapes = {name: shape for shard in shards for name, shape in tensor_shapes(shard).items()}
    config = read_json_object(path / "config.json", label)
    config = {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}
    tokenizer = {n: _read_tokenizer_file(path / n, label) for n in TOKENIZER_FILES if (path / n).is_file()}
    return ModelDir(label, path, shards, config, shapes, tokenizer, read_metadata(path))


def _first_field_difference(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> str | None:
    for key in sorted(a.keys() | b.keys()):
        if key not in b:
            return f"config field {prefix}{key} is missing"
        if key not in a:
            return f"config field {prefix}{key} is unexpected"
        if isinstance(a[key], dict) and isinstance(b[key], dict):
            if found := _first_field_difference(a[key], b[key], f"{prefix}{key}."):
                return found
        elif a[key] != b[key]:
            return f"config field {prefix}{key} is {b[key]!r}, expected {a[key]!r}"
    return None


def first_difference(reference: ModelDir, other: ModelDir) -> str | None:
    """The first way `other` differs from `reference` as a student: config field, tensor, tokenizer."""
    if found := _first_field_difference(reference.config, other.config):
        return found
    for name in sorted(reference.shapes.keys() | other.shapes.keys()):
        if name not in other.shapes:
            return f"tensor {name} is missing"
        if name not in reference.shapes:
            return f"tensor {name} is unexpected"
        if reference.shapes[name] != other.shapes[name]:
            return f"tensor {name} has shape {list(other.shapes[name])}, expected {list(reference.shapes[name])}"
    for name in sorted(reference.tokenizer.keys() | other.tokenizer.keys()):
        if name not in other.tokenizer:
            return f"tokenizer file {name} is missing"
        if name not in reference.tokenizer:
            return f"tokenizer file {name} is unexpected"
        if reference.tokenizer[name] != other.tokenizer[name]:
            return f"tokenizer file {name} differs"
    return None


def check_same_student(reference: ModelDir, others: list[ModelDir], where: str) -> None:
    for other in others:
        if found := first_difference(reference, other):
            raise UserError(f"{other.label} is not the same student as {reference.label}: {found}", where=where)


def check_finite(models: list[ModelDir]) -> None:
    """Every value of every input is a finite number: one NaN would spread into the merged tensor."""
    for model in models:
        if found := first_non_finite(model.shards):
            shard, tensor = found
            raise UserError(f"tensor {tensor} holds NaN or infinite values; a corrupt or diverged model cannot be "
                            "merged", where=str(shard))  # fmt: skip


def check_task_vector_base(base: ModelDir, experts: list[ModelDir], where: str) -> None:
    """Task-vector methods subtract the base, so it must be the experts' own seed.

    The base must be a genuine seed (its recorded id is its own weights' digest) and every expert
    must record that id; a directory without a record cannot be vouched for and is refused.
    """
    if base.seed_id is None:
        raise UserError(f"base {base.label} has no seed provenance (merge_xlstm.json with a seed_id); "
                        "task-vector methods need the stage-I seed written by `merge-xlstm linearize`", where=where)
    if weights_digest(base.path) != base.seed_id:
        raise UserError(f"base {base.label} is not a stage-I seed: its weights do not match its recorded "
                        f"seed_id (kind {base.provenance.get('kind', '?')})", where=where)
    for expert in experts:
        if expert.seed_id is None:
            raise UserError(f"expert {expert.label} has no seed provenance (merge_xlstm.json with a seed_id); "
                            f"cannot check it was trained from base {base.label}", where=where)


def common_seed(models: list[ModelDir], where: str) -> str | None:
    """The one seed id the models record (None if none records any); disagreeing ids are refused.

    Directories without a record (plain checkpoints) pass: they can still be averaged linearly.
    """
    recorded = [m for m in models if m.seed_id is not None]
    for model in recorded[1:]:
        if model.seed_id != recorded[0].seed_id:
            raise UserError(f"{model.label} was trained from seed {model.seed_id[:12]}, not from the seed of "
                            f"{recorded[0].label} ({recorded[0].seed_id[:12]})", where=where)
    return recorded[0].seed_id if recorded else None
