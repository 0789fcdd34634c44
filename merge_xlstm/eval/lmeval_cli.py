"""`merge-xlstm lm-eval ARGS...`: lm-eval's own command line, with merge-xlstm's students known to it.

lm-eval's ``lm-eval`` entry point never imports this package, so it knows neither the
``xlstm_hybrid`` / ``distil_xlstm`` model types nor a model class for them. This module registers
:class:`StudentLM` with lm-eval's model registry (``--model xlstm``, the way lm-eval's own
``models/mamba_lm.py`` registers its wrapper), and importing it imports :mod:`merge_xlstm.student`,
so ``--model hf --model_args pretrained=experts/code`` works as well. ARGS reach lm-eval's parser
unchanged (it is given them; ``sys.argv`` is left alone). The packaged suites are reachable with
``--include_path`` and the folder ``merge-xlstm eval --list-suites`` prints.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lm_eval._cli import HarnessCLI
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.utils import setup_logging

import merge_xlstm.student  # noqa: F401  (registers the student model types with Auto*)


@register_model("xlstm", "merge_xlstm")
class StudentLM(HFLM):
    """lm-eval's ``hf`` model for a student directory: safetensors only, never remote code.

    The student classes are part of this package, so a student needs no ``trust_remote_code``;
    refusing it here keeps a model directory from running code of its own.
    """

    def __init__(self, **kwargs: object) -> None:
        if kwargs.get("trust_remote_code"):
            raise ValueError("merge-xlstm students never need trust_remote_code")
        super().__init__(**{**kwargs, "trust_remote_code": False})


class _Harness(HarnessCLI):
    """lm-eval's CLI parsing a given argument list instead of ``sys.argv``."""

    def parse_argv(self, argv: list[str]) -> argparse.Namespace:
        # lm-eval's own legacy rule (HarnessCLI.parse_args): arguments without a subcommand mean `run`.
        if len(argv) > 1 and argv[0] not in self._subparsers.choices:
            argv = ["run", *argv]
        elif argv == ["run"]:
            self._subparsers.choices["run"].print_help()
            raise SystemExit(0)
        return self._parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    setup_logging()
    harness = _Harness()
    try:
        harness.execute(harness.parse_argv(list(argv)))
    except SystemExit as exc:  # argparse's --help and usage errors, lm-eval's sys.exit(message)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return 0
