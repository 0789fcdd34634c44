"""Packaged offline training sources by domain, one `PACKAGED` registry entry each (recipes: ``packaged:NAME``).

No offline package ships a train split of the benchmarks we evaluate on (REFERENCE.md §7). So each
domain trains on text that ships with Python or with an installed data package, or on procedurally
generated worked problems, and every entry states its origin, license and the split it reads in its
docstring. Evaluation splits are never read here; `merge_xlstm.data.heldout` refuses any source that
would read one, or that holds text an evaluation reads.

One module per domain (code, math, stem, chat); importing this package registers them all. A new
source is a decorated generator in its domain's module (`base.packaged`).
"""

from __future__ import annotations

from merge_xlstm.data.training import chat, code, math, stem  # noqa: F401 - each registers its sources
from merge_xlstm.data.training.base import PACKAGED, PackagedSource, Record

__all__ = ["PACKAGED", "PackagedSource", "Record"]
