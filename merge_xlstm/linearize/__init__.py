"""`merge-xlstm linearize`: data, stage I (alignment), teacher top-k targets, stage II (distillation)."""
