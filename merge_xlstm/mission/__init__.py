"""`merge-xlstm run PIPELINE`: teacher -> seed -> domain experts -> evaluations -> weight search -> merges -> report.

spec.py (the pipeline YAML schema and the domain recipes it names), steps.py (what a resumable step
is: keyed by what its result depends on), plan.py (the run's steps in order), evaluation.py and
weights.py (eval, search and merge steps), launch.py (LAUNCHERS: in-process, one
worker per GPU, accelerate), budget.py (the dry-run plan: tokens and time per step), run.py (entry
point: plan, schedule, final line), report.py (the Markdown page, its figures and JSON).
"""
