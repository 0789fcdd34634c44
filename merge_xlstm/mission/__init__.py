"""`merge-xlstm run PIPELINE`: teacher -> seed -> domain experts -> evaluations -> weight search -> merges -> report.

spec.py (the pipeline YAML schema and the domain recipes it names), steps.py (the run as a list of
resumable steps, each keyed by what its result depends on), launch.py (LAUNCHERS: in-process, one
worker per GPU, accelerate), budget.py (the dry-run plan: tokens and time per step), run.py (entry
point: plan, schedule, final line), report.py (the Markdown page, its figures and JSON).
"""
