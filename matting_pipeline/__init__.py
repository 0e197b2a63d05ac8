"""What the stages share, and no stage logic.

- :mod:`~matting_pipeline.config`: the typed schema of params.yaml.
- :mod:`~matting_pipeline.layout`: every path of the data / models / metrics / eval /
  reports tree, defined once (stages, flows, report and tests use it; dvc.yaml is checked
  against it by ``tests/test_project.py``).
- :mod:`~matting_pipeline.shards`: the WebDataset shard format, its writer and readers
  (sequential and random access).
- :mod:`~matting_pipeline.imageio`: decoding of users' image files.
- :mod:`~matting_pipeline.atomic`: atomic writes and file digests.
- :mod:`~matting_pipeline.tracking`: MLflow conventions (store, cell parent runs).
- :mod:`~matting_pipeline.views`: training views from shards (dataset, sampler, loader).
- :mod:`~matting_pipeline.trainer`: the training loop (resume, steps, finish) and its MLflow run.
- :mod:`~matting_pipeline.jobs`: assembly of training jobs the stages share (matte-subset
  composites, the seg-pretrained start, the related methods' jobs and evaluation guidance).
- :mod:`~matting_pipeline.cli`: the ``matting`` command; :mod:`~matting_pipeline.tools`: the
  user commands that are not DVC stages (``predict``, ``export``).

Layering: ``flows`` -> ``stages`` -> ``matting_pipeline`` -> ``matting_core``; nothing
imports upward (``tests/test_project.py``).
"""
