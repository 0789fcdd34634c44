"""`merge-xlstm merge`: experts of one stage-I seed merged into one student through mergekit.

run.py (entry point: checks, then an atomic output directory), checks.py (same student, same
tokenizer, same seed), methods.py (METHODS registry: recipe names -> mergekit methods), engine.py
(mergekit's planner and executor on the checkpoint's own tensor list), card.py (provenance record
and model card of the merged directory).
"""
