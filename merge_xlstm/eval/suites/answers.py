"""Final-answer scoring for MATH-style problems (Minerva protocol, Lewkowycz et al. 2022).

The model writes a solution ending in "Final Answer: The final answer is X. I hope it is correct." (the
four-shot prompt shows that form); X is normalised with Minerva's rules and compared with the gold
answer, the last ``\\boxed{}`` of the reference solution normalised the same way. The normalisation is
lm-eval 0.4.13's ``minerva_math`` port (MIT), copied because that module imports ``math_verify`` and
``antlr4`` at import time. Unlike lm-eval, equivalence is string equality after normalisation, without
the sympy check (which needs the same missing packages): answers equal only up to algebra (``1/2`` vs
``0.5``) count as wrong, for teacher and student alike.
"""

from __future__ import annotations

import re
from typing import Any

INVALID_ANSWER = "[invalidanswer]"
# lm-eval's pattern, unescaped dots included, so that scores match its minerva_math tasks.
FINAL_ANSWER = re.compile(r"Final Answer: The final answer is(.*?). I hope it is correct.")

SUBSTITUTIONS = [
    ("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), (r"\ ", ""), (" ", ""), ("mbox", "text"),
    (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"),
]  # fmt: skip
REMOVED_EXPRESSIONS = [
    "square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units", "\\ldots",
    "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters",
    "meals", "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
    "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;",
    r",\!", "{,}", '"', "\\dots",
]  # fmt: skip


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, ``\\boxed x``) in `text`."""
    if "\\boxed " in text:
        return text.split("\\boxed ")[-1].split("$")[0]
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    depth = 0
    for end in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        if text[end] == "}" and depth == 0:
            boxed = text[start : end + 1]
            return boxed[boxed.index("{") + 1 : -1]
    return None


def normalize_final_answer(answer: str) -> str:
    """Minerva's normalisation (appendix D of Lewkowycz et al.), as lm-eval 0.4.13 implements it."""
    answer = answer.split("=")[-1]
    for expr in REMOVED_EXPRESSIONS:  # unit words while whitespace still delimits them
        if expr.isalpha():
            answer = re.sub(rf"(?<!\\)\b{expr}\b", "", answer)
    for before, after in SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for expr in REMOVED_EXPRESSIONS:
        if expr.isalpha():  # glued units, skipping LaTeX command names ("ft" must not eat "\left")
            segments = re.split(r"(\\[a-zA-Z]+)", answer)
            segments[::2] = [segment.replace(expr, "") for segment in segments[::2]]
            answer = "".join(segments)
        else:
            answer = answer.replace(expr, "")
    answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)
    answer = re.sub(r"(\\text\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", answer)
    answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", answer)
    answer = re.sub(r"(sqrt)(\[[^\]]*\])(\w)", "\\1\\2{\\3}", answer)
    answer = re.sub(r"(sqrt)(?!\[)([^{])", "sqrt{\\2}", answer)
    answer = answer.replace("$", "")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+", answer):  # 100,000 -> 100000, but keep tuples like 0,1
        answer = answer.replace(",", "")
    return answer


def gold_math_answer(solution: str) -> str:
    boxed = last_boxed(solution)
    return normalize_final_answer(boxed) if boxed is not None else INVALID_ANSWER


def extract_math_answer(generation: str) -> str:
    """The normalised "Final Answer" of a generation, else its last boxed expression, else invalid."""
    match = FINAL_ANSWER.search(generation + "I hope it is correct.")
    if match:
        return normalize_final_answer(match.group(1).strip())
    boxed = last_boxed(generation)
    return normalize_final_answer(boxed) if boxed is not None else INVALID_ANSWER


def score_math(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """lm-eval ``process_results`` for MATH / MATH-500: exact match of normalised final answers."""
    predicted = extract_math_answer(results[0])
    return {"exact_match": float(predicted != INVALID_ANSWER and predicted == doc["answer"])}
