"""merge-xlstm: linearize transformer LLMs into xLSTM + SWA students, distil experts, merge them.

Importing the package registers the student model types with transformers' Auto classes.
"""

from merge_xlstm import student  # noqa: F401  (registers AutoConfig / AutoModelForCausalLM)

__version__ = "0.1.0"
