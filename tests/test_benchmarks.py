"""The benchmark scripts run (tiny smoke shapes) and write valid results JSON; no timing is asserted."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_loader_benchmark_writes_rows(tmp_path):
    out = tmp_path / "loader.json"
    _load("bench_loader").main(["--smoke", "--threads", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert {"torch", "dali", "git_sha", "device"} <= set(data["env"])
    rows = {r["loader"]: r for r in data["rows"]}
    assert set(rows) == {"torchvision", "dali"}
    for row in rows.values():
        assert row["name"] == "loader" and row["threads"] == 1 and row["img_per_s"] > 0
        assert row["device"] == "cpu" and row["img_size"] == 64
