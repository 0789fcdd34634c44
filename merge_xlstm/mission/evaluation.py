"""The run's evaluation steps: one model on every suite, results where `merge-xlstm eval` puts them.

One step per model (a worker pays its start-up and the model's loading once, not once per suite).
Each suite's ``<eval.output>/<model>/<suite>/`` holds lm-eval's results and samples plus a stamp with
that suite's key (the evaluated weights' digest, the suite and every eval setting), written in one
atomic rename: a killed evaluation keeps the suites it finished, a stale suite is replaced, a current
one is skipped.
"""

from __future__ import annotations

import time
from pathlib import Path

from merge_xlstm.eval.suites import get_suite
from merge_xlstm.digests import fingerprint
from merge_xlstm.mission.spec import Mission
from merge_xlstm.mission.steps import STAMP, Step, has_key, memo, model_key, write_dir_with_stamp


def results_dir(mission: Mission, model: str, suite: str) -> Path:
    from merge_xlstm.eval.runner import output_name

    return Path(mission.pipeline.eval.output) / output_name(model) / suite


def resolve_device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def eval_step(mission: Mission, label: str, model: str, deps: tuple[str, ...], device: str | None) -> Step:
    spec = mission.pipeline.eval
    settings = {"limit": spec.limit, "batch_size": spec.batch_size, "max_gen_toks": spec.max_gen_toks,
                "device": resolve_device(device)}

    def suite_key(suite: str) -> str:
        return fingerprint({"model": model_key(model), "suite": suite, **settings})

    def suite_done(suite: str) -> bool:
        return has_key(results_dir(mission, model, suite) / STAMP, suite_key(suite))

    def run(key: str) -> None:
        for suite in spec.suites:
            if not suite_done(suite):
                _evaluate(mission, model, suite, suite_key(suite), settings["device"])

    key = memo(lambda: fingerprint([suite_key(suite) for suite in spec.suites]))
    docs = (spec.limit or 0) * sum(len(get_suite(s).tasks) for s in spec.suites)
    return Step(f"eval:{label}", "device", deps, key, lambda key: all(map(suite_done, spec.suites)), run,
                budget={"eval_docs": docs})


def _evaluate(mission: Mission, model: str, suite: str, key: str, device: str) -> None:
    from lm_eval.tasks import TaskManager

    from merge_xlstm.eval.runner import evaluate, model_dir, permit_code_execution, summary
    from merge_xlstm.eval.suites import SUITES_DIR

    spec, chosen = mission.pipeline.eval, get_suite(suite)
    if chosen.executes_code:
        permit_code_execution(spec.allow_unsafe_code)
    path = model_dir(model, needs_chat_template=chosen.apply_chat_template)
    manager = TaskManager(include_path=str(SUITES_DIR), include_defaults=False)
    gen_kwargs = {"max_gen_toks": spec.max_gen_toks} if spec.max_gen_toks else None
    began = time.monotonic()

    def fill(tmp: Path) -> None:
        results = evaluate(model, path, chosen, manager, tmp, device=device, batch_size=spec.batch_size,
                           limit=spec.limit, gen_kwargs=gen_kwargs)
        print(summary(model, chosen, results, time.monotonic() - began), flush=True)

    write_dir_with_stamp(results_dir(mission, model, suite), key, fill)

