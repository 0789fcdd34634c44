"""Session-wide test setup: offline, two threads, an isolated cache, tiny teachers and tokenizer.

The environment is set before anything imports huggingface_hub, which reads HF_HUB_OFFLINE once at
import time; subprocesses started by tests (the CLI) inherit it.
"""

from __future__ import annotations

import logging
import os
import shutil
import textwrap
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # the hub is never reachable from CI; fail fast, never wait on it
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# Without a GPU, Triton kernels (the fused decode step) run in Triton's interpreter on CPU tensors. Read when a
# kernel is defined, at import, so set before merge_xlstm is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from merge_xlstm.testing import FAMILY_CONFIGS, tiny_teacher, tiny_tokenizer  # noqa: E402

torch.set_num_threads(2)  # CI machines are small and shared


@pytest.fixture(scope="session", autouse=True)
def merge_xlstm_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh MERGE_XLSTM_CACHE for the session, so tests never depend on (or fill) the user's cache.

    Removed at the end: a converted SmolLM2 is 0.5 GB, and pytest keeps its last three temp roots.
    """
    path = tmp_path_factory.mktemp("merge_xlstm_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MERGE_XLSTM_CACHE", str(path))
        yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tokenizer():
    """The offline character-level tokenizer of the tiny teachers (a fresh instance per test)."""
    return tiny_tokenizer()


@pytest.fixture(params=sorted(FAMILY_CONFIGS))
def family(request: pytest.FixtureRequest) -> str:
    """Each supported teacher family in turn: llama, olmo2, qwen2."""
    return request.param


@pytest.fixture
def teacher(family: str) -> torch.nn.Module:
    """A tiny random-init teacher of each family (tests using it run once per family)."""
    return tiny_teacher(family)


@pytest.fixture
def teacher_dir(teacher: torch.nn.Module, tokenizer, tmp_path: Path) -> Path:
    """The tiny teacher saved with its tokenizer, as a teacher directory a recipe can name."""
    path = tmp_path / f"teacher-{teacher.config.model_type}"
    teacher.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def write_text(tmp_path: Path) -> Callable[[str, str], Path]:
    """`write_text("recipe.yaml", '''...''')` writes dedented text under tmp_path and returns the path."""

    def write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return path

    return write


@pytest.fixture
def deprecations() -> Iterator[Callable[[], list[str]]]:
    """``deprecations()`` lists the deprecations transformers reported so far in the test, on its
    logger or as warnings raised from transformers' or our code (other libraries' are not ours to fix).

    transformers' once-only warnings are reset first, so an earlier test cannot hide one.
    """
    logging.Logger.warning_once.cache_clear()
    logged: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logged.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    logger = transformers.logging.get_logger("transformers")
    logger.addHandler(handler)
    ours = (str(Path(transformers.__file__).parent), str(Path(__file__).parents[1] / "merge_xlstm"))
    with warnings.catch_warnings(record=True) as raised:
        warnings.simplefilter("always")
        yield lambda: [m for m in logged if "deprecat" in m.lower()] + [
            str(w.message) for w in raised
            if issubclass(w.category, (DeprecationWarning, FutureWarning)) and w.filename.startswith(ours)
        ]
    logger.removeHandler(handler)
