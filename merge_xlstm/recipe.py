"""Recipe schemas: the YAML files users write, validated strictly with pydantic.

Numbers live in recipes, not in code: every knob of the method (REFERENCE.md §1-3) is a field here
with the paper's value as its default. Unknown keys are errors (``extra="forbid"``) so a typo never
silently falls back to a default. Paths are resolved relative to the working directory, the way the
shipped recipes (``output: experts/code``) are written to be run from the repository root.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from merge_xlstm.errors import UserError
from merge_xlstm.kinds import STUDENT_KINDS, HybridStudent, Strict

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PACKAGED_PREFIX = "packaged:"
LOCAL_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt", ".gz", ".csv")
# AdamW (beta1 0.9) scales float32 tensors by up to 10 x the learning rate (the bias correction of its
# first step): beyond this bound that factor is no float32 number and the optimizer step fails.
MAX_LR = 3.4028234663852886e38 / 10


# The student: each kind is one object of merge_xlstm.kinds (its schema, builder, loss and stages).
KIND_NAMES = tuple(STUDENT_KINDS.in_order())  # the default kind first, in messages too
StudentSpec = Annotated[Union[tuple(STUDENT_KINDS.get(name) for name in KIND_NAMES)],  # noqa: UP007
                        Field(discriminator="kind")]


# ------------------------------------------------------------------------------------------ data
class DataSource(Strict):
    """One training source: a local file, a Hugging Face dataset id, or ``packaged:NAME``."""

    path: str
    weight: float = Field(1.0, gt=0)
    split: str = Field("train", description="Split read for training; evaluation splits are refused.")
    config: str | None = Field(None, description="Dataset configuration name (HF datasets).")
    text_field: str = "text"
    messages_field: str | None = Field(
        None, description="Field holding a chat as [{role, content}]; rendered with the chat template."
    )
    max_documents: int | None = Field(None, ge=1)

    @field_validator("path")
    @classmethod
    def _path_exists(cls, value: str) -> str:
        looks_local = value.startswith((".", "/", "~")) or value.endswith(LOCAL_DATA_SUFFIXES)
        if value.startswith(PACKAGED_PREFIX):
            return value  # checked against the packaged-source registry when data is built
        if looks_local and not Path(value).expanduser().exists():
            raise ValueError(f"no such file or directory: {value}")
        if not looks_local and not Path(value).exists() and not HUB_ID.match(value):
            raise ValueError(f"expected a local file, a dataset id 'org/name' or 'packaged:NAME', got {value!r}")
        return value


class DataSpec(Strict):
    sources: list[DataSource] = Field(min_length=1)
    seq_len: int = Field(2048, ge=8, description="Packed row length in tokens.")
    validation_fraction: float = Field(
        0.01, ge=0, lt=1, description="Held-out share of packed rows for validation loss/KL."
    )


# ---------------------------------------------------------------------------------------- stages
class OptimSpec(Strict):
    tokens: int = Field(ge=1, description="Training tokens for this stage (packed, incl. padding).")
    lr: float = Field(gt=0)
    batch_size: int = Field(8, ge=1, description="Global batch in packed rows per optimizer step.")
    micro_batch_size: int = Field(1, ge=1, description="Rows per forward pass and device; the rest is accumulation.")
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    log_every: int = Field(10, ge=1)
    save_every: int = Field(200, ge=1, description="Checkpoint interval in optimizer steps.")

    @field_validator("lr")
    @classmethod
    def _lr_fits_the_optimizer(cls, value: float) -> float:
        if value > MAX_LR:
            raise ValueError(f"{value:g} is beyond what the optimizer can step with in float32 (at most {MAX_LR:.3g})")
        return value


class Stage1Loss(Strict):
    """Weights of stage I's loss terms (``linearize/stage1.py``: STAGE1_TERMS), summed over layers.

    ``output`` is paper A's: the mixer's output against the teacher attention's. The teacher's
    attention splits exactly into SWA (the mass a on the window) and attention beyond it (1 - a):
    ``gate`` teaches o to be 1 - a, ``memory`` teaches the mLSTM branch the beyond-window part with
    the gate held at 1 - a, so neither branch can win by silencing the other.
    """

    output: float = Field(1.0, ge=0)
    gate: float = Field(1.0, ge=0)
    memory: float = Field(1.0, ge=0)
    memory_share: float = Field(
        0.0, ge=0, description="memory with each position's mLSTM error weighted by the beyond-window share 1 - a "
        "instead of its square (memory's residual is (1 - a)·(mLSTM - O))."
    )
    attention_transfer: float = Field(
        0.0, ge=0, description="KL from the teacher's attention weights over the keys beyond the window to the "
        "memory's weights over its keys, at stage1.attention_queries queries a row, each weighted by 1 - a."
    )


class Stage1Spec(OptimSpec):
    """Hidden-state alignment: only the new mixer parameters train (REFERENCE.md §2)."""

    lr: float = Field(1.0e-2, gt=0)
    min_lr: float = Field(1.0e-5, ge=0, description="End of the cosine decay.")
    gate_lr_scale: float = Field(
        1.0, gt=0, le=1, description="The output gate's learning rate as a share of lr. Adam moves each of the "
        "gate's ~1K input weights by about lr a step, so at lr 1e-2 its pre-activation can swing by ~10 a step "
        "and saturate the sigmoid, which then passes no gradient (docs/results, issue 12's ablation)."
    )
    loss: Stage1Loss = Field(default_factory=Stage1Loss)
    attention_queries: int = Field(
        64, ge=1, description="Query positions a row (spread over those beyond the window) at which the "
        "attention_transfer term compares attention weights: its cost is queries x row length per head."
    )


class LoraSpec(Strict):
    r: int = Field(256, ge=1)
    alpha: float = Field(512, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


class DistilSchedule(Strict):
    """Delta-distillation of paper B: a and T annealed per step, restarted lower at each epoch."""

    alpha_start: float = Field(0.8, ge=0, le=1)
    alpha_end: float = Field(0.5, ge=0, le=1)
    temperature_start: float = Field(2.0, gt=0)
    temperature_end: float = Field(1.0, gt=0)
    delta: float = Field(0.05, ge=0, lt=1)
    frobenius_weight: float = Field(1.0, ge=0)
    epochs: int = Field(1, ge=1, description="Passes over the stage's tokens; tokens are split evenly.")


class Stage2Spec(OptimSpec):
    """Sparse top-k knowledge distillation (hybrid) or Delta-distillation (distil_xlstm)."""

    lr: float = Field(1.0e-5, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    top_k: int = Field(256, ge=1)
    ce_weight: float = Field(0.9, ge=0)
    kl_weight: float = Field(0.1, ge=0)
    temperature: float = Field(1.0, gt=0)
    targets: Literal["stored", "online"] = Field(
        "stored", description="stored: the teacher's top-k computed once and kept on disk, no teacher in stage II; "
        "online: the teacher stays loaded and computes them for each batch (no disk; see linearize/targets.py)."
    )
    targets_dtype: Literal["float16", "bfloat16"] = Field(
        "float16", description="Dtype of stored top-k log-probabilities (indices are uint16 when the vocabulary fits)."
    )
    lora: LoraSpec | None = None
    distil: DistilSchedule | None = None


# ---------------------------------------------------------------------------------- long context
class PositionCESpec(Strict):
    """Cross-entropy by position on the held-out long documents (`merge_xlstm.eval.longdocs`)."""

    documents: int = Field(4, ge=0, description="Held-out long documents, in their listed order; 0: none.")
    max_tokens: int = Field(8192, ge=2, description="Tokens per document, capped by the model's context.")
    bins: list[int] = Field(
        default_factory=lambda: [0, 128, 512, 1024, 2048, 4096, 8192],
        description="Position bin edges; a bin [a, b) averages the CE of the tokens at positions a..b-1.",
    )
    chunk_tokens: int = Field(2048, ge=1, description="Positions per forward pass (a recurrent state carries on).")
    batch_size: int = Field(4, ge=1, description="Documents per forward pass.")

    @field_validator("bins")
    @classmethod
    def _increasing(cls, value: list[int]) -> list[int]:
        if len(value) < 2 or value[0] != 0 or any(b <= a for a, b in zip(value, value[1:])):
            raise ValueError(f"bin edges must start at 0 and increase, got {value}")
        return value


class LongContextSpec(Strict):
    """The expert's long-context report (issue 12): expert, teacher and SWA-only student, side by side.

    The defaults are a modest budget (a few seconds on a GPU); 0 documents and 0 trials turn it off.
    """

    ce: PositionCESpec = Field(default_factory=PositionCESpec)
    passkey_lengths: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [256, 1024, 2048, 4096], description="Pass-key prompt lengths in tokens."
    )
    passkey_trials: int = Field(5, ge=0, description="Pass-key prompts per length; 0: no pass-key.")
    recovery_from: int = Field(
        1024, ge=0, description="Recovery (CE_swa - CE) / (CE_swa - CE_teacher) is reported for bins from here."
    )


# -------------------------------------------------------------------------------------- recipes
class LinearizeRecipe(Strict):
    """`merge-xlstm linearize RECIPE`: one domain expert from a teacher."""

    name: str = Field(pattern=r"^[\w.-]+$")
    teacher: str
    student: StudentSpec = Field(default_factory=HybridStudent)
    data: DataSpec
    stage1: Stage1Spec | None = None
    stage2: Stage2Spec
    seed: str = Field(description="Directory of the shared stage-I checkpoint every expert starts from.")
    output: str
    random_seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU.")
    longctx: LongContextSpec = Field(
        default_factory=LongContextSpec, description="Long-context figures of the validation report and card."
    )

    @field_validator("teacher")
    @classmethod
    def _teacher_is_dir_or_id(cls, value: str) -> str:
        if Path(value).expanduser().is_dir() or HUB_ID.match(value):
            return value
        raise ValueError(f"expected a local model directory or a hub id 'org/name', got {value!r}")

    @model_validator(mode="after")
    def _stages_fit_student(self) -> "LinearizeRecipe":
        """The stages the student's kind has, and the settings its kind takes (the kind answers, by its class)."""
        kind = self.student
        if self.stage1 is not None and not kind.has_stage1:
            raise ValueError(f"stage1: hidden-state alignment does not apply to student kind {kind.kind}; remove it")
        if self.stage1 is None and kind.has_stage1:
            raise ValueError(f"stage1: required for student kind {kind.kind}")
        if self.stage1 is not None:
            kind.fit_stage1_loss(self.stage1.loss)
        if kind.delta_schedule:
            self.stage2.distil = self.stage2.distil or DistilSchedule()
        elif self.stage2.distil is not None:
            takers = ", ".join(n for n in KIND_NAMES if STUDENT_KINDS.get(n).delta_schedule)
            raise ValueError(f"stage2.distil: the Delta schedule applies to student kind {takers} only")
        return self


class MergeExpert(Strict):
    path: str
    weight: float = Field(1.0, ge=0)
    parameters: dict[str, float | bool] = Field(default_factory=dict)

    @field_validator("path")
    @classmethod
    def _is_dir(cls, value: str) -> str:
        if not Path(value).is_dir():
            raise ValueError(f"no such model directory: {value}")
        return value


class MergeRecipe(Strict):
    """`merge-xlstm merge [RECIPE]`: one model from several experts of one seed."""

    method: str = "linear"
    base: str | None = None
    experts: list[MergeExpert] = Field(min_length=1)
    parameters: dict[str, float | bool] = Field(default_factory=dict)
    output: str
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype of the merged weights; the arithmetic always runs in float32."
    )
    random_seed: int = Field(0, description="Seed of the random drops of DARE / DELLA, for reproducible merges.")
    overwrite: bool = Field(False, description="Replace an existing output directory (atomically, when done).")

    @field_validator("base")
    @classmethod
    def _base_is_dir(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_dir():
            raise ValueError(f"no such model directory: {value}")
        return value


# --------------------------------------------------------------------------------------- loading
def format_validation_error(err: ValidationError) -> str:
    """One line for the first error (and how many more): ``field: message``, as UserError wants it."""
    errors = err.errors()
    # An unknown key is usually a typo, which also makes the field it meant look missing: name it first.
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    field = ".".join(str(p) for p in first["loc"] if not (isinstance(p, str) and p in KIND_NAMES))
    msg = first["msg"].removeprefix("Value error, ")
    kinds = ", ".join(KIND_NAMES)
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = "required field is missing"
    elif first["type"] == "union_tag_not_found":  # the only tagged union is the student's kind
        field, msg = f"{field}.kind", f"required field is missing (one of: {kinds})"
    elif first["type"] == "union_tag_invalid":
        field, msg = f"{field}.kind", f"expected one of: {kinds}, got {first['ctx']['tag']!r}"
    elif (
        "input" in first
        and first["type"] not in ("model_type", "value_error")  # our validators' messages show the value
        and not isinstance(first["input"], dict)  # a model-level error's input is the whole section
    ):
        msg = f"{msg} (got {first['input']!r})"
    more = len(errors) - 1
    suffix = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
    # model-level validators have no location; their messages start with the field they are about
    return f"{field}: {msg}{suffix}" if field else f"{msg}{suffix}"


def _set_dotted(data: dict[str, Any], dotted: str, value: Any, where: str) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        if key.isdigit() and isinstance(node, list) and int(key) < len(node):
            node = node[int(key)]
            continue
        if not isinstance(node, dict):
            raise UserError(f"--set {dotted}: {key!r} is not a mapping", where=where)
        node = node.setdefault(key, {})
    last = keys[-1]
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise UserError(f"--set {dotted}: cannot set a key inside a {type(node).__name__}", where=where)


def parse_overrides(pairs: list[str] | None, where: str | None = None) -> list[tuple[str, Any]]:
    """Parse ``key.sub=value`` strings; values are YAML (so ``20000``, ``true``, ``[0, 2]`` work)."""
    out = []
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects KEY=VALUE, got {pair!r}", where=where)
        try:
            out.append((key.strip(), yaml.safe_load(raw)))
        except yaml.YAMLError:
            raise UserError(f"--set {key.strip()}: value {raw!r} is not valid YAML", where=where) from None
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; every failure is a one-line UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError("no such recipe file", where=str(path))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"malformed YAML{line}: {problem}", where=str(path)) from None
    if not isinstance(data, dict):
        raise UserError(f"expected a mapping at the top level, got {type(data).__name__}", where=str(path))
    return data


def load_recipe(path: str | Path, schema: type[Strict], overrides: list[str] | None = None) -> Any:
    """Load and validate a recipe, applying ``--set`` overrides first."""
    data = load_yaml(path)
    for key, value in parse_overrides(overrides, where=str(path)):
        _set_dotted(data, key, value, str(path))
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise UserError(format_validation_error(err), where=str(path)) from None


def load_linearize_recipe(path: str | Path, overrides: list[str] | None = None) -> LinearizeRecipe:
    return load_recipe(path, LinearizeRecipe, overrides)


def load_merge_recipe(path: str | Path, overrides: list[str] | None = None) -> MergeRecipe:
    return load_recipe(path, MergeRecipe, overrides)
