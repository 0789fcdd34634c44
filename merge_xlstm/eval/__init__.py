"""Scoring models: offline lm-eval suites, sandboxed code execution, and teacher-vs-student comparison.

- ``merge-xlstm eval`` (:mod:`.runner`): run a packaged suite (:mod:`.suites`) on several models with
  identical settings, keeping lm-eval's results and per-sample logs per model.
- ``merge-xlstm compare`` (:mod:`.compare`): C_alpha / alpha* of candidates against a reference
  (:mod:`.tolerance`, REFERENCE.md §4) from lm-eval results or plain score tables (:mod:`.scores`).
- ``merge-xlstm lm-eval`` (:mod:`.lmeval_cli`): lm-eval's own CLI with the student types registered.
- :mod:`.sandbox`: where model-written programs run.
"""
