"""Prefect flows that run the DVC pipeline's stage instances; no stage logic of their own.

- :mod:`flows.dag`: the engine: DVC's resolved graph -> Prefect tasks, one
  ``dvc repro --single-item`` each, parallel up to a limit, retries, a summary artifact.
- :mod:`flows.study`: the ``study`` (grid) and ``cell`` flows; ``python -m flows.study``.
- :mod:`flows.serve`: the deployments (nightly study, on-demand cell); ``python -m flows.serve``.
- :mod:`flows.toy`: a tiny git + DVC project of the same shape, for tests and the smoke script.
"""
