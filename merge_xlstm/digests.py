"""Content digests of model directories: cache keys that change when the files do, not the path.

Teacher targets and the shared seed are computed from a teacher; keying them on the teacher's name
would reuse them after its weights were replaced in place. Their keys therefore include
:func:`content_digest` of the teacher directory: its config, weights and tokenizer files.

Hashing is correct but not free (a second or so per GB), so each file's SHA-256 is remembered in
``<cache>/file-digests.json`` under its resolved path, size, inode, mtime and ctime. A rewrite
changes the ctime (which no user call can set back), so a remembered digest is only reused for the
very bytes it was computed from; a rerun hashes only the files that changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from merge_xlstm.io import write_json
from merge_xlstm.model_files import TOKENIZER_FILES

MEMO_FILE = "file-digests.json"
# What of a model directory decides what it computes (README, .gitattributes and the like do not).
CONTENT_PATTERNS = ("config.json", "*.safetensors", *TOKENIZER_FILES)


def fingerprint(data: object) -> str:
    """A short key of JSON-able `data` (recipes, settings, the keys of the steps before): order of keys ignored."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: Path, memo_dir: Path) -> str:
    """SHA-256 of the file's bytes, remembered in `memo_dir` for files that have not changed since."""
    path = path.resolve()
    stat = path.stat()
    stamp = [stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns]
    memo_file = memo_dir / MEMO_FILE
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    known = memo.get(str(path))
    if isinstance(known, dict) and known.get("stamp") == stamp:
        return str(known["sha256"])
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    memo[str(path)] = {"stamp": stamp, "sha256": digest.hexdigest()}
    write_json(memo_file, memo)  # another process's concurrent entry may be lost: it is only rehashed
    return digest.hexdigest()


def content_digest(model_dir: str | os.PathLike[str], memo_dir: Path) -> str:
    """SHA-256 over the names and digests of the directory's config, weight and tokenizer files."""
    model_dir = Path(model_dir)
    files = sorted({path for pattern in CONTENT_PATTERNS for path in model_dir.glob(pattern) if path.is_file()})
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{file_digest(path, memo_dir)}\n".encode())
    return digest.hexdigest()
