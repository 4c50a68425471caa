"""The Ray Data labelling job (``jobs/label.py``), in four rooms, one per stage of a run:

- :mod:`~clipdiy.pipeline.sources`: where the images come from (listing, key ranges, manifests,
  the input's pre-flight check);
- :mod:`~clipdiy.pipeline.planning`: what tonight must do (the incremental rules, the pending
  rows, the run's manifest);
- :mod:`~clipdiy.pipeline.stages`: doing it (the Ray Data plan and its decode, inference,
  row-building and writer stages, actor placement, the attempt ledger);
- :mod:`~clipdiy.pipeline.control`: holding the run together (the run itself, the OUTPUT lock,
  progress, clean-up, human-correction runs).

:mod:`~clipdiy.pipeline.config` (the job's typed configuration) sits beside them; every room reads it.
"""
