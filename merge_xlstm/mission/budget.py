"""`run --dry-run`: the plan, each step's status and token budget, and the time it should take.

Time comes from the pipeline's ``throughput`` figures (tokens or documents per second per device): a
step's estimate is its tokens per stage over the stage's rate, and the wall time replays the
scheduler's own placement (in order, as many workers at once as the launcher allows on these GPUs)
with those estimates. Steps already done cost nothing; merges, search and report are counted as free.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from merge_xlstm.mission.launch import ALL_GPUS, Launcher
from merge_xlstm.mission.spec import Mission, Throughput
from merge_xlstm.mission.steps import Step

COLUMNS = (("stage1", "stage I"), ("targets", "targets"), ("stage2", "stage II"), ("eval_docs", "eval docs"))


def step_seconds(step: Step, rates: Throughput) -> float:
    """Estimated device seconds of one step from its budget and the pipeline's throughput figures."""
    per_second = {"stage1": rates.stage1, "targets": rates.targets, "online_targets": rates.targets,
                  "stage2": rates.stage2, "eval_docs": rates.eval_docs}
    return sum(count / per_second[name] for name, count in step.budget.items())


def statuses(steps: Sequence[Step]) -> dict[str, str]:
    """done / todo / waiting (for a dependency), computing a key only once its dependencies are done."""
    status: dict[str, str] = {}
    for step in steps:
        if any(status[d] != "done" for d in step.deps):
            status[step.name] = "waiting"
        else:
            status[step.name] = "done" if step.done(step.key()) else "todo"
    return status


def wall_seconds(steps: Sequence[Step], status: dict[str, str], launcher: Launcher, command: list[str] | None,
                 gpus: int, rates: Throughput) -> float:
    """Replay the scheduler: steps in order once their dependencies end, on free GPU slots."""
    slots = max(1, gpus)
    end: dict[str, float] = {}
    busy: list[tuple[float, int]] = []  # (time a worker ends, slots it holds)
    now, free = 0.0, slots
    for step in steps:
        ready = max([end[d] for d in step.deps], default=0.0)
        cost = 0.0 if status[step.name] == "done" else step_seconds(step, rates)
        placement = launcher(step.work, command)
        wanted = slots if placement.gpus == ALL_GPUS else min(placement.gpus, slots)
        now = max(now, ready)
        while free < wanted and busy:
            done_at, held = heapq.heappop(busy)
            now, free = max(now, done_at), free + held
        if wanted:
            heapq.heappush(busy, (now + cost, wanted))
            free -= wanted
            end[step.name] = now + cost
        else:
            now += cost
            end[step.name] = now
    return max([now, *end.values()])


def render_plan(mission: Mission, steps: Sequence[Step], launcher: Launcher, gpus: Sequence[str]) -> str:
    pipeline, rates = mission.pipeline, mission.pipeline.throughput
    status = statuses(steps)
    lines = [
        f"run {pipeline.name}: {len(mission.domains)} domains ({', '.join(mission.domains)}), {len(steps)} steps, "
        f"launcher {pipeline.launcher} on {len(gpus) or 'no'} GPU{'s' if len(gpus) != 1 else ''}",
        f"throughput per device: stage I {rates.stage1:,.0f} tok/s, targets {rates.targets:,.0f} tok/s, "
        f"stage II {rates.stage2:,.0f} tok/s, eval {rates.eval_docs:g} docs/s",
        "",
        f"  {'step':<28} {'status':<8}" + "".join(f"{title:>11}" for _, title in COLUMNS) + f"{'estimate':>11}",
    ]
    totals = dict.fromkeys((name for name, _ in COLUMNS), 0)
    device_seconds = 0.0
    for step in steps:
        cells = "".join(f"{_count(step.budget.get(name)):>11}" for name, _ in COLUMNS)
        seconds = step_seconds(step, rates)
        lines.append(f"  {step.name:<28} {status[step.name]:<8}{cells}{_duration(seconds if step.budget else None):>11}")
        if status[step.name] != "done":
            device_seconds += seconds
            for name, _ in COLUMNS:
                totals[name] += step.budget.get(name, 0)
    lines.append(f"  {'left to do':<37}" + "".join(f"{_count(totals[name]):>11}" for name, _ in COLUMNS)
                 + f"{_duration(device_seconds):>11}")
    wall = wall_seconds(steps, status, launcher, pipeline.launch_command, len(gpus), rates)
    lines += ["", f"estimated: {_duration(device_seconds)} of device time, {_duration(wall)} wall time here "
              f"(eval.limit {pipeline.eval.limit or 'none: eval time not estimated'})"]
    return "\n".join(lines)


def _count(value: int | None) -> str:
    if not value:
        return "-"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if value >= scale:
            return f"{value / scale:.1f}{suffix}"
    return str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
