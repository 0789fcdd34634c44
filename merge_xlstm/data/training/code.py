"""Code: the running interpreter's standard library, as whole files and as write-this-function pairs.

Evaluation splits are never read here: the code suite scores HumanEval and MBPP test.
"""

from __future__ import annotations

import ast
import functools
import re
import sysconfig
import textwrap
from collections.abc import Iterator
from pathlib import Path

from merge_xlstm.data.training.base import Record, chat, packaged

@functools.cache
def _stdlib_files() -> tuple[Path, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return tuple(sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts))


def _read_source(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):  # a few stdlib test fixtures are deliberately not UTF-8
        return None


@packaged("python_stdlib", split="none")
def python_stdlib() -> Iterator[Record]:
    """Python source files of the running interpreter's standard library, one file per document.

    Origin: CPython (PSF License 2.0); read from disk, nothing downloaded. Not an evaluation set.
    """
    for path in _stdlib_files():
        text = _read_source(path)
        if text and text.strip():
            yield {"text": text}


_DEF = re.compile(r"( *)def [A-Za-z]\w*\(")


def _def_blocks(text: str) -> Iterator[str]:
    """Dedented source of each public def: its lines up to the next non-blank line indented no deeper.

    Cutting by indentation instead of parsing whole modules is ~10x cheaper; a block cut short (a
    column-0 string inside the body) fails to parse later and is skipped.
    """
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if match := _DEF.match(line):
            indent, end = len(match.group(1)), i + 1
            while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent):
                end += 1
            yield textwrap.dedent("\n".join(lines[i:end])).rstrip()


@packaged("python_functions", split="none")
def python_functions() -> Iterator[Record]:
    """Instruction pairs from the standard library: signature + docstring -> the function's code.

    The HumanEval/MBPP task shape (write a function from its description) without their data.
    Origin: CPython's standard library (PSF License 2.0), public functions and methods of non-test
    modules with a docstring and at most 40 lines (about 4,700). Not an evaluation set.
    """
    for path in _stdlib_files():
        if {"test", "tests", "idle_test"} & set(path.parts):
            continue
        for code in _def_blocks(_read_source(path) or ""):
            try:
                node = ast.parse(code).body[0]
            except SyntaxError:
                continue
            doc = ast.get_docstring(node)
            if doc and code.count("\n") < 40:
                kind = "method" if node.args.args and node.args.args[0].arg in ("self", "cls") else "function"
                prompt = f"Write a Python {kind} `{node.name}({ast.unparse(node.args)})`.\n\n{doc}"
                yield chat(prompt, f"```python\n{code}\n```")
