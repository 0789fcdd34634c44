"""`merge-xlstm run PIPELINE`: the whole mission, resumable, with a dry run and a time limit per call.

Steps run in order of their dependencies; independent train and device steps run side by side when the
launcher places them on separate GPUs. Each finished step's result is durable, so the same command
after a kill (or after ``--stop-after``) continues where the run stopped, and after a finished run it
does nothing. The last line of a finished run is the merged model's alpha* and the report's path.
Exit codes: 0 finished, 2 a user error, 3 stopped by ``--stop-after`` with steps left (run it again).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from merge_xlstm.errors import UserError
from merge_xlstm.mission.budget import render_plan
from merge_xlstm.mission.launch import ALL_GPUS, LAUNCHERS, Launcher, Placement, visible_gpus
from merge_xlstm.mission.plan import build_steps
from merge_xlstm.mission.report import final_line
from merge_xlstm.mission.spec import Mission, load_mission
from merge_xlstm.mission.steps import Step

STOPPED = 3
POLL_S = 1.0
LOG_TAIL = 25


def main(args: argparse.Namespace) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.only is None:
        raise UserError("run starts its own processes; for DDP/FSDP set `launcher: accelerate` and "
                        "`launch_command` in the pipeline and start run without accelerate launch")
    mission = load_mission(args.pipeline, args.overrides)
    steps = build_steps(mission, mission.pipeline.device)
    if args.only is not None:
        return run_only(steps, args.only)
    launcher = LAUNCHERS.get(mission.pipeline.launcher)
    gpus = visible_gpus()
    if args.dry_run:
        print(render_plan(mission, steps, launcher, gpus))
        return 0
    deadline = None if args.stop_after is None else time.monotonic() + 60 * args.stop_after
    left = Scheduler(mission, steps, launcher, gpus, deadline).run()
    if left:
        print(f"stopped (--stop-after {args.stop_after:g}) with {left} step(s) left; run the same command again "
              "to continue")
        return STOPPED
    print(final_line(mission))
    return 0


def run_only(steps: list[Step], name: str) -> int:
    """Run one step here (what a worker does); its dependencies must be done."""
    by_name = {s.name: s for s in steps}
    if name not in by_name:
        raise UserError(f"no step {name!r} (steps: {', '.join(by_name)})", where="--only")
    step = by_name[name]
    for dep in step.deps:
        if not by_name[dep].done(by_name[dep].key()):
            raise UserError(f"step {name} needs {dep} first", where="--only")
    key = step.key()
    if step.done(key):
        print(f"{name}: done already")
    else:
        step.run(key)
    return 0


@dataclass
class Worker:
    step: Step
    process: subprocess.Popen
    gpus: list[str]
    log: Path
    began: float


class Scheduler:
    """Start every step whose dependencies are done, in order, where the launcher places it."""

    def __init__(self, mission: Mission, steps: list[Step], launcher: Launcher, gpus: list[str],
                 deadline: float | None) -> None:
        self.mission, self.steps, self.launcher, self.gpus, self.deadline = mission, steps, launcher, gpus, deadline
        self.free = deque(gpus)
        self.finished: set[str] = set()
        self.workers: dict[str, Worker] = {}
        self.failed: str | None = None

    def run(self) -> int:
        """Run to the end, the deadline or the first failure; return how many steps are left."""
        pending = list(self.steps)
        try:
            while pending or self.workers:
                self._reap()
                if self.failed is None and not self._past_deadline():
                    for step in [s for s in pending if all(d in self.finished for d in s.deps)]:
                        if self._past_deadline():
                            break
                        started = self._start(step, len(self.steps) - len(pending) + 1)
                        if started:
                            pending.remove(step)
                        if started and step.name in self.finished:
                            break  # done here: steps it unblocks come first, in the steps' own order
                if not self.workers and (self.failed or self._past_deadline()
                                         or not any(all(d in self.finished for d in s.deps) for s in pending)):
                    break
                if self.workers:
                    time.sleep(POLL_S)
        finally:
            self._stop_workers()
        if self.failed is not None:
            raise UserError(f"step {self.failed} failed (see above)", where=self.mission.path)
        return len(pending)

    def _past_deadline(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def _start(self, step: Step, number: int) -> bool:
        """Skip `step` if done, run it here, or start its worker; False if its GPUs are busy."""
        placement: Placement = self.launcher(step.work, self.mission.pipeline.launch_command)
        wanted = len(self.gpus) if placement.gpus == ALL_GPUS else placement.gpus
        if wanted > len(self.gpus):
            raise UserError(f"launcher {self.mission.pipeline.launcher} places {step.name} on a GPU and none is "
                            "visible; use launcher inprocess (or auto)", where=f"{self.mission.path}: launcher")
        if wanted > len(self.free) or (placement.gpus == ALL_GPUS and self.workers):
            return False
        key = step.key()
        label = f"[{number}/{len(self.steps)}] {step.name}"
        if step.done(key):
            print(f"{label}: done")
            self.finished.add(step.name)
            return True
        if placement.gpus == 0:
            began = time.monotonic()
            print(f"{label}: running", flush=True)
            step.run(key)
            print(f"{label}: finished in {time.monotonic() - began:.0f} s", flush=True)
            self.finished.add(step.name)
            return True
        gpus = [self.free.popleft() for _ in range(wanted)]
        log = Path(self.mission.pipeline.state_dir) / "logs" / f"{step.name.replace(':', '-')}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        overrides = [a for pair in self.mission.overrides for a in ("--set", pair)]
        command = [*placement.prefix, "merge_xlstm", "run", self.mission.path, *overrides, "--only", step.name]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(gpus)}
        with log.open("w") as handle:
            process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
        print(f"{label}: started on GPU {','.join(gpus)} (log {log}): {shlex.join(command)}", flush=True)
        self.workers[step.name] = Worker(step, process, gpus, log, time.monotonic())
        return True

    def _reap(self) -> None:
        for name, worker in list(self.workers.items()):
            code = worker.process.poll()
            if code is None:
                continue
            del self.workers[name]
            self.free.extend(worker.gpus)
            seconds = time.monotonic() - worker.began
            if code == 0:
                print(f"{name}: finished in {seconds:.0f} s", flush=True)
                self.finished.add(name)
            else:
                tail = worker.log.read_text(errors="replace").splitlines()[-LOG_TAIL:]
                print("\n".join([f"{name}: worker exited with code {code} after {seconds:.0f} s; its log ends:",
                                 *tail]), flush=True)
                self.failed = self.failed or name

    def _stop_workers(self) -> None:
        """On the way out (an error or Ctrl-C here), workers are stopped; each resumes on the next run."""
        for worker in self.workers.values():
            worker.process.terminate()
        for worker in self.workers.values():
            try:
                worker.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.process.kill()
