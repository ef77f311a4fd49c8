"""`process_map`: a function over jobs in worker processes, or in this process when one is enough.

One place for how xmodal fans work out to processes (frame extraction, filming the generated
world): fork where the platform has it, as DataLoader workers do (unlike spawn, fork does not
re-import the caller's main module, so a script without a `__main__` guard still works), spawn
elsewhere; results in job order or as they finish.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator


def process_map(fn: Callable[[Any], Any], jobs: Iterable[Any], workers: int, *, ordered: bool = True,
                chunksize: int = 1) -> Iterator[Any]:
    """Yield `fn(job)` for every job, in job order (`ordered`) or as each finishes.

    `workers <= 1` or a single job runs in this process. With `ordered=False`, jobs not yet
    started are cancelled when the caller stops early (an error in one job ends the run).
    """
    jobs = list(jobs)
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield fn(job)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method)) as pool:
        if ordered:
            yield from pool.map(fn, jobs, chunksize=chunksize)
            return
        futures = [pool.submit(fn, job) for job in jobs]
        try:
            for future in as_completed(futures):
                yield future.result()
        finally:
            for future in futures:
                future.cancel()
