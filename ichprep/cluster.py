"""Dask distributed clients: a LocalCluster sized to the machine, or an existing scheduler."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager

logger = logging.getLogger(__name__)

#: Fewer files than this convert in the calling process: a local cluster's start and stop cost more than
#: its parallel work saves there (see BENCHMARKS.md, "Start-up").
MIN_FILES_FOR_CLUSTER = 2000

#: The environment variable distributed's nannies export to every worker they spawn (65536 by default):
#: with it glibc stops adapting its mmap threshold, so every multi-MB slice buffer is mmapped and
#: page-faulted afresh.
MALLOC_TRIM_VAR = "MALLOC_TRIM_THRESHOLD_"
MALLOC_TRIM_KEY = f"distributed.nanny.pre-spawn-environ.{MALLOC_TRIM_VAR}"
#: None makes the nanny leave the variable unset, so glibc keeps its adaptive thresholds.  External
#: workers need the same in a dask config file (README, "Running on a cluster"); an environment
#: variable cannot say it (dask lower-cases the key).
UNSET_MALLOC_TRIM = {MALLOC_TRIM_KEY: None}

#: The dask config a local cluster runs under.  The dashboard is off, so its feeds only cost CPU: the
#: statistical profiler (stack samples in every worker) and the system monitor's default interval.
WORKER_CONFIG = {
    **UNSET_MALLOC_TRIM,
    "distributed.worker.profile.enabled": False,
    "distributed.admin.system-monitor.interval": "2s",
}


def default_workers() -> int:
    """One single-threaded worker process per usable core (decode and compression hold the GIL)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@contextmanager
def dask_client(workers: int | None = None, scheduler: str | None = None) -> Iterator[distributed.Client]:  # noqa: F821
    """Yield a connected client; a LocalCluster we started is closed on exit.

    ``scheduler`` (e.g. ``tcp://10.0.0.5:8786``) joins an existing cluster:
    ``dask scheduler`` + ``dask worker``, dask-jobqueue on SLURM, or Kubernetes.
    """
    import dask
    from distributed import Client, LocalCluster

    # distributed logs every worker start/stop at INFO; keep our output readable unless asked (-vv).
    if not logging.getLogger("ichprep").isEnabledFor(logging.DEBUG):
        logging.getLogger("distributed").setLevel(logging.WARNING)
    if scheduler and workers:
        raise ValueError("give either workers (a local cluster) or a scheduler address, not both")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if scheduler:
        logger.info("connecting to Dask scheduler %s", scheduler)
        with Client(scheduler, timeout="30s") as client:
            yield client
        return
    n = workers or default_workers()
    logger.info("starting a local Dask cluster with %d worker processes", n)
    # Threads per worker = 1: pydicom parsing and numpy on 512x512 slices hold the GIL
    # often enough that processes scale better than threads.
    with (
        dask.config.set(WORKER_CONFIG),
        LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


class OnDemand:
    """A Dask client started only once the work is known to pay for it (the command line's default).

    ``--scheduler`` or an explicit ``--workers`` always gets its cluster; otherwise fewer than
    ``min_files`` files run in this process (:func:`resolve_client`).  Use it as a context manager: a
    cluster it started is closed on exit.
    """

    def __init__(
        self, workers: int | None = None, scheduler: str | None = None, min_files: int = MIN_FILES_FOR_CLUSTER
    ):
        self.workers, self.scheduler, self.min_files = workers, scheduler, min_files
        self._stack = ExitStack()
        self._client = None
        self._said_in_process = False

    def __enter__(self) -> OnDemand:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._client = None

    def client(self, n_files: int):
        """The client for ``n_files`` files of work, or None to run them in this process."""
        if self._client is None and self.workers is None and self.scheduler is None and n_files < self.min_files:
            if not self._said_in_process:  # the scan and the conversion both ask
                logger.info(
                    "%d files: working in this process (a local cluster pays off from %d)", n_files, self.min_files
                )
                self._said_in_process = True
            return None
        if self._client is None:
            self._client = self._stack.enter_context(dask_client(self.workers, self.scheduler))
        return self._client


def resolve_client(client, n_files: int):
    """A Dask client or None from what a caller passed: a client, None, or an :class:`OnDemand`."""
    return client.client(n_files) if isinstance(client, OnDemand) else client


def map_tasks(
    client,
    fn: Callable,
    items: Sequence,
    *,
    progress: Callable[[int], None] | None = None,
    size: Callable[[object], int] = len,
    keys: list[str] | None = None,
    **kwargs,
) -> list:
    """``fn(item, **kwargs)`` for every item, results in item order: in this process when ``client`` is None,
    else as Dask tasks (3 retries, one ``map`` call) taken as they finish.  ``progress(size(result))`` follows
    each result."""
    results: list = [None] * len(items)
    if client is None:
        for i, item in enumerate(items):
            results[i] = fn(item, **kwargs)
            if progress:
                progress(size(results[i]))
        return results
    from distributed import as_completed

    futures = client.map(fn, items, key=keys, retries=3, pure=False, **kwargs)
    position = {future.key: i for i, future in enumerate(futures)}
    for future, result in as_completed(futures, with_results=True):
        results[position[future.key]] = result
        if progress:
            progress(size(result))
    return results
