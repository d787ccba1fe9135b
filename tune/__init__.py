"""Ray Tune sweeps and ablation suites. They wrap the train stage (``pipelines.train.run``), never re-implement it.

- :mod:`tune.space`: the ``space:`` of a sweep file (``{grid|choice|uniform|loguniform|randint: ...}`` per dotted
  config key), checked through :mod:`isa.config` before anything starts; the metrics the train stage reports.
- :mod:`tune.sweep`: ``isa tune``: a ``ray.tune.Tuner`` whose trials each run one Ray Train run (Ray Train V2's
  ``TuneReportCallback``), ASHA on the validation metric, ``Tuner.restore`` for ``--resume``.
- :mod:`tune.tracking`: MLflow: one parent run per sweep, the trials' train runs nested under it, the best trial.
- :mod:`tune.suites` and ``tune/suites/*.yaml``: the ablation suites of docs/method.md §6.
- :mod:`tune.ablation`: ``isa ablate``: every row trained (as Tune trials), evaluated with ``isa eval``, costed,
  written as ``ablation_NAME.{md,csv,png}`` (:mod:`tune.plot`) and logged to MLflow.
- :mod:`tune.cleanup`: removes the worker placement groups that a stopped trial's Train controller leaves behind.
"""
