"""`merge-xlstm lm-eval ARGS...`: lm-eval's own command line, with the student model types registered.

lm-eval's ``lm-eval`` entry point never imports this package, so ``--model hf --model_args
pretrained=experts/code`` would not know the ``xlstm_hybrid`` / ``distil_xlstm`` model types. This runs
the very same CLI, with ARGS unchanged, in a process where ``merge_xlstm`` is imported (it is: this
module is part of it). The packaged suites are reachable with ``--include_path`` and the folder
``merge-xlstm eval --list-suites`` prints.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str]) -> int:
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]  # lm-eval's parser reads sys.argv itself
    try:
        cli_evaluate()
    except SystemExit as exc:  # argparse's --help and usage errors, lm-eval's sys.exit(message)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        sys.argv = saved
    return 0
