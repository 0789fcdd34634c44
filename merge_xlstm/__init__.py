"""merge-xlstm: linearize transformer LLMs into xLSTM + SWA students, distil experts, merge them.

Importing the package is light (no torch, no transformers), so ``merge-xlstm --help`` answers at once.
The student model types register with transformers' Auto classes when :mod:`merge_xlstm.student` is
imported, which every module that loads a model directory does itself.
"""

__version__ = "0.1.0"
