"""The benchmark scripts run (tiny smoke shapes) and write valid results JSON; no timing is asserted."""

import importlib.util
import json
from pathlib import Path

import pytest

from fastmae import FastMAEError

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_loader_benchmark_writes_rows(tmp_path):
    out = tmp_path / "loader.json"
    _load("bench_loader").main(["--smoke", "--workers", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert {"torch", "dali", "git_sha", "device"} <= set(data["env"])
    rows = {r["loader"]: r for r in data["rows"]}
    assert set(rows) == {"official", "fastmae", "decode", "dali", "official-finetune", "fastmae-finetune"}
    for row in rows.values():
        assert row["name"] == "loader" and row["workers"] == 1 and row["img_per_s"] > 0
        assert row["device"] == "cpu" and row["img_size"] == 64 and row["img_per_s_per_worker"] == row["img_per_s"]
    assert rows["official"]["vs_official"] == rows["official-finetune"]["vs_official"] == 1.0
    assert rows["fastmae"]["output"] == "uint8" and rows["fastmae"]["normalize_on_device_ms_per_batch"] > 0
    table = _load("bench_loader").main(["--report", str(out)])["table"]
    assert "| fastmae | pretrain | uint8 |" in table and "| official-finetune | finetune | float32 |" in table


def test_finetune_benchmark_writes_rows(tmp_path):
    from fastmae.cli import main

    out = tmp_path / "r.json"
    assert main(["bench", "--quick", "--suite", "finetune", "--out", str(out)]) == 0  # via fastmae bench --suite
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1
    row = rows[0]
    assert row["name"] == "finetune" and row["model"] == "mae_vit_tiny_patch16" and row["batch"] == 4
    assert row["img_per_s"] > 0 and row["compile"] is False and row["speedup_vs_eager"] == 1.0


def test_fastmae_bench_quick_writes_the_results_json(tmp_path, capsys):
    from fastmae.cli import main

    out = tmp_path / "r.json"
    assert main(["bench", "--quick", "--suite", "pretrain", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"gpu", "cuda", "torch", "triton", "xformers", "dali", "git_sha", "date"} <= set(data["env"])
    rows = data["rows"]
    cases = {(r["decoder_depth"], r["config"], r["encoder_mode"]) for r in rows}
    assert cases == {(d, c, m) for d in (2, 1) for c, m in (("eager", "visible"), ("fastmae", "visible"),
                                                            ("fastmae", "mask_token"))}  # fmt: skip
    keys = {"name", "model", "decoder_depth", "encoder_mode", "config", "batch_size", "dtype", "attn_backend",
            "kernels", "compile", "img_per_s", "tflops", "mfu", "peak_mem_gb"}  # fmt: skip
    for r in rows:
        assert keys <= set(r) and r["name"] == "pretrain_step" and r["img_per_s"] > 0 and r["tflops"] > 0
        assert r["attn_backend"] == ("math" if r["config"] == "eager" else "sdpa")  # what actually ran on CPU
        assert set(r["kernels"]) == {"masking", "unshuffle", "masked_mse"}
    assert {(s["decoder_depth"]) for s in data["speedups"]} == {1, 2}
    assert "wrote" in capsys.readouterr().out


def test_report_draws_the_chart_and_rewrites_only_the_table(tmp_path):
    from fastmae import bench

    rows = []
    for depth in (8, 1):
        for (config, mode), rate in zip(bench.CASES, (100.0, 250.0, 80.0), strict=True):
            rows.append({"name": "pretrain_step", "model": "mae_vit_large_patch16", "decoder_depth": depth,
                         "encoder_mode": mode, "config": config, "batch_size": 128, "dtype": "bf16",
                         "attn_backend": "sdpa", "kernels": {"masking": "triton"}, "compile": config == "fastmae",
                         "img_per_s": rate * depth, "tflops": 1.0, "mfu": 0.5, "peak_mem_gb": 10.0,
                         "peak_mem_gb_per_image": 0.1 if config == "fastmae" else 0.2})  # fmt: skip
    env = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11", "triton": "3.5", "xformers": None, "date": "d",
           "git_sha": "abc"}  # fmt: skip
    path = bench.write_results(rows, env, tmp_path / "h100.json")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{bench.TABLE_START}\nstale\n{bench.TABLE_END}\noutro\n")
    done = bench.report(path, readme=readme)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "stale" not in text
    assert "| mae_vit_large_patch16 | 8 | fastmae | visible | 128 | bf16 | sdpa | triton | yes | 2000.0 |" in text
    assert "| 2.50 | 3.12 |" in text  # same-run ratios: 250/100 vs eager, 250/80 vs mask-token
    assert "50.0%" in text and "![pretrain step chart](h100.png)" in text
    from PIL import Image

    with Image.open(done["png"]) as im:
        assert im.size[0] > 300 and im.size[1] > 200
    readme.write_text("no markers")
    with pytest.raises(FastMAEError, match="no <!-- fastmae-bench:start -->"):
        bench.report(path, readme=readme)


def test_flops_formula_matches_torch_flop_counter():
    """The MFU numerator: our closed-form matmul FLOPs equal what torch's FlopCounterMode counts in a forward."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fastmae import create_model, flops_per_image

    for mode in ("visible", "mask_token"):
        model = create_model("mae_vit_tiny_patch16", img_size=64, attn_backend="math", encoder_mode=mode)
        imgs = torch.randn(2, 3, 64, 64)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(imgs, mask_ratio=0.75)
        expected = flops_per_image(model, 0.75)["total"] * 2
        assert counter.get_total_flops() == pytest.approx(expected, rel=1e-6), mode


def test_profile_writes_where_the_time_goes(tmp_path, capsys):
    """--profile on CPU (quick shapes): every row carries its top ops with calls, ms per step and share."""
    from fastmae.cli import main

    out = tmp_path / "p.json"
    assert main(["bench", "--quick", "--suite", "pretrain", "--decoder-depths", "1", "--profile", "--out",
                 str(out)]) == 0  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    for r in rows:
        prof = r["profile"]
        assert 3 <= len(prof) <= 10 and all({"kernel", "calls", "ms_per_step", "share"} <= set(p) for p in prof)
        assert all(p["ms_per_step"] > 0 and 0 < p["share"] <= 1 for p in prof)
        assert [p["share"] for p in prof] == sorted((p["share"] for p in prof), reverse=True)
    assert capsys.readouterr().out.count("where the time goes:") == len(rows)


def test_report_merges_the_files_of_one_sitting(tmp_path):
    from fastmae import bench

    def row(model, depth, config, mode, rate):
        return {"name": "pretrain_step", "model": model, "decoder_depth": depth, "encoder_mode": mode,
                "config": config, "batch_size": 64, "dtype": "bf16", "attn_backend": "sdpa",
                "kernels": {"masking": "triton"}, "compile": True, "img_per_s": rate, "tflops": 1.0, "mfu": 0.4,
                "peak_mem_gb": 5.0, "peak_mem_gb_per_image": 0.1}  # fmt: skip

    env = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11", "triton": "3.6", "date": "d", "git_sha": "abc"}
    cases = [("eager", "visible", 100.0), ("fastmae", "visible", 300.0), ("fastmae", "mask_token", 100.0)]
    a = bench.write_results([row("mae_vit_large_patch16", 8, *c) for c in cases], env, tmp_path / "l8.json")
    b = bench.write_results([row("mae_vit_base_patch16", 1, *c) for c in cases], env, tmp_path / "b1.json")
    done = bench.report([a, b], png=tmp_path / "all.png")
    assert "mae_vit_large_patch16 | 8" in done["table"] and "mae_vit_base_patch16 | 1" in done["table"]
    assert "l8.json, b1.json" in done["table"] and done["table"].count("| 3.00 | 3.00 |") == 2
    other = bench.write_results([row("mae_vit_base_patch16", 8, *cases[0])], {**env, "gpu": "NVIDIA A100"},
                                tmp_path / "a100.json")  # fmt: skip
    with pytest.raises(FastMAEError, match="measured on NVIDIA A100, not NVIDIA H100"):
        bench.report([a, other])


def test_gpu_sitting_stages_dry_run_and_table(tmp_path, capsys):
    sitting = _load("gpu_sitting")
    assert sitting.main(["--stage", "quick,2,3,4,5", "--dry-run", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split("]")[0] + "]" for line in printed] == ["[stage quick]"] * 5 + ["[stage 2]"] * 2 + [
        "[stage 3]"] * 2 + ["[stage 4]"] + ["[stage 5]"] * 2  # fmt: skip
    # The quick stage: correctness first, then the headline configurations, then the loader rows.
    assert "nvidia-smi" in printed[0] and "-m pytest -m 'gpu and not slow'" in printed[1]
    assert "mae_vit_large_patch16 --decoder-depths 8" in printed[2] and str(tmp_path / "l8.json") in printed[2]
    assert "mae_vit_base_patch16 --decoder-depths 8" in printed[3] and "bench_loader.py" in printed[4]
    assert not list(tmp_path.iterdir())  # a dry run writes nothing
    from fastmae.cli import main

    assert main(["bench", "--quick", "--suite", "pretrain", "--decoder-depths", "1", "--profile", "--out",
                 str(tmp_path / "q.json")]) == 0  # fmt: skip
    capsys.readouterr()
    assert sitting.main(["--table", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert table.count("| q.json | mae_vit_tiny_patch16 | 1 |") == 3 and "other rows: none" in table
    with pytest.raises(SystemExit):
        sitting.main(["--stage", "9", "--dry-run"])


def test_gpu_sitting_stops_a_stage_at_its_budget(tmp_path, capsys):
    """A stage's commands share its time budget: the one running when it is spent is stopped, later ones not run."""
    import sys
    import time

    sitting = _load("gpu_sitting")
    commands = [[sys.executable, "-c", "print('first')"], [sys.executable, "-c", "import time; time.sleep(60)"],
                [sys.executable, "-c", "print('never')"]]  # fmt: skip
    t0 = time.monotonic()
    assert sitting.run_stage("t", commands, tmp_path, dry_run=False, budget=3) == 0
    assert time.monotonic() - t0 < 20
    log = (tmp_path / "stage-t.log").read_text()
    assert "first" in log and "(stopped at the stage budget)" in log and "never" not in log
