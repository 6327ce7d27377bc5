"""Task merging: which adapter-merging operator keeps the most of each adapter, measured on a real model.

Seven short-answer tasks (six generated from a seed, one on MovieLens-1M titles), one LoRA per task on
SmolLM2-135M-Instruct, every registered ``adaptermerge`` operator, exact-match accuracy by teacher forcing.

* :mod:`taskmerge.tasks`    - task generators and disjoint splits (no torch)
* :mod:`taskmerge.config`   - the TOML run configuration
* :mod:`taskmerge.pipeline` - prepare -> train -> merge -> evaluate
* :mod:`taskmerge.report`   - report.md, results.json, heatmap.png
* :mod:`taskmerge.cli`      - ``adaptermerge taskmerge ...``
"""
