"""The tolerance-corrected win-and-tie rate C_alpha and the critical tolerance alpha* (REFERENCE.md §4).

For benchmark b with student score A_S(b) and teacher score A_T(b) (higher is better, both >= 0),
``1_alpha(b) = [A_S >= (1 - alpha) A_T]`` holds exactly for ``alpha >= alpha_b``, where

    alpha_b = max(0, 1 - A_S / A_T)        (A_T = 0: alpha_b = 0, the student always passes)

is the benchmark's *critical tolerance*. So C_alpha = #{b : alpha_b <= alpha} / |B| is a right-continuous
step function of alpha that jumps at the alpha_b, and

    alpha* = inf {alpha : C_alpha >= 1/2} = the ceil(|B|/2)-th smallest alpha_b

(attained, because C steps up *at* each alpha_b). No grid is involved. Scores and tolerances are read
as the decimals they print as (``Fraction(repr(x))``) and compared as exact fractions, so ties come out
as a person checking the table would expect; floating point gets them wrong (0.3 >= (1 - 0.25) * 0.4 is
false in floats). Since A_S >= 0, every benchmark passes at alpha = 1, so alpha* always exists in [0, 1].

The bootstrap functions resample documents (paired: the same documents for both models) to give
confidence intervals; they work in floating point on arrays, where ties have measure zero anyway.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

LOSSLESS_THRESHOLD = Fraction(1, 2)


def exact(x: float | Fraction) -> Fraction:
    """The decimal a float prints as, as an exact fraction (0.3 -> 3/10, not the nearest binary value)."""
    return x if isinstance(x, Fraction) else Fraction(repr(float(x)))


def critical_alpha(student: float, teacher: float) -> Fraction:
    """alpha_b: the smallest tolerance at which the student's score counts as a win or tie."""
    for value in (student, teacher):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"scores must be finite and >= 0 (accuracy-like, higher is better), got {value}")
    s, t = exact(student), exact(teacher)
    if t == 0 or s >= t:
        return Fraction(0)
    return 1 - s / t


def c_alpha(critical: Sequence[Fraction], alpha: float | Fraction) -> Fraction:
    """Share of benchmarks won or tied at tolerance `alpha`."""
    if not critical:
        raise ValueError("no benchmarks to score")
    alpha = exact(alpha)
    return Fraction(sum(a <= alpha for a in critical), len(critical))


def alpha_star(critical: Sequence[Fraction]) -> Fraction:
    """inf {alpha : C_alpha >= 1/2}: the ceil(|B|/2)-th smallest critical tolerance."""
    if not critical:
        raise ValueError("no benchmarks to score")
    need = math.ceil(len(critical) * LOSSLESS_THRESHOLD)
    return sorted(critical)[need - 1]


def corners(critical: Sequence[Fraction]) -> list[tuple[float, float]]:
    """The exact curve: (alpha, C_alpha) at 0 and at every critical tolerance, where C steps up."""
    return [(float(a), float(c_alpha(critical, a))) for a in sorted({Fraction(0), *critical})]


# ------------------------------------------------------------------------------------ bootstrap
@dataclass(frozen=True)
class Interval:
    low: float
    high: float


@dataclass(frozen=True)
class BootstrapResult:
    iterations: int
    task_difference: dict[str, Interval]  # candidate - reference, per task
    c_alpha: dict[float, Interval] | None  # only when every task has paired samples
    alpha_star: Interval | None


def paired_bootstrap(
    pairs: Mapping[str, tuple[np.ndarray, np.ndarray]],
    all_tasks: Sequence[str],
    alphas: Sequence[float],
    *,
    iterations: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> BootstrapResult:
    """Percentile intervals from resampling each task's documents with replacement.

    `pairs` maps a task to its per-document (reference, candidate) metric values, aligned by document.
    Tasks are resampled independently (they hold different documents). C_alpha and alpha* get intervals
    only when every task in `all_tasks` has samples, since they depend on all tasks jointly.
    """
    rng = np.random.default_rng(seed)
    q = [(1 - level) / 2, 1 - (1 - level) / 2]
    ref_means, cand_means, diffs = {}, {}, {}
    for task, (ref, cand) in pairs.items():
        idx = rng.integers(0, len(ref), size=(iterations, len(ref)))
        ref_means[task], cand_means[task] = ref[idx].mean(axis=1), cand[idx].mean(axis=1)
        low, high = np.quantile(cand_means[task] - ref_means[task], q)
        diffs[task] = Interval(float(low), float(high))
    if not all_tasks or any(task not in pairs for task in all_tasks):
        return BootstrapResult(iterations, diffs, None, None)
    ref = np.stack([ref_means[t] for t in all_tasks], axis=1)
    cand = np.stack([cand_means[t] for t in all_tasks], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        crit = np.where(ref > 0, np.clip(1 - cand / ref, 0, None), 0.0)  # (iterations, tasks)
    need = math.ceil(len(all_tasks) / 2)
    stars = np.sort(crit, axis=1)[:, need - 1]
    curves = {a: np.quantile((crit <= a).mean(axis=1), q) for a in alphas}
    return BootstrapResult(
        iterations,
        diffs,
        {a: Interval(float(lo), float(hi)) for a, (lo, hi) in curves.items()},
        Interval(*map(float, np.quantile(stars, q))),
    )
