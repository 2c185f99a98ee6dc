"""The data tools' process pools: workers forked from a forkserver, so a caller's threads cannot hang them."""

import concurrent.futures
import multiprocessing
import threading

import numpy as np
import pytest
from fastmae.train.data.bandstats import band_statistics
from fastmae.train.data.pool import process_pool

from fastmae import FastMAEError
from tests import _util


def _with_lock_held_by_a_thread(run):
    held, release = threading.Event(), threading.Event()

    def hold():
        with _util.SHARED_LOCK:
            held.set()
            release.wait(60)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(10)
    try:
        return run()
    finally:
        release.set()
        t.join()


def test_pool_workers_do_not_inherit_what_a_thread_of_the_caller_holds():
    """A plain fork copies a lock that another thread holds, locked, into the child (whose wait never ends: it hung a
    CI run); the pool's workers start from the forkserver and find it free."""

    def forked():
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
            return pool.submit(_util.take_shared_lock).result(timeout=60)

    def pooled():
        with process_pool(2) as pool:
            return [f.result(timeout=120) for f in [pool.submit(_util.take_shared_lock) for _ in range(2)]]

    assert _with_lock_held_by_a_thread(forked) == "held"  # the hazard is real here
    assert _with_lock_held_by_a_thread(pooled) == ["free", "free"]


def test_a_pool_worker_that_dies_is_one_line(tmp_path):
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.npy")
        np.save(paths[-1], np.zeros((8, 8, 3), np.uint16))
    with pytest.raises(FastMAEError, match=r"^band statistics: a worker process died \(BrokenProcessPool"):
        band_statistics([str(p) for p in paths], read=_util.die, sample=None, workers=2)
