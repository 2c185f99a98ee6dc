"""The image index at scale: what a start reads (one stat per folder or shard when cached), what it validates (only
what changed), the compact cache, and the work split over torchrun ranks with one cache writer per cache folder."""

import io
import json
import os
import sys
import tarfile
import time

import numpy as np
import pytest
from fastmae.train.data import index_build, index_cache
from fastmae.train.data.index import index_data
from fastmae.train.procs import finish, free_port, start
from PIL import Image

from ._util import noise_pngs
from .test_data import BROKEN, VALID, make_mixed_folder


@pytest.fixture
def mixed(tmp_path):
    return make_mixed_folder(tmp_path / "mixed")


def _age(*folders):
    """Set folders' times to a fixed moment in 2020, as for a data set written long before the run."""
    for folder in folders:
        os.utime(folder, (1.6e9, 1.6e9))


@pytest.fixture
def probes(monkeypatch):
    """Every file validated in this process, by name."""
    seen = []
    real = index_build.probe_file

    def counting(item):
        seen.append(os.fsdecode(item[0]).rsplit("/", 1)[-1])
        return real(item)

    monkeypatch.setattr(index_build, "probe_file", counting)
    return seen


def test_index_cache_is_used_and_revalidates_changed_files(mixed, probes):
    _age(mixed)
    first = index_data(mixed)
    assert first.stats["cache"] == "none" and len(probes) == VALID + len(BROKEN)
    probes.clear()
    second = index_data(mixed)
    assert probes == [] and second.stats["cache"] == "hit" and second.stats["listed"] == 0
    assert list(second.keys) == list(first.keys) and second.bad == first.bad
    # A new file changes its folder's listing (and time): the folder is listed again, only the new file validated.
    (mixed / "zz-new.jpg").write_bytes((mixed / "rgb.jpg").read_bytes())
    third = index_data(mixed)
    assert probes == ["zz-new.jpg"] and len(third) == VALID + 1 and third.stats["listed"] == 1
    # Rewritten in place (same name: the folder's listing and time stay): seen with check="stat", not by the listing.
    probes.clear()
    _age(mixed)
    index_data(mixed)
    (mixed / "garbage.jpg").write_bytes((mixed / "rgb.jpg").read_bytes() + b"\0")  # repaired in place
    _age(mixed)
    assert len(index_data(mixed)) == VALID + 1 and probes == []
    fourth = index_data(mixed, check="stat")
    assert probes == ["garbage.jpg"] and len(fourth) == VALID + 2 and len(fourth.bad) == len(BROKEN) - 1
    probes.clear()
    removed = mixed / "zz-new.jpg"
    removed.unlink()
    fifth = index_data(mixed)
    assert probes == [] and len(fifth) == VALID + 1 and str(removed) not in set(fifth.keys)


def test_index_of_a_class_tree_lists_only_changed_folders(tmp_path, probes):
    root = tmp_path / "tree"
    for c in range(3):
        noise_pngs(root / f"c{c}", 4, seed=c)
    (root / "c1" / "deep").mkdir()
    Image.new("RGB", (9, 7)).save(root / "c1" / "deep" / "x.png")
    (root / ".hidden").mkdir()
    Image.new("RGB", (9, 7)).save(root / ".hidden" / "y.png")
    _age(root, *root.rglob("*"))
    first = index_data(root)
    assert first.classes == ["c0", "c1", "c2"] and len(first) == 13 and len(probes) == 13
    assert first.labels.tolist() == [0] * 4 + [1] * 5 + [2] * 4
    assert [k.rsplit("tree/", 1)[1] for k in first.keys][3:6] == ["c0/3.png", "c1/0.png", "c1/1.png"]
    assert first.stats["folders"] == 5 and first.stats["listed"] == 5
    probes.clear()
    Image.new("RGB", (5, 5)).save(root / "c2" / "new.png")
    second = index_data(root)
    assert probes == ["new.png"] and second.stats["listed"] == 1 and len(second) == 14
    # Per-sample state is numpy arrays and one byte buffer: nothing that grows with N as Python objects.
    for name in ("unit_of", "offsets", "sizes", "labels", "widths", "heights", "routes"):
        assert isinstance(getattr(second, name), np.ndarray) and len(getattr(second, name)) == 14, name
    assert isinstance(second.names, index_cache.StringTable) and isinstance(second.names.blob, np.ndarray)
    assert second.names.blob.dtype == np.uint8 and len(second.units) == 5


def test_unreadable_cache_is_rebuilt_with_a_warning(mixed, probes, caplog):
    first = index_data(mixed)
    path = index_cache.cache_file(first.root)
    path.write_bytes(path.read_bytes()[:100])  # cut short
    probes.clear()
    again = index_data(mixed)
    assert "ignoring the unreadable image index cache" in caplog.text
    assert len(probes) == VALID + len(BROKEN) and list(again.keys) == list(first.keys)
    assert index_data(mixed).stats["cache"] in ("hit", "stale")



def _shard(path, names, seed):
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w") as tar:
        for k, name in enumerate(names):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (10 + k, 12, 3), dtype=np.uint8)).save(buf, format="PNG")
            for member, data in ((f"{name}.png", buf.getvalue()), (f"{name}.cls", str(k % 2).encode())):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_unchanged_shards_are_not_parsed_again(tmp_path, monkeypatch):
    folder = tmp_path / "shards"
    folder.mkdir()
    for s in range(3):
        _shard(folder / f"train-{s}.tar", [f"s{s}-{k}" for k in range(4)], s)
    _age(*folder.iterdir())
    parsed = []
    real = index_build.scan_shard
    monkeypatch.setattr(index_build, "scan_shard", lambda path: parsed.append(os.path.basename(path)) or real(path))
    first = index_data(folder, workers=1)  # in this process, where the counting stand-in is
    assert len(first) == 12 and sorted(parsed) == [b"train-0.tar", b"train-1.tar", b"train-2.tar"]
    assert first.labels.tolist() == [0, 1, 0, 1] * 3 and first.tar
    parsed.clear()
    second = index_data(folder, workers=1)
    assert parsed == [] and second.stats["cache"] == "hit" and list(second.keys) == list(first.keys)
    _shard(folder / "train-1.tar", ["s1-0", "s1-9"], 7)  # rewritten: new size and time
    third = index_data(folder, workers=1)
    assert parsed == [b"train-1.tar"] and len(third) == 10
    assert [k.rsplit("/", 1)[1] for k in third.keys][4:6] == ["s1-0.png", "s1-9.png"]
    assert Image.open(io.BytesIO(third.read(5))).size == (12, 11)


RANK_SCRIPT = """
import json, sys, torch
from fastmae.train.distributed import init_distributed
from fastmae.train.data.index import index_data
ctx, _ = init_distributed("ddp", torch.device("cpu"))
index = index_data(sys.argv[1], group=ctx)
keys = list(index.keys)
out = {"rank": ctx.rank, "n": len(index), "keys": keys, "labels": index.labels.tolist(), "bad": len(index.bad),
       **index.stats}
open(sys.argv[2] + f".{ctx.rank}.json", "w").write(json.dumps(out))
ctx.close()
"""


def _tree(root, classes=3, per_class=40):
    """A data set written a while ago: its folders' times 10 s in the past. A folder changed within a second of a
    scan is listed again at the next start (the index's guard against same-second changes), which would make the
    second start of these tests 'stale' whenever the first one began within a second of writing the tree (seen in
    CI on a fast machine)."""
    for c in range(classes):
        noise_pngs(root / f"c{c}", per_class, seed=c, size=(6, 7))
    (root / "c1" / "broken.png").write_bytes(b"not a png")
    past = time.time() - 10
    for folder in [root, *root.iterdir()]:
        os.utime(folder, (past, past))
    return root


def _ranks(script, data, out, envs, timeout=120):
    """Start one process per environment (the launcher's variables only) and wait for all, leaving none behind."""
    procs = [start([sys.executable, str(script), str(data), str(out)], env) for env in envs]
    for p in procs:
        code, log, hung = finish(p, timeout)
        assert code == 0 and not hung, log[-3000:]
    return [json.loads(open(f"{out}.{r}.json").read()) for r in range(len(envs))]


def _env(rank, world, port, cache, local_rank=None, local_world=1):
    return {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank if local_rank is None
            else local_rank), "LOCAL_WORLD_SIZE": str(local_world), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "FASTMAE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}  # fmt: skip


def test_ranks_split_the_validation_and_one_process_writes_a_shared_cache(tmp_path):
    data = _tree(tmp_path / "data")
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    cache = tmp_path / "cache"
    port = free_port()
    first = _ranks(script, data, tmp_path / "a", [_env(r, 2, port, cache, local_world=2) for r in range(2)])
    assert [r["validated"] for r in first] == [121, 121]  # 120 images + 1 broken file, found by both ranks
    assert sorted(r["validated_here"] for r in first) == [60, 61]  # each rank decoded its half
    assert first[0]["keys"] == first[1]["keys"] and first[0]["n"] == 120 and first[0]["bad"] == 1
    assert first[0]["labels"] == [0] * 40 + [1] * 40 + [2] * 40
    assert [r["wrote_cache"] for r in first] == [True, False] and len(list(cache.glob("index-*.bin"))) == 1
    port = free_port()
    again = _ranks(script, data, tmp_path / "b", [_env(r, 2, port, cache, local_world=2) for r in range(2)])
    assert [(r["cache"], r["validated"], r["wrote_cache"]) for r in again] == [("hit", 0, False)] * 2
    assert again[0]["keys"] == first[0]["keys"]


def test_ranks_without_a_shared_cache_folder_each_keep_one(tmp_path):
    """Two machines (LOCAL_RANK 0 on both) with their own cache folders: the work is still split, both caches are
    written, and the next start is cached on both."""
    data = _tree(tmp_path / "data")
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    caches = [tmp_path / "node0", tmp_path / "node1"]
    port = free_port()
    first = _ranks(script, data, tmp_path / "a", [_env(r, 2, port, caches[r], local_rank=0) for r in range(2)])
    assert sorted(r["validated_here"] for r in first) == [60, 61]
    assert [r["wrote_cache"] for r in first] == [True, True]
    assert all(len(list(c.glob("index-*.bin"))) == 1 for c in caches)
    port = free_port()
    again = _ranks(script, data, tmp_path / "b", [_env(r, 2, port, caches[r], local_rank=0) for r in range(2)])
    assert [(r["cache"], r["validated"]) for r in again] == [("hit", 0)] * 2
