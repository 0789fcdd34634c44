"""The run as resumable steps: each has a key (what its result depends on) and a durable, atomic result.

    seed                      the shared stage-I seed (from every domain's data, or the first's: seed_data)
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
from merge_xlstm.provenance import weights_digest

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

