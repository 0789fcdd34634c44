"""What `linearize` checks before it loads the teacher, so that a run never fails late for a known reason.

In order: the teacher and an existing seed are loadable model directories (config, complete
safetensors, no custom code, no pickles), and the seed was built from this teacher's content and
student options; the data sources are readable training text; every directory the run
writes (output, seed, the cache) can be written; and the budget fits: memory for packing the rows
(data.py builds them in memory), disk for the packed rows, the teacher's top-k targets, the
checkpoints and the written models. Work a previous run finished (packed rows, target shards) is not
counted again. Each failure is one UserError naming the recipe file and field, or the directory.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from merge_xlstm.errors import UserError
from merge_xlstm.linearize.data import COLUMNS, check_sources, packed_key
from merge_xlstm.linearize.stage1 import Stage1Job
from merge_xlstm.linearize.stage2 import Stage2Job
from merge_xlstm.linearize.targets import bytes_per_row
from merge_xlstm.model_files import check_model_dir, read_json_object, tensor_shapes
from merge_xlstm.preflight import check_free_disk, check_free_memory, check_writable_dir
from merge_xlstm.provenance import read_metadata
from merge_xlstm.recipe import LinearizeRecipe

# Peak memory per packed token while data.py builds the rows (NumPy, then Arrow): the growth of max
# RSS from 16M to 64M tokens of a local JSON-lines source, measured on CPython 3.11 / NumPy 2.
PACKING_BYTES_PER_TOKEN = 60
PACKED_BYTES_PER_TOKEN = 4 * len(COLUMNS)  # int32 columns on disk
# A stage-II checkpoint holds the parameters and AdamW's two moments (float32); then the expert is written.
STAGE2_MODEL_COPIES = 3 + 1
FLOAT32_BYTES = 4


def training_rows(recipe: LinearizeRecipe) -> tuple[int, int]:
    """Packed rows stage I reads and rows of one stage-II epoch (the Delta schedule repeats that epoch)."""
    rows1 = Stage1Job.of(recipe).rows if recipe.stage1 else 0
    return rows1, Stage2Job.of(recipe).rows_per_epoch


def validation_rows(recipe: LinearizeRecipe) -> int:
    """Held-out rows packed next to the training rows (data.py's rule)."""
    return max(1, round(max(training_rows(recipe)) * recipe.data.validation_fraction))


def targets_dir(cache: Path, teacher_digest: str, data_key: str, top_k: int, dtype: str) -> Path:
    """Where the teacher's top-k targets of these packed rows live: keyed by teacher content, rows, k and
    the stored log-probabilities' dtype."""
    key = json.dumps({"teacher": teacher_digest, "data": data_key, "k": top_k, "dtype": dtype}, sort_keys=True)
    return cache / "targets" / hashlib.sha256(key.encode()).hexdigest()[:16]


def check_before_work(
    recipe: LinearizeRecipe, teacher_dir: Path, teacher_digest: str, seed_key: str, cache: Path, source: str | None,
    *, seed_only: bool = False,
) -> None:
    """Refuse, in one line naming the file and field, every run that would fail for a reason known now.

    `seed_only`: the run builds the seed and stops, so stage II's disk (targets, checkpoint, expert) is not asked for.
    """

    def at(field: str) -> str:
        return f"{source}: {field}" if source else field

    teacher_shards = check_model_dir(teacher_dir, recipe.teacher)
    try:
        recipe.student.check_teacher(read_json_object(teacher_dir / "config.json", str(teacher_dir)))
    except ValueError as exc:
        raise UserError(str(exc), where=at("student")) from None
    seed = Path(recipe.seed)
    seed_meta = read_metadata(seed)
    if seed_meta.get("kind") == "seed":
        check_seed(seed, seed_meta, teacher_digest, seed_key)
    elif seed.exists():
        raise UserError("exists but is not a merge-xlstm seed", where=str(seed))
    else:
        check_writable_dir(seed, at("seed"))
    check_writable_dir(recipe.output, at("output"))
    check_writable_dir(cache, "the merge-xlstm cache ($MERGE_XLSTM_CACHE)")
    try:
        check_sources(recipe.data)
    except UserError as exc:
        raise exc.located_in(source) if source else exc from None
    params = sum(math.prod(shape) for shard in teacher_shards for shape in tensor_shapes(shard).values())
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir, trust_remote_code=False)
    check_budget(recipe, tokenizer, params, teacher_digest, cache, seed_missing=seed_meta.get("kind") != "seed",
                 seed_only=seed_only, at=at)


def check_budget(
    recipe: LinearizeRecipe,
    tokenizer: PreTrainedTokenizerBase,
    teacher_params: int,
    teacher_digest: str,
    cache: Path,
    *,
    seed_missing: bool,
    seed_only: bool = False,
    at: Callable[[str], str],
) -> None:
    """Memory for packing the rows, disk for rows, targets, checkpoints and models, minus what exists."""
    seq_len, top_k, vocab_size = recipe.data.seq_len, recipe.stage2.top_k, len(tokenizer)
    rows1, rows2 = training_rows(recipe)
    packed_tokens = (max(rows1, rows2) + validation_rows(recipe)) * seq_len
    tokens_field = at("stage1.tokens" if rows1 > rows2 else "stage2.tokens")
    data_key = packed_key(recipe.data, tokenizer, max(rows1, rows2) * seq_len, recipe.random_seed)
    packed = (cache / "data" / f"packed-{data_key}").exists()
    if not packed:
        check_free_memory(packed_tokens * PACKING_BYTES_PER_TOKEN, f"packing {packed_tokens:,} tokens", tokens_field)
    stores_train = recipe.student.trains_from_targets() and recipe.stage2.targets == "stored"  # online: none on disk
    target_rows = validation_rows(recipe) + (rows2 if stores_train else 0)
    stored = targets_dir(cache, teacher_digest, data_key, top_k, recipe.stage2.targets_dtype)
    done = sum(f.stat().st_size for f in stored.glob("*.safetensors")) if stored.is_dir() else 0
    model_bytes = teacher_params * FLOAT32_BYTES  # the student has the teacher's size, give or take its mixers
    needs = [(cache, 0 if packed else packed_tokens * PACKED_BYTES_PER_TOKEN, "packed rows")]
    if not seed_only:
        needs += [
            (cache, max(0, target_rows * bytes_per_row(seq_len, top_k, vocab_size) - done), f"top-{top_k} targets"),
            (Path(recipe.output), model_bytes * STAGE2_MODEL_COPIES, "stage-II checkpoint and expert"),
        ]
    if seed_missing:
        needs.append((Path(recipe.seed), model_bytes, "seed"))
    check_free_disk(needs, tokens_field)


def check_seed(seed: Path, meta: dict, teacher_digest: str, key: str) -> None:
    """An existing seed is reused only if it was built from this teacher's content and student options.

    A seed of other teacher weights is refused, not rebuilt: experts already trained from it would no
    longer share a seed with the new ones, and merging needs exactly that.
    """
    if meta.get("seed_key") != key:
        if "teacher_digest" not in meta:
            reason = "was written by an older merge-xlstm that did not record its teacher's content"
        elif meta["teacher_digest"] != teacher_digest:
            reason = (f"was built from other teacher weights (content {meta['teacher_digest'][:12]}, the recipe's "
                      f"teacher now holds {teacher_digest[:12]})")  # fmt: skip
        else:
            reason = "holds a seed for other student options"
        raise UserError(f"{reason}; delete it or choose another seed", where=str(seed))
    check_model_dir(seed)
