"""Provenance of model directories: which seed an expert grew from, what a merge was made of.

Merging is only meaningful between experts trained from the *same* stage-I seed (REFERENCE.md §2-3),
so every directory this package writes carries a small ``merge_xlstm.json`` next to the weights:

    {"kind": "seed" | "expert" | "merged", "seed_id": "<sha256>", ...free-form details}

``seed_id`` is the SHA-256 of the seed's safetensors bytes, computed once when the seed is written
and copied into every expert made from it; `merge` compares these ids before doing any work.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from merge_xlstm.io import write_json
from merge_xlstm.model_files import read_json_object

METADATA_FILE = "merge_xlstm.json"


def weights_digest(model_dir: str | Path) -> str:
    """SHA-256 over the directory's ``*.safetensors`` files, in name order."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def read_metadata(model_dir: str | Path) -> dict[str, Any]:
    """The directory's provenance record, or ``{}`` for directories not written by merge-xlstm."""
    path = Path(model_dir) / METADATA_FILE
    return read_json_object(path, str(model_dir)) if path.is_file() else {}


def write_metadata(model_dir: str | Path, record: dict[str, Any]) -> None:
    write_json(Path(model_dir) / METADATA_FILE, record)
