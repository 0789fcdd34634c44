"""Run a merge with mergekit's planner and streaming executor, for any tensor names.

mergekit 0.1.5 knows architectures from JSON definitions and otherwise infers one from tensor
names: it cuts names at their first `.<digit>.` into "layers", instantiates the model on the meta
device to find tied weights, and may rename tensors through transformers' checkpoint conversions.
For a student none of that is needed and each step can go wrong (nested indices, new block types,
a model class that does not build on meta). Since `checks` has already proven that every input has
exactly the same tensors, the architecture handed to mergekit here is simply the checkpoint's own
tensor list, one module without layers: every tensor is merged under its own name and no other.

`run_merge` cannot take an architecture, so this drives the pieces it is made of (MergePlanner,
Executor, LoaderCache). Config, tokenizer and model card are written by `run`, not by mergekit.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from mergekit.architecture import ModelArchitecture, ModuleDefinition, WeightInfo
from mergekit.architecture.json_definitions import JsonLayerTemplates, JsonModuleArchDef, JsonModuleArchitecture
from mergekit.common import ModelPath, ModelReference
from mergekit.config import InputModelDefinition, MergeConfiguration
from mergekit.graph import Executor
from mergekit.io.tasks import LoaderCache
from mergekit.options import MergeOptions
from mergekit.plan import MergePlanner
from transformers import PretrainedConfig

# The writer keeps one output shard in memory before writing it; with inputs streamed tensor by
# tensor this is what bounds peak memory, whatever the model size.
OUT_SHARD_BYTES = 1 << 30
# Task vectors of bf16 experts are differences of nearly equal numbers: do the arithmetic in fp32.
MATH_DTYPE = "float32"


def checkpoint_architecture(tensor_names: Iterable[str]) -> ModelArchitecture:
    """A mergekit architecture listing exactly these tensors, in name order."""
    module = JsonModuleArchitecture(
        definition=JsonModuleArchDef(
            model_type="",
            architectures=[],
            pre_weights=[WeightInfo(name=name) for name in sorted(tensor_names)],
            layer_templates=JsonLayerTemplates(weights=[]),
            post_weights=[],
            override_num_layers=0,
        )
    )
    modules = {"default": ModuleDefinition(architecture=module)}
    return ModelArchitecture(modules=modules, architectures=[], model_type="")


def _reference(path: Path) -> ModelReference:
    # Built field by field: mergekit's string form would read '+' and '@' in a path as LoRA/revision.
    return ModelReference(model=ModelPath(path=os.path.abspath(path)))


def merge_to_dir(
    *,
    method: str,
    experts: list[tuple[Path, dict[str, float | bool]]],
    base: Path | None,
    parameters: dict[str, float | bool],
    tensor_names: Iterable[str],
    config: PretrainedConfig,
    out_dtype: str,
    random_seed: int,
    out_dir: Path,
) -> None:
    """Merge `experts` (path, per-expert parameters) into safetensors shards in `out_dir`.

    `base` is passed to mergekit only for methods that use one; `config` is any input's config
    (mergekit reads layer counts from it, which this architecture does not have).
    """
    refs = [_reference(path) for path, _ in experts]
    merge_config = MergeConfiguration(
        merge_method=method,
        base_model=_reference(base) if base is not None else None,
        models=[InputModelDefinition(model=ref, parameters=params) for ref, (_, params) in zip(refs, experts)],
        parameters=parameters,
        dtype=MATH_DTYPE,
        out_dtype=out_dtype,
    )
    options = MergeOptions(device="cpu", out_shard_size=OUT_SHARD_BYTES)
    cache = LoaderCache()
    cache.setup(options)
    try:
        targets = MergePlanner(
            merge_config, checkpoint_architecture(tensor_names), options=options, out_model_config=config
        ).plan_to_disk(out_path=str(out_dir))
        executor = Executor(targets, math_device="cpu", storage_device="cpu")
        with torch.random.fork_rng(devices=[]):  # DARE's random drops are reproducible, the caller's RNG untouched
            torch.manual_seed(random_seed)
            for _ in executor.run(desc=f"merge ({method})"):
                pass
    finally:
        # The cache is process-global and keeps a shard of every input open: release ours.
        for ref in (*refs, merge_config.base_model):
            cache.loaders.pop(ref, None)
