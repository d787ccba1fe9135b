"""Ray Tune sweeps and ablation suites. They wrap the train stage (``pipelines.train``) and never re-implement it.

Nothing lives here yet: ``isa tune`` and ``isa ablate`` are the next stages to land.
"""
