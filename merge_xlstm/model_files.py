"""What a model directory must be before anything loads it: a config, complete safetensors, no custom code.

Loading is where transformers would run a directory's own Python (``auto_map``) or unpickle
``pytorch_model.bin``, and where a truncated or corrupt safetensors file fails deep inside a
library with a traceback. So every model directory this package reads (teacher, seed, merge inputs,
evaluated models) is checked here first, from its files alone, and each problem is one
:class:`UserError` naming the file and what was expected. Reading a header is cheap; checking that
every value is finite (:func:`first_non_finite`) reads all weights, once, a tensor at a time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from merge_xlstm.errors import UserError

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = f"{WEIGHTS}.index.json"
# Files that make transformers import Python shipped inside the model directory.
CODE_CONFIGS = ("config.json", "tokenizer_config.json")
# Every file a saved tokenizer may consist of: what merge compares and content digests cover.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# Those AutoTokenizer loads a tokenizer from: a model directory needs one of them.
TOKENIZER_ENTRY_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def check_tokenizer_files(path: Path, where: str) -> None:
    """Refuse a directory without a tokenizer here: transformers' own error talks about slow tokenizers."""
    if not any((path / name).is_file() for name in TOKENIZER_ENTRY_FILES):
        raise UserError(f"no tokenizer files ({', '.join(TOKENIZER_ENTRY_FILES)})", where=where)


def read_json_object(path: Path, where: str) -> dict[str, Any]:
    """A JSON file that must hold an object; anything else is a UserError naming the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path.name} is not readable JSON ({str(exc).splitlines()[0]})", where=where) from None
    if not isinstance(data, dict):
        raise UserError(f"{path.name} is not a JSON object", where=where)
    return data


def check_model_dir(path: str | Path, where: str | None = None) -> list[Path]:
    """Refuse a directory that cannot or must not be loaded; return its safetensors files."""
    path = Path(path)
    where = where or str(path)
    if not (path / "config.json").is_file():
        raise UserError("not a model directory (no config.json)", where=where)
    for name in CODE_CONFIGS:
        if (path / name).is_file() and "auto_map" in read_json_object(path / name, where):
            raise UserError(f"{name}: auto_map asks to run Python code shipped with the model, which merge-xlstm "
                            "never does (trust_remote_code stays off); use a model transformers supports itself",
                            where=where)  # fmt: skip
    shards = _weight_files(path, where)
    for shard in shards:
        tensor_shapes(shard)
    return shards


def _weight_files(path: Path, where: str) -> list[Path]:
    """The files transformers and mergekit read, in their order: an index of shards, else one file.

    Without either, mergekit would fall back to (and unpickle) pytorch_model.bin.
    """
    if (path / WEIGHTS_INDEX).is_file():
        listed = read_json_object(path / WEIGHTS_INDEX, where).get("weight_map")
        if not isinstance(listed, dict) or not listed:
            raise UserError(f"{WEIGHTS_INDEX}: weight_map is missing or empty", where=where)
        names = sorted(set(map(str, listed.values())))
        if bad := [n for n in names if Path(n).name != n or not n.endswith(".safetensors")]:
            raise UserError(f"{WEIGHTS_INDEX} lists {bad[0]!r}; expected safetensors files in the directory",
                            where=where)  # fmt: skip
        shards = [path / name for name in names]
        if missing := [s.name for s in shards if not s.is_file()]:
            raise UserError(f"{WEIGHTS_INDEX} lists {missing[0]}, which is missing", where=where)
        return shards
    if (path / WEIGHTS).is_file():
        return [path / WEIGHTS]
    pickled = sorted(p.name for p in path.glob("*.bin"))
    found = f" ({', '.join(pickled)} holds pickled weights, which are never loaded: save as safetensors)"
    raise UserError(f"no {WEIGHTS} (nor {WEIGHTS_INDEX})" + (found if pickled else ""), where=where)


def tensor_shapes(shard: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from a safetensors header, which must describe a complete file."""
    try:
        with safe_open(shard, framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except OSError as exc:
        raise UserError(f"cannot read it ({exc.strerror or exc})", where=str(shard)) from None
    except SafetensorError as exc:
        reason = str(exc).splitlines()[0].removeprefix("Error while deserializing header: ")
        raise UserError(f"not a complete safetensors file ({reason}); truncated or corrupt?", where=str(shard)) from None


def first_non_finite(shards: list[Path]) -> tuple[Path, str] | None:
    """The first (file, tensor) holding a NaN or an infinity, reading one tensor at a time."""
    for shard in shards:
        with safe_open(shard, framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    return shard, name
    return None
