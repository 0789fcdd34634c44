"""The run's evaluation steps: one model on one suite, results where `merge-xlstm eval` puts them.

``<eval.output>/<model>/<suite>/`` holds lm-eval's results and samples plus a stamp with the step's key
(the evaluated weights' digest, the suite and every eval setting), written in one atomic rename: a
killed evaluation leaves nothing, a stale one is replaced, a current one is skipped.
"""

from __future__ import annotations

import time
from pathlib import Path

from merge_xlstm.linearize.pipeline import fingerprint
from merge_xlstm.mission.spec import Mission
from merge_xlstm.mission.steps import STAMP, Step, has_key, memo, model_key, write_dir_with_stamp


def results_dir(mission: Mission, model: str, suite: str) -> Path:
    from merge_xlstm.eval.runner import output_name

    return Path(mission.pipeline.eval.output) / output_name(model) / suite


def eval_settings(mission: Mission, device: str | None) -> dict[str, object]:
    spec = mission.pipeline.eval
    return {"limit": spec.limit, "batch_size": spec.batch_size, "max_gen_toks": spec.max_gen_toks,
            "device": resolve_device(device)}


def resolve_device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def eval_step(mission: Mission, label: str, model: str, deps: tuple[str, ...], suite: str, device: str | None) -> Step:
    target = results_dir(mission, model, suite)
    key = memo(lambda: fingerprint({"model": model_key(model), "suite": suite, **eval_settings(mission, device)}))

    def run(key: str) -> None:
        from lm_eval.tasks import TaskManager

        from merge_xlstm.eval.runner import evaluate, model_dir, permit_code_execution, summary
        from merge_xlstm.eval.suites import SUITES_DIR, get_suite

        spec, chosen = mission.pipeline.eval, get_suite(suite)
        if chosen.executes_code:
            permit_code_execution(spec.allow_unsafe_code)
        path = model_dir(model, needs_chat_template=chosen.apply_chat_template)
        manager = TaskManager(include_path=str(SUITES_DIR), include_defaults=False)
        gen_kwargs = {"max_gen_toks": spec.max_gen_toks} if spec.max_gen_toks else None
        began = time.monotonic()

        def fill(tmp: Path) -> None:
            results = evaluate(model, path, chosen, manager, tmp, device=resolve_device(device),
                               batch_size=spec.batch_size, limit=spec.limit, gen_kwargs=gen_kwargs)
            print(summary(model, chosen, results, time.monotonic() - began))

        write_dir_with_stamp(target, key, fill)

    docs = (mission.pipeline.eval.limit or 0) * len(_tasks(suite))
    return Step(f"eval:{label}:{suite}", "device", deps, key, lambda key: has_key(target / STAMP, key), run,
                budget={"eval_docs": docs})


def _tasks(suite: str) -> tuple[object, ...]:
    from merge_xlstm.eval.suites import get_suite

    return get_suite(suite).tasks
