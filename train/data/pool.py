"""Process pools for the data tools (index validation, band statistics, packing, synthetic data): their workers are
forked from a forkserver, a fresh process started once, never from the caller. A fork copies the caller's objects
and the state of its threads' locks, not the threads: in a CI run a forked worker's garbage collector finalised a DALI
pipeline that an earlier test had left in a reference cycle, its destructor waited for executor threads that do not
exist in the child, and the pool (and the run) hung for 90 minutes. The functions the workers run, and what they take,
must be importable and picklable.

The server imports the modules whose functions the workers run (``preload``) once, so each worker starts warm; it is
one per process, and what it preloads is fixed when it starts."""

from __future__ import annotations

import concurrent.futures
import multiprocessing

from fastmae.errors import FastMAEError

#: the modules whose functions run in the pools (imported once by the server, before any worker)
PRELOAD = ["fastmae.train.data.pack", "fastmae.train.data.bandstats", "fastmae.train.data.index_build",
           "fastmae.train.samples"]  # fmt: skip


def context() -> multiprocessing.context.BaseContext:
    """The forkserver context, its preload set before its server starts (it is ignored after)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def process_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    """``workers`` processes forked from the forkserver."""
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=context())


def lost_worker(what: str, err: BaseException) -> FastMAEError:
    """The one line for a pool whose worker died (killed, out of memory): what was being done and how it ended."""
    return FastMAEError(f"{what}: a worker process died ({type(err).__name__}: {err}); run it again, or with "
                        f"fewer workers if memory is short")  # fmt: skip
