"""pass@1 for code tasks: run the model's program against the benchmark's tests in the sandbox.

lm-eval's own humaneval / mbpp tasks score through Hugging Face ``evaluate``'s ``code_eval``, fetched
from the hub and run in-process; these ``process_results`` functions build the same programs and run
them with :func:`merge_xlstm.eval.sandbox.run` instead. Greedy decoding, one sample: pass@1 is the
share of problems whose program exits 0 within the limits.
"""

from __future__ import annotations

from typing import Any

from merge_xlstm.eval import sandbox

# Per program: the Codex/HumanEval harness allows 3 s; here start-up of the sandbox and the interpreter
# count too, on possibly busy CPUs, so the wall limit is looser and CPU time bounds the work instead.
TIMEOUT_S = 15.0
LIMITS = sandbox.Limits(cpu_s=5.0, memory_mb=1024, disk_mb=64)


def humaneval_program(doc: dict[str, Any], completion: str) -> str:
    """Prompt (signature + docstring) + completion, then the benchmark's `check` on the entry point."""
    return f"{doc['prompt']}{completion}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"


def mbpp_program(doc: dict[str, Any], completion: str) -> str:
    """Setup code, the model's code, then the benchmark's three asserts."""
    tests = "\n".join(doc["test_list"])
    return f"{doc['test_setup_code']}\n{completion.strip()}\n\n{tests}\n"


def _passes(program: str) -> dict[str, float]:
    result = sandbox.run(program, TIMEOUT_S, limits=LIMITS)
    return {"pass@1": float(result.passed)}


def score_humaneval(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return _passes(humaneval_program(doc, results[0]))


def score_mbpp(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return _passes(mbpp_program(doc, results[0]))
