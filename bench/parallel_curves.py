"""Compare the loss curves of one-GPU, DDP and FSDP runs of the same recipe (bench/parallel_curves.sh).

Usage: python bench/parallel_curves.py CURVES_DIR OUT_DIR, CURVES_DIR holding <mode>/code/metrics.jsonl
for the modes single, ddp and fsdp. Writes OUT_DIR/parallel_curves.json (per stage and mode: the losses,
the largest relative difference to the one-GPU curve, and the validation metrics) and a PNG.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from matplotlib.figure import Figure

MODES = ("single", "ddp", "fsdp")
STAGES = ("stage1", "stage2")


def main() -> None:
    curves_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    rows = {m: [json.loads(line) for line in (curves_dir / m / "code" / "metrics.jsonl").read_text().splitlines()]
            for m in MODES}
    losses = {m: {s: [r["loss"] for r in rows[m] if r["stage"] == s] for s in STAGES} for m in MODES}
    result = {"losses": losses, "max_relative_difference_to_single": {}, "validation": {}}
    for mode in MODES[1:]:
        result["max_relative_difference_to_single"][mode] = {
            s: max(abs(a - b) / abs(b) for a, b in zip(losses[mode][s], losses["single"][s])) for s in STAGES}
    for mode in MODES:
        meta = json.loads((curves_dir / mode / "code" / "merge_xlstm.json").read_text())
        result["validation"][mode] = meta["validation"]
    (out / "parallel_curves.json").write_text(json.dumps(result, indent=2))
    figure = Figure(figsize=(10, 3.6), layout="constrained")
    for axes, stage in zip(figure.subplots(1, 2), STAGES):
        for mode in MODES:
            axes.plot(range(1, len(losses[mode][stage]) + 1), losses[mode][stage], label=mode, marker=".")
        axes.set(title=stage, xlabel="step", ylabel="loss", yscale="log")
        axes.legend()
    figure.savefig(out / "parallel_curves.png", dpi=110)
    print(json.dumps(result["max_relative_difference_to_single"], indent=2))


if __name__ == "__main__":
    main()
