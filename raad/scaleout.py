"""Scale-out on Ray: one task per category for `raad fit --ray`, Ray Data for `raad predict --ray`.

Nothing here schedules work itself: Ray places the tasks and actors on the cluster's nodes by the
resources each asks for, and Ray Data streams the chunks of images through a pool of actors.

* ``raad fit DATA --ray [ADDRESS]``: each category is one Ray task asking for ``--ray-cpus``
  CPUs (and ``--ray-gpus`` GPUs; one with ``--device cuda``); torch in a task uses as many
  threads as it has CPUs. A category that fails (broken data, an error while training) is
  reported with its error; the others finish and are written as usual.
* ``raad predict RUN INPUT --ray [ADDRESS]``: the chunks of images (``--batch`` each, the same
  chunks as a single-process run) go through ``Dataset.map_batches`` to ``--workers`` actors,
  each holding the detector once; every actor writes its chunks' overlays and records itself,
  the driver collects the records and writes predictions.csv. The scores are those of the
  single-process run, bit for bit, on machines of one kind.

ADDRESS: a Ray address ("auto", "ray://head:10001", "head:6379"); without one, the cluster in
RAY_ADDRESS if set, else a local Ray started for the command (and stopped after it). Data, runs
and the output folder must be at the same paths on every node (a shared file system, or object
storage mounted as one); see docs/production.md.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

INSTALL_HINT = ("--ray needs Ray, an optional dependency: pip install 'ray[data]==2.60.0' "
                "(or pip install 'raad-kernels[ray]')")


class RayMissing(ValueError):
    """--ray without Ray installed (a ValueError: the CLI prints it and exits with status 2)."""


class RayUnavailable(ValueError):
    """A Ray cluster that cannot be reached (or a local one that cannot start)."""


def _import_ray():
    try:
        import ray
    except ImportError:
        raise RayMissing(INSTALL_HINT) from None
    return ray


@contextmanager
def connected(address: str | None):
    """Ray, connected: to a running Ray already initialised in this process (tests, notebooks),
    to ``address``, or to a local Ray started here and shut down on exit."""
    ray = _import_ray()
    if ray.is_initialized():
        yield ray
        return
    kw = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
    try:
        # no address: RAY_ADDRESS if set, else a new local Ray ("local": always a new one)
        ray.init(**({"address": address} if address else {}), **kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = address or os.environ.get("RAY_ADDRESS") or "a new local Ray"
        raise RayUnavailable(f"--ray: cannot start or reach a Ray cluster at {where} ({e})") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _cpus(n) -> float:
    n = float(n)
    if n <= 0:
        raise ValueError(f"--ray-cpus must be > 0, got {n}")
    return n


# ------------------------------------------------------------------------------------------------
# raad fit --ray
# ------------------------------------------------------------------------------------------------

def _fit_task(category_dir: str, run_dir: str, cfg, opts, threads: int):
    import torch

    from .train import fit_category
    torch.set_num_threads(max(1, threads))
    return fit_category(category_dir, run_dir, cfg, opts, show=False)


def _error_text(e: BaseException) -> str:
    """The task's own exception (not Ray's wrapper with the remote traceback)."""
    cause = getattr(e, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}" if not isinstance(cause, ValueError) else str(cause)
    return f"{type(e).__name__}: {e}"


def fit_on_ray(data_dir, run_dir, cfg, opts, *, address: str | None = None, cpus: float = 1,
               gpus: float | None = None, show: bool = True, report=print) -> dict:
    """Fit every category of ``data_dir`` as its own Ray task. Returns {category: fit summary,
    or {"error": message}}; ``report`` is called with one line as each category ends."""
    from . import data as D
    cpus = _cpus(cpus)
    gpus = (1 if str(opts.device).startswith("cuda") else 0) if gpus is None else float(gpus)
    opts.check()
    dirs = D.category_dirs(data_dir)
    with connected(address) as ray:
        task = ray.remote(_fit_task)
        pending = {}
        for d in dirs:
            ref = task.options(num_cpus=cpus, num_gpus=gpus, max_retries=0,
                               name=f"raad fit {d.name}").remote(
                str(Path(d).resolve()), str((Path(run_dir) / d.name).resolve()), cfg, opts,
                max(1, int(cpus)))
            pending[ref] = d.name
        results = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            name = pending.pop(ready[0])
            try:
                results[name] = ray.get(ready[0])
                report(f"{name}: fitted in {results[name]['seconds']} s -> {Path(run_dir) / name}")
            except Exception as e:  # noqa: BLE001 - one category's failure is reported, others go on
                results[name] = {"error": _error_text(e)}
                report(f"{name}: FAILED: {results[name]['error']}")
    return {d.name: results[d.name] for d in dirs}


# ------------------------------------------------------------------------------------------------
# raad predict --ray
# ------------------------------------------------------------------------------------------------

class _ChunkScorer:
    """A Ray Data actor: one detector, many chunks (one chunk per row)."""

    def __init__(self, kwargs: dict):
        from .predict import Scorer
        self.scorer = Scorer(**kwargs)

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        out = [json.dumps(self.scorer.score_chunk(json.loads(spec))) for spec in batch["chunk"]]
        return {"records": np.array(out, dtype=object)}


def predict_chunks(chunks: list[list[dict]], kwargs: dict, *, address: str | None = None,
                   workers: int | None = None, cpus: float = 1, gpus: float | None = None,
                   show: bool = True):
    """Score ``chunks`` (lists of source dicts) on Ray; yields each chunk's records as it
    comes back (in no particular order)."""
    if not chunks:
        return
    cpus = _cpus(cpus)
    gpus = (1 if str(kwargs.get("device", "cpu")).startswith("cuda") else 0) if gpus is None else float(gpus)
    with connected(address) as ray:
        import ray.data as rd
        data_log = logging.getLogger("ray.data")
        level = data_log.level
        data_log.setLevel(logging.ERROR)   # its progress bars and notes: the caller shows one bar
        ctx = rd.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        if workers is None:
            have = ray.cluster_resources().get("GPU" if gpus else "CPU", 1)
            workers = max(1, int(have // (gpus or cpus)))
        if workers < 1:
            raise ValueError(f"--workers must be >= 1, got {workers}")
        workers = min(workers, len(chunks))
        ds = rd.from_items([{"chunk": json.dumps(c)} for c in chunks], override_num_blocks=len(chunks))
        # Ray restarts a lost actor (its default fault tolerance); it logs a note that such a
        # restart needs the actor's constructor arguments (ray-project/ray#53727): harmless here
        ds = ds.map_batches(_ChunkScorer, batch_size=1, fn_constructor_kwargs={"kwargs": kwargs},
                            compute=rd.ActorPoolStrategy(size=workers), num_cpus=cpus, num_gpus=gpus,
                            zero_copy_batch=False)
        try:
            for row in ds.iter_rows():
                yield json.loads(row["records"])
        finally:
            data_log.setLevel(level)
