"""Process pools for the data tools (index validation, band statistics, packing, synthetic data): their workers are
forked from a forkserver, a fresh process started once, never from the caller. The caller may hold threads (torch's
pools, DALI's, a progress bar's, a test runner's) and a fork copies the locks those threads hold: a child that needs
one (malloc, the import lock, a logging handler) waits for ever, and with it the pool. That hung a whole CI run.

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
