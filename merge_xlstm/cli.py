"""The `merge-xlstm` command line.

Parsers live here so `--help` is fast and complete; each subcommand's work lives in its pipeline
stage's module and is imported only when the subcommand runs (torch and transformers take seconds to
import). User mistakes surface as one line on stderr and exit code 2 (see :mod:`merge_xlstm.errors`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from merge_xlstm.errors import UserError

# subcommand -> "module:function" taking the parsed argparse.Namespace
HANDLERS = {
    "linearize": "merge_xlstm.linearize.pipeline:main",
    "merge": "merge_xlstm.merge.run:main",
    "eval": "merge_xlstm.eval.runner:main",
    "compare": "merge_xlstm.eval.compare:main",
    "run": "merge_xlstm.mission.run:main",
}


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set stage2.tokens=50000 (repeatable; VALUE is YAML)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="merge-xlstm",
        description="Linearize a transformer teacher into xLSTM + sliding-window-attention students, "
        "distil domain experts, merge them, and score them against the teacher.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "linearize",
        help="convert the recipe's teacher into a student and distil it on the recipe's data",
        description="Build (or reuse) the shared stage-I seed for the recipe's teacher and student options, "
        "precompute the teacher's top-k targets, then run stage II into the recipe's output directory. "
        "Rerunning after a kill resumes from the last checkpoint; rerunning a finished recipe does nothing. "
        "A non-finite loss or gradient stops the run (exit 2) without writing a model; the last checkpoint stays.",
    )
    p.add_argument("recipe", help="linearize recipe (YAML), e.g. recipes/code.yaml")
    _add_set(p)
    p.add_argument("--tokens-scale", type=float, default=None, metavar="F",
                   help="multiply stage1.tokens and stage2.tokens by F (e.g. 0.001 for a CPU smoke run)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--seed-only", action="store_true",
                   help="build (or reuse) the shared stage-I seed and stop, e.g. before experts run in parallel")

    p = sub.add_parser(
        "merge",
        help="merge domain experts of one seed into one student (mergekit methods)",
        description="Merge the recipe's experts with a mergekit method (linear, task_arithmetic, ties, "
        "dare_ties, dare_linear, ...) after checking they share config, tokenizer and seed.",
    )
    p.add_argument("recipe", nargs="?", default="recipes/merge.yaml", help="merge recipe (default: %(default)s)")
    _add_set(p)

    p = sub.add_parser(
        "eval",
        help="run an offline lm-eval suite on teacher, experts and merged models with identical settings",
        description="Evaluate each MODEL (hub id or directory) on a packaged offline suite through lm-eval, "
        "saving lm-eval's results and per-sample logs per model under --output.",
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="model directories or hub ids")
    p.add_argument("--suite", required=True, help="suite name (see --list-suites)")
    p.add_argument("--output", default="results", help="results directory (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    p.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of the suite's tasks or measures, e.g. --metadata trials=20 "
                   "(repeatable; VALUE is YAML; --list-suites shows the measures' settings)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None)
    p.add_argument("--allow-unsafe-code", action="store_true",
                   help="run code tasks even where the sandbox cannot isolate them (not recommended)")
    from merge_xlstm.eval.suites import ListSuitesAction

    p.add_argument("--list-suites", action=ListSuitesAction, help="list the packaged suites and exit")

    p = sub.add_parser(
        "compare",
        help="tolerance-corrected win-and-tie rates (C_alpha, alpha*) of candidates against a reference",
        description="Compare CANDIDATE scores against REFERENCE (the teacher): per-task recovery, C_alpha, the "
        "critical tolerance alpha*, verdicts and, where per-sample logs exist, paired bootstrap intervals. "
        "Each argument is an lm-eval results file or directory, or a JSON/YAML mapping task -> score.",
    )
    p.add_argument("reference")
    p.add_argument("candidates", nargs="+", metavar="CANDIDATE")
    p.add_argument("--alpha", type=float, default=None, help="tolerance (default: a grid over [0, 0.4])")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="write the C_alpha curves to a PNG")

    p = sub.add_parser(
        "run",
        help="the whole mission: seed, experts, evaluations, merge-weight search, merges, compare and report",
        description="Run a pipeline (recipes/pipeline.yaml, or a directory holding one): the shared seed once, "
        "one expert per domain recipe (in parallel, one per GPU, when several GPUs are visible), the teacher's "
        "and every expert's evaluation on every suite, merge weights searched on the domains' validation rows, "
        "the merges, their evaluation, compare and a Markdown report. Every step's result is written atomically "
        "and skipped when present, so rerunning after a kill continues and rerunning a finished run does "
        "nothing. Ends with the merged model's alpha* and the report's path. Exit code 3: stopped by "
        "--stop-after with steps left.",
    )
    p.add_argument("pipeline", help="pipeline YAML, or a directory holding pipeline.yaml (e.g. recipes/)")
    _add_set(p)
    p.add_argument("--dry-run", action="store_true",
                   help="print the steps, their status, the token budget and the time estimate, and exit")
    p.add_argument("--stop-after", type=float, default=None, metavar="MINUTES",
                   help="start no new step after MINUTES (running ones finish); run again to continue")
    p.add_argument("--only", default=None, metavar="STEP",
                   help="run one step here (e.g. expert:math); what the run's own workers do")

    sub.add_parser(
        "lm-eval",
        help="lm-eval's own CLI with merge-xlstm's model classes registered (arguments passed unchanged)",
        add_help=False,
    )
    return parser


def _dispatch(target: str, args: argparse.Namespace) -> int:
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith(module_name.rsplit(".", 1)[0]):
            raise UserError(f"'{args.command}' is not implemented yet") from None
        raise
    return int(getattr(module, func_name)(args) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "lm-eval":
            from merge_xlstm.eval.lmeval_cli import main as lm_eval_main

            return int(lm_eval_main(argv[1:]) or 0)
        args = build_parser().parse_args(argv)
        return _dispatch(HANDLERS[args.command], args)
    except UserError as exc:
        print(f"merge-xlstm: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("merge-xlstm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
