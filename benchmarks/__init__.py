"""ichkit benchmark suite: ``python -m benchmarks [--quick] [--studies N] [--out FILE.json]``.

Every comparison runs side by side in one process run on the same data: conversion (decode floor, a
Kaggle-style PNG baseline, ``ichprep convert`` in-process and on 1 and 2 Dask workers), size on disk,
loaders (the store through ichtrain's ``ShardStream``, DICOMs on the fly, PNG per slice; warm and cold
page cache; then a real DataLoader with 2 workers) and the training step.  Every figure is the median of
repeated runs and every ratio is taken between figures of the same run.  Nothing here asserts a
timing: targets are reported as met or not, never enforced.

One module per job: ``measure`` (timing, page-cache eviction), ``dataset`` (synthetic or given DICOMs),
``convert_bench``, ``size_bench``, ``loader_bench``, ``train_bench``, ``profile_bench`` (cProfile and a
per-stage breakdown), ``report`` (machine info, targets, table, JSON) and ``suite`` (the one ``run``).
"""
