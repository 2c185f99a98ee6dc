"""The benchmark scripts run (tiny smoke shapes) and write valid results JSON; no timing is asserted."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from fastmae import FastMAEError
from fastmae.profiling import CATEGORIES, breakdown_table, categorize

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
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
    assert rows["fastmae"]["decoder"] == "torchcodec" and rows["official"]["decoder"] == "pillow"
    table = _load("bench_loader").main(["--report", str(out)])["table"]
    assert "| fastmae | torchcodec | pretrain | uint8 |" in table
    assert "| official-finetune | pillow | finetune | float32 |" in table


def test_loader_benchmark_puts_the_decoders_side_by_side(tmp_path):
    """decode-<decoder> and fastmae-<decoder> rows on the same images in one run, a large JPEG among them."""
    out = tmp_path / "loader.json"
    loaders = "decode-torchcodec,decode-torchvision,decode-pillow,fastmae-pillow"
    _load("bench_loader").main(["--smoke", "--workers", "1", "--loaders", loaders, "--large-every", "8", "--out",
                                str(out)])  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [(r["loader"], r["decoder"]) for r in rows] == [
        ("decode-torchcodec", "torchcodec"), ("decode-torchvision", "torchvision"), ("decode-pillow", "pillow"),
        ("fastmae-pillow", "pillow")]  # fmt: skip
    assert all(r["img_per_s"] > 0 and "1 in 8 ~2000x1500" in r["data"] for r in rows)


def test_bands_benchmark_writes_rows_and_its_table(tmp_path):
    """13-band tiles: the plain pipeline and fastmae's raster path per format, stage rows, the docs table."""
    out = tmp_path / "bands.json"
    _load("bench_loader").main(["--bands", "--smoke", "--workers", "0", "--stages", "--out", str(out)])  # bench_bands
    rows = json.loads(out.read_text())["rows"]
    loaders = {r["loader"]: r for r in rows if r["name"] == "loader"}
    assert set(loaders) == {"plain-tiff", "fastmae-tiff", "plain-npy", "fastmae-npy", "fastmae-pack"}
    assert loaders["fastmae-npy"]["vs_plain"] == loaders["fastmae-npy"]["img_per_s"] / loaders["plain-npy"][
        "img_per_s"] and loaders["plain-npy"]["vs_plain"] is None  # fmt: skip
    assert loaders["fastmae-pack"]["vs_plain_npy"] > 0 and loaders["fastmae-tiff"]["output"].startswith("uint16")
    assert loaders["fastmae-tiff"]["bytes_per_image_out"] * 2 == loaders["plain-tiff"]["bytes_per_image_out"]
    stages = {r["stage"] for r in rows if r["name"] == "stage"}
    assert {"read tiff (tifffile, deflate)", "fastmae crop/resize/flip uint16 (C x H x W)",
            "torch matmul crop/resize/flip uint16 (C x H x W)",
            "fresh shared batch memory, uint16 (per image)"} <= stages
    table = _load("bench_bands").main(["--report", str(out)])["table"]
    assert "| fastmae-pack | pack (of the TIFFs) | uint16 (26,624) | 0 |" in table
    assert "fastmae's crops by compiled taps (" in table  # the resampler that ran, from the results' env
    assert "Where the time goes" in table
    # every fastmae row is the run's loader, over a folder or over the pack
    assert loaders["fastmae-npy"]["path"] == loaders["fastmae-tiff"]["path"] == (
        "fastmae's loader (TorchvisionLoader, the run's DataBands)")  # fmt: skip
    assert loaders["fastmae-pack"]["path"] == "fastmae's loader over the pack (index_data of the .pack file)"
    assert "How each row loads: plain-tiff / plain-npy: " in table


def test_finetune_benchmark_writes_rows(tmp_path, capsys):
    from fastmae.cli import main

    out = tmp_path / "r.json"
    assert _load("bench_finetune").main(["--smoke", "--out", str(out)])
    # fastmae bench measures the pretraining step; the other suites are scripts, and it says which
    assert main(["bench", "--quick", "--suite", "finetune", "--out", str(tmp_path / "no.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fastmae: error: --suite finetune: fastmae bench measures the pretraining step; run python "
                   "benchmarks/bench_finetune.py instead"] and not (tmp_path / "no.json").exists()  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1
    row = rows[0]
    assert row["name"] == "finetune" and row["model"] == "mae_vit_tiny_patch16" and row["batch"] == 4
    assert row["img_per_s"] > 0 and row["compile"] == "off" and row["speedup_vs_eager"] == 1.0


def test_fastmae_bench_quick_writes_the_results_json(tmp_path, capsys):
    from fastmae.cli import main

    out = tmp_path / "r.json"
    assert main(["bench", "--quick", "--suite", "pretrain", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"gpu", "cuda", "torch", "triton", "xformers", "dali", "git_sha", "date"} <= set(data["env"])
    checks = [r for r in data["rows"] if r["name"] == "equivalence"]
    assert [(r["decoder_depth"], r["ok"]) for r in checks] == [(2, True), (1, True)]  # checked before timed
    assert all(0 <= r["rel_loss_diff"] < 1e-4 for r in checks)
    rows = [r for r in data["rows"] if r["name"] != "equivalence"]
    cases = {(r["decoder_depth"], r["config"], r["encoder_mode"]) for r in rows}
    assert cases == {(d, c, m) for d in (2, 1) for c, m in (("eager", "visible"), ("compiled-reference", "visible"),
                                                            ("fastmae", "visible"), ("fastmae", "mask_token"))}
    keys = {"name", "model", "decoder_depth", "encoder_mode", "config", "variant", "batch_size", "dtype",
            "attn_backend", "kernels", "compile", "compile_mode", "graphs", "img_per_s", "tflops", "mfu",
            "mfu_measured_peak", "peak_tflops", "peak_mem_gb"}  # fmt: skip
    for r in rows:
        assert keys <= set(r) and r["name"] == "pretrain_step" and r["img_per_s"] > 0 and r["tflops"] > 0
        assert r["attn_backend"] == ("math" if r["config"] == "eager" else "sdpa")  # what actually ran on CPU
        assert set(r["kernels"]) == {"masking", "unshuffle", "masked_mse"}
        assert r["variant"] == "plain" and r["graphs"] is False and r["compile"] == "off"  # no CUDA here
        assert set(r["kernels"].values()) == {"reference"} and r["embed"] == "full"
    assert {(s["decoder_depth"]) for s in data["speedups"]} == {1, 2}
    assert all(s["fastmae_vs_compiled_reference"] > 0 for s in data["speedups"])
    assert "wrote" in capsys.readouterr().out


def test_report_draws_the_chart_and_rewrites_only_the_table(tmp_path):
    from fastmae.train import bench_report as bench

    rows = []
    for depth in (8, 1):
        for (config, mode), rate in zip(bench.CASES, (100.0, 200.0, 250.0, 80.0), strict=True):
            rows.append({"name": "pretrain_step", "model": "mae_vit_large_patch16", "decoder_depth": depth,
                         "encoder_mode": mode, "config": config, "batch_size": 128, "dtype": "bf16",
                         "attn_backend": "sdpa", "kernels": {"masking": "triton"}, "compile": config == "fastmae",
                         "img_per_s": rate * depth, "tflops": 494.7, "mfu": 0.9, "peak_mem_gb": 10.0,
                         "peak_mem_gb_per_image": 0.1 if config == "fastmae" else 0.2})  # fmt: skip
    env = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11", "triton": "3.5", "xformers": None, "date": "d",
           "git_sha": "abc"}  # fmt: skip
    path = bench.write_results(rows, env, tmp_path / "h100.json")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{bench.TABLE_START}\nstale\n{bench.TABLE_END}\noutro\n")
    done = bench.report(path, readme=readme)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "stale" not in text
    assert "| mae_vit_large_patch16 | 8 | fastmae | visible | plain | 128 | bf16 | sdpa | triton | full | 2000.0 |" in (
        text)  # an older file's compile: True is the variant it meant
    assert "| 2.50 | 1.25 | 3.12 |" in text  # same-run ratios: 250/100 vs eager, 250/200 compiled, 250/80 [M]
    # MFU from the row's TFLOP/s, whatever the file says: against the spec peak (989.4), then the measured one (790)
    assert "| 494.70 | 50.0% | 62.6% |" in text and "90.0%" not in text and "![pretrain step chart](h100.png)" in text
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
    rows = [r for r in json.loads(out.read_text())["rows"] if r["name"] == "pretrain_step"]
    assert len(rows) == 4
    for r in rows:
        prof = r["profile"]
        assert 3 <= len(prof) <= 10 and all({"kernel", "calls", "ms_per_step", "share"} <= set(p) for p in prof)
        assert all(p["ms_per_step"] > 0 and 0 < p["share"] <= 1 for p in prof)
        assert [p["share"] for p in prof] == sorted((p["share"] for p in prof), reverse=True)
    assert capsys.readouterr().out.count("where the time goes:") == len(rows)
    for r in rows:  # the breakdown by category of a CPU trace: ATen ops' self time, idle the rest of the step
        parts = r["breakdown"]
        assert set(parts["categories_ms"]) == set(CATEGORIES)
        assert sum(parts["categories_ms"].values()) == pytest.approx(parts["kernel_ms"])
        assert parts["categories_ms"]["gemm"] > 0 and parts["categories_ms"]["optimizer"] > 0
        assert parts["categories_ms"]["norm/elementwise"] > 0 and parts["idle_ms"] >= 0
        assert parts["step_ms"] == pytest.approx(r["step_ms"]) and parts["kernels_per_step"] > 10
        assert (parts["categories_ms"]["attention"] > 0) == (r["config"] != "eager")  # math attention: matmuls
    table = breakdown_table(rows, "p.json", {"gpu": "cpu"})
    assert table.count("| mae_vit_tiny_patch16 |") == len(rows) and "| idle | ops/step |" in table


def test_report_merges_the_files_of_one_sitting(tmp_path):
    from fastmae.train import bench_report as bench

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
    assert "l8.json, b1.json" in done["table"] and done["table"].count("| 3.00 | n/a | 3.00 |") == 2
    other = bench.write_results([row("mae_vit_base_patch16", 8, *cases[0])], {**env, "gpu": "NVIDIA A100"},
                                tmp_path / "a100.json")  # fmt: skip
    with pytest.raises(FastMAEError, match="measured on NVIDIA A100, not NVIDIA H100"):
        bench.report([a, other])


def _sitting_lines(printed: list[str]) -> list[tuple[str, str, float]]:
    """(stage, command name, budget) of each command line a dry run printed (adaptation lines left out)."""
    out = []
    for line in printed:
        if "(budget " not in line:
            continue
        stage, rest = line[len("[stage "):].split("] ", 1)
        out.append((stage, rest.split(":", 1)[0], float(line.rsplit("(budget ", 1)[1].split(" s)")[0])))
    return out


def test_gpu_sitting_stages_fit_their_budgets_and_one_call(tmp_path, capsys):
    """Every stage's commands add up to at most its budget; smoke and step fit the first device call (540 s less the
    30 s to stop and pack, and a minute of facts, installs and probes), in the order of their value; every command
    that needs a GPU says --device cuda; every bench command parses."""
    sitting = _load("gpu_sitting")
    plan = sitting.stages(tmp_path)
    for name, commands in plan.items():
        assert sum(c.budget for c in commands) <= sitting.BUDGETS[name], name
        for c in commands:
            if c.argv[0] != "nvidia-smi" and "pytest" not in c.argv and not {"gpu_smoke.py", "--stand-in"} & {
                    Path(a).name for a in c.argv} | set(c.argv):  # fmt: skip
                assert "--device" in c.argv and c.argv[c.argv.index("--device") + 1] == "cuda", (name, c.name)
    assert sitting.BUDGETS["smoke"] + sitting.BUDGETS["step"] <= 540 - 30 - 60
    assert sitting.PLAN == "smoke,step,codec,feed"
    assert sitting.main(["--stage", sitting.PLAN, "--dry-run", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.splitlines()
    names = [(stage, name) for stage, name, _ in _sitting_lines(printed)]
    assert names == [("smoke", "smoke"), ("step", "l8"), ("step", "b8"), ("step", "l8-full"), ("codec", "b8-xformers"),
                     ("codec", "attention"), ("codec", "decode"), ("feed", "e2e-feed"), ("feed", "loader")]  # fmt: skip
    l8, b8, full = (next(line for line in printed if f"] {n}: " in line) for n in ("l8", "b8", "l8-full"))
    for line in (l8, b8):  # the ratios and MFU, per block, plain and as one CUDA graph, fastmae's rows first
        assert "--configs fastmae,mask-token,compiled-reference,eager --compile regional --graphs" in line
    assert "--models mae_vit_large_patch16 --decoder-depths 8" in l8 and "--profile" in l8
    assert "--models mae_vit_base_patch16" in b8
    assert "--configs fastmae --compile full --graphs" in full and "mae_vit_large_patch16" in full
    assert "--attn-backend xformers" in next(line for line in printed if "] b8-xformers: " in line)
    feed = next(c for c in plan["feed"] if c.name == "e2e-feed").argv
    assert feed[feed.index("--loaders") + 1] == "gpu,synthetic" and "mae_vit_base_patch16" in feed
    assert int(feed[feed.index("--images") + 1]) % 256 == 0  # full batches only: no short batch to recompile for
    assert not list(tmp_path.iterdir())  # a dry run writes nothing
    from fastmae.cli import build_parser

    for commands in plan.values():
        for c in commands:
            if "fastmae.cli" in c.argv:
                build_parser().parse_args(c.argv[c.argv.index("fastmae.cli") + 1 :])


def _on_cpu(argv: list[str], out: Path, *extra: str, **flags: str) -> list[str]:
    """A sitting command's arguments for a tiny rehearsal here: --device cpu, --out ``out``, flags replaced."""
    args = ["cpu" if a == "cuda" else a for a in argv]
    args[args.index("--out") + 1] = str(out)
    for flag, value in flags.items():
        args[args.index(f"--{flag.replace('_', '-')}") + 1] = value
    return [*args, *extra]


def test_gpu_sitting_bands_stage_holds_the_multispectral_row_and_rehearses_on_cpu(tmp_path, capsys):
    """Issue 43's GPU half: the bands stage (outside the plan) times the ViT-B step at 13 bands beside 3 in one run,
    then the 13-band loader with the machine's 16 cores; its dry run lists both, and each command runs for real on
    this CPU at tiny shapes (the step with --quick, the loader with --smoke and one worker)."""
    sitting = _load("gpu_sitting")
    plan = sitting.stages(tmp_path / "run")
    assert [c.name for c in plan["bands"]] == ["b8-bands", "loader-bands"] and "bands" not in sitting.PLAN
    assert sitting.main(["--stage", "bands", "--dry-run", "--out", str(tmp_path / "run")]) == 0
    assert [n for _, n, _ in _sitting_lines(capsys.readouterr().out.splitlines())] == ["b8-bands", "loader-bands"]
    step, loader = (c.argv for c in plan["bands"])
    assert step[step.index("--in-chans") + 1] == "3,13" and "mae_vit_base_patch16" in step
    assert step[step.index("--configs") + 1] == "fastmae" and step[step.index("--compile") + 1] == "regional"
    workers = [int(w) for w in loader[loader.index("--workers") + 1].split(",")]
    images, batch = int(loader[loader.index("--images") + 1]), int(loader[loader.index("--batch") + 1])
    assert max(workers) == 16 and images >= 16 * 2 * batch  # every worker has its prefetched batches
    from fastmae.cli import main

    out = tmp_path / "b8-bands.json"
    bench = step[step.index("bench") :]
    del bench[bench.index("--attn-table") : bench.index("--attn-table") + 2]  # the sitting's measured table: none here
    assert main(_on_cpu(bench, out, "--quick")) == 0
    saved = json.loads(out.read_text())
    rows = [r for r in saved["rows"] if r["name"] == "pretrain_step"]
    assert [(r["in_chans"], r["input_dtype"], r["input_bytes_per_image"]) for r in rows] == [
        (3, "uint8", 3 * 32 * 32), (13, "uint16", 13 * 32 * 32 * 2)]  # fmt: skip
    assert all(r["img_per_s"] > 0 and not r.get("error") for r in rows)
    checks = [r for r in saved["rows"] if r["name"] == "equivalence"]
    assert [(r["in_chans"], r["ok"]) for r in checks] == [(3, True), (13, True)]
    assert [s["in_chans"] for s in saved["speedups"]] == [3, 13]
    from fastmae.train.bench_report import results_table

    assert "| mae_vit_tiny_patch16 (13 bands) | 8 | fastmae |" in results_table(saved, "b.json")
    out = tmp_path / "bands.json"
    _load("bench_bands").main(_on_cpu(loader[2:], out, "--smoke", workers="1"))
    rows = {r["loader"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"plain-tiff", "fastmae-tiff", "plain-npy", "fastmae-npy", "fastmae-pack"}
    assert all(r["workers"] == 1 and r["device"] == "cpu" and r["img_per_s"] > 0 for r in rows.values())
    assert main(["bench", "--in-chans", "3,0", "--quick", "--out", str(tmp_path / "no.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fastmae: error: --in-chans must be positive whole numbers separated by commas, got '3,0'"]


def test_gpu_sitting_runs_the_gpu_tests_where_pytest_has_no_xdist():
    """The GPU machines' image has pytest without pytest-xdist, and pyproject's addopts ask for its workers: the
    sitting's pytest command overrides them. Here xdist is blocked (``-p no:xdist``) to stand for its absence: the
    sitting's form collects the GPU tests; the plain form stops at its arguments, as it would there."""
    import subprocess

    sitting = _load("gpu_sitting")
    root = Path(__file__).resolve().parents[1]
    argv = [*sitting.PYTEST, "-p", "no:xdist", "-m", "gpu and not slow", "--collect-only", "tests/test_gpu.py"]
    done = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "tests/test_gpu.py::" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    plain = [sys.executable, "-m", "pytest", "-p", "no:xdist", "--collect-only", "tests/test_gpu.py"]
    done = subprocess.run(plain, cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 4 and "unrecognized arguments: -n" in done.stderr, done.stderr[-2000:]


def test_gpu_sitting_adapts_to_failed_smoke_checks_only(tmp_path, capsys):
    """A failed smoke check drops its lever; a check that timed out (slow) or was not run drops nothing."""
    sitting = _load("gpu_sitting")
    (tmp_path / "smoke.jsonl").write_text(
        json.dumps({"check": "graphs-full", "ok": False, "status": "fail", "error": "capture failed"}) + "\n"
        + json.dumps({"check": "gpu-loader", "ok": False, "error": "nvjpeg missing"}) + "\n"
        + json.dumps({"check": "graphs-regional", "ok": False, "status": "timed out", "error": "timed out after 80 s"})
        + "\n" + json.dumps({"check": "pretrain-loop", "ok": False, "error": "not run: the smoke stage's time is "
                                                                          "spent"}) + "\n")  # fmt: skip
    assert set(_load("gpu_smoke").failed_checks(tmp_path / "smoke.jsonl")) == {"graphs-full", "gpu-loader"}
    assert sitting.main(["--stage", "step,feed,feed2", "--dry-run", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.splitlines()
    full = next(line for line in printed if "] l8-full: " in line and "(budget" in line)
    regional = next(line for line in printed if "] l8: " in line and "(budget" in line)
    assert "--graphs" not in full and "--graphs" in regional  # the slow regional check drops nothing
    assert "] l8-full: smoke check graphs-full failed (capture failed): dropped --graphs" in "\n".join(printed)
    loader = next(line for line in printed if "] loader: " in line and "(budget" in line)
    assert "--loaders official,fastmae,decode " in loader
    assert "--loaders torchvision " in next(line for line in printed if "] e2e-b: " in line and "(budget" in line)


def test_gpu_sitting_runs_every_command_and_logs_each_exit(tmp_path):
    """A failing command does not end the stage: the next runs, and the log and sitting.jsonl hold every command with
    its exit; a command past its limit is stopped with its whole process group, a grandchild in a session of its own
    included; a command left no time is logged as not run, and a sitting's deadline stops a stage early."""
    import time

    sitting = _load("gpu_sitting")
    beat = tmp_path / "beat"
    (tmp_path / "beat.py").write_text(f"import time\nwhile True:\n    open({str(beat)!r}, 'a').write('x')\n"
                                      "    time.sleep(0.1)\n")  # fmt: skip
    grandchild = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, {str(tmp_path / 'beat.py')!r}], "
                  "start_new_session=True); time.sleep(60)")  # fmt: skip
    commands = [sitting.Cmd("fails", 5, [sys.executable, "-c", "import sys; print('failing'); sys.exit(3)"]),
                sitting.Cmd("sleeps", 2, [sys.executable, "-c", grandchild]),
                sitting.Cmd("missing", 2, ["no-such-command-anywhere"]),
                sitting.Cmd("runs", 5, [sys.executable, "-c", "print('ran')"])]  # fmt: skip
    t0 = time.monotonic()
    records = sitting.run_stage("t", commands, tmp_path, dry_run=False, budget=14, echo=False)
    assert time.monotonic() - t0 < 20
    assert [(r["command"], r["status"], r["exit"]) for r in records] == [("fails", "failed", 3), (
        "sleeps", "stopped", -15), ("missing", "failed", 127), ("runs", "done", 0)]  # fmt: skip
    size = beat.stat().st_size
    time.sleep(0.5)
    assert beat.stat().st_size == size  # the grandchild died with its command
    log = (tmp_path / "stage-t.log").read_text()
    assert "failing\n# exit 3 after" in log and "(stopped at its limit of" in log and "ran\n# exit 0" in log
    lines = [json.loads(x) for x in (tmp_path / "sitting.jsonl").read_text().splitlines()]
    assert [x["command"] for x in lines] == ["fails", "sleeps", "missing", "runs"]
    assert sitting.done_commands(tmp_path) == {("t", "fails"), ("t", "missing"), ("t", "runs")}  # ran to their end
    # The stage's time spent, then the sitting's: the commands left are logged as not run.
    records = sitting.run_stage("u", [sitting.Cmd("long", 1.5, [sys.executable, "-c", "import time; time.sleep(30)"]),
                                      sitting.Cmd("after", 1, [sys.executable, "-c", "print(1)"])], tmp_path,
                                dry_run=False, budget=2, echo=False)  # fmt: skip
    assert records[0]["stopped"] and records[1]["run"] is False and records[1]["status"] == "not run"
    assert "# not run: the stage's 2 s time is spent" in (tmp_path / "stage-u.log").read_text()
    records = sitting.run_stage("v", [sitting.Cmd("short", 1, [sys.executable, "-c", "print(1)"])], tmp_path,
                                dry_run=False, budget=100, echo=False, deadline=time.monotonic())  # fmt: skip
    assert records[0]["status"] == "not run" and "the sitting's time is spent" in (tmp_path / "stage-v.log").read_text()


def test_gpu_sitting_table_reads_rows_errors_smoke_and_exits(tmp_path, capsys):
    from fastmae.cli import main

    sitting = _load("gpu_sitting")
    assert main(["bench", "--quick", "--suite", "pretrain", "--decoder-depths", "1", "--configs", "eager,fastmae",
                 "--attn-backend", "flash", "--out", str(tmp_path / "q.json")]) == 0  # fmt: skip
    (tmp_path / "smoke.jsonl").write_text(json.dumps({"check": "cuda", "ok": False, "error": "no CUDA"}) + "\n"
                                          + json.dumps({"check": "graphs-full", "ok": False, "status": "timed out",
                                                        "error": "timed out after 80 s"}) + "\n")  # fmt: skip
    (tmp_path / "sitting.jsonl").write_text(json.dumps({"stage": "step", "command": "l8", "exit": 2, "run": True,
                                                        "stopped": False}) + "\n")  # fmt: skip
    step13 = {"name": "pretrain_step", "model": "mae_vit_base_patch16", "decoder_depth": 8, "in_chans": 13,
              "config": "fastmae", "encoder_mode": "visible", "compile": "regional", "variant": "plain",
              "img_per_s": 4000.0, "mfu": 0.3, "warmup_s": 30.0}  # fmt: skip
    loader = {"name": "loader", "loader": "fastmae-npy", "bands": 13, "workers": 16, "img_per_s": 900.0,
              "vs_plain": 3.0}  # fmt: skip
    (tmp_path / "bands.json").write_text(json.dumps({"env": {}, "rows": [step13, loader]}))
    capsys.readouterr()
    assert sitting.main(["--table", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| bands.json | mae_vit_base_patch16 (13 bands) | 8 | fastmae | visible | regional | plain | 4000.0 |" in (
        table)  # fmt: skip
    assert "band loaders: fastmae-npy (13 bands) 16 workers 900 img/s (3.00x plain)" in table
    assert "| q.json | mae_vit_tiny_patch16 | 1 | eager | visible | off | plain |" in table
    assert "| q.json | mae_vit_tiny_patch16 | 1 | fastmae | visible | off | plain | failed: " in table
    assert "other rows: equivalence 1, loader 1" in table and "step/l8 failed (exit 2)" in table
    assert "fail 1 (cuda); timed out 1 (graphs-full)" in table
    with pytest.raises(SystemExit):
        sitting.main(["--stage", "9", "--dry-run"])


def test_a_sitting_killed_mid_stage_keeps_every_finished_row_and_leaves_nothing_running(tmp_path):
    """The kill rehearsal: benchmarks/sitting.sh (the device call's one command) over the stand-in stage, its whole
    process group sent SIGTERM while the second command writes rows (as the device tool ends a call). $OUT holds the
    log and the tarball and nothing else; the tarball every row finished before the kill, every command's exit line
    (done, interrupted, not run); no process of the sitting is left, the second command's stray child in a session
    of its own included."""
    import os
    import signal
    import subprocess
    import tarfile
    import time

    sitting = _load("gpu_sitting")
    out, run, marker = tmp_path / "out", tmp_path / "run", f"rehearsal-{os.getpid()}-{time.time_ns()}"
    env = {**os.environ, "OUT": str(out), "RUN": str(run), "PY": sys.executable, "FASTMAE_SITTING": marker,
           "SITTING_SKIP": "install,facts,probes", "SITTING_MARGIN": "5"}  # fmt: skip
    proc = subprocess.Popen(["bash", str(BENCH / "sitting.sh"), "60", "rehearse"], cwd=BENCH.parent, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until the second command has written two rows
            try:
                if len(json.loads((run / "rows-b.json").read_text())["rows"]) >= 2:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        else:
            pytest.fail("the stand-in stage never reached its second command")
        os.killpg(proc.pid, signal.SIGTERM)
        console = proc.communicate(timeout=30)[0].decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, console
    assert sorted(p.name for p in out.iterdir()) == ["sitting.log", "sitting.tgz"]
    with tarfile.open(out / "sitting.tgz") as tar:
        files = {Path(m.name).name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}
    assert len(json.loads(files["rows-a.json"])["rows"]) == 3  # the first command's every row
    b_rows = json.loads(files["rows-b.json"])["rows"]
    assert 2 <= len(b_rows) < 30 and b_rows == json.loads((run / "rows-b.json").read_text())["rows"]
    assert "rows-c.json" not in files and not any(name.startswith(".") for name in files)
    statuses = [(r["command"], r["status"]) for r in map(json.loads, files["sitting.jsonl"].splitlines())]
    assert statuses == [("a", "done"), ("b", "interrupted"), ("c", "not run")]
    log = files["stage-rehearse.log"]
    assert "# exit 0 after" in log and "# stopped: the sitting got SIGTERM while this ran" in log
    assert "# not run: the sitting was stopped by SIGTERM" in log
    assert "sitting.sh: got SIGTERM: stopping" in console and "sitting.sh: exit 143 after" in console
    assert (out / "sitting.log").read_text().rstrip().endswith("$OUT holds: sitting.log sitting.tgz")
    time.sleep(0.5)
    assert sitting.marked(sitting.MARKER, marker) == []  # nothing of the sitting runs on


@pytest.mark.parametrize(
    ("name", "category"),
    [("_mse_fwd", "fastmae ops"), ("_masking_bwd", "fastmae ops"), ("fastmae::masked_mse", "fastmae ops"),
     ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "gemm"),
     ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_NNT", "gemm"), ("triton_tem_fused_addmm_3", "gemm"),
     ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>(...)", "gemm"),
     ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4, false> >(...)", "attention"),
     ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)", "attention"),
     ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0", "attention"),
     ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<...FusedAdamMathFunctor<float, 4>...>",
      "optimizer"),
     ("triton_per_fused_native_layer_norm_0", "norm/elementwise"), ("triton_poi_fused_gelu_1", "norm/elementwise"),
     ("void at::native::vectorized_elementwise_kernel<4, at::native::BinaryFunctor<float> >(...)",
      "norm/elementwise"),
     ("Memcpy HtoD (Pinned -> Device)", "copies"), ("Memset (Device)", "copies"), ("aten::addmm", "gemm"),
     ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"), ("aten::_fused_adamw_", "optimizer"),
     ("aten::native_layer_norm_backward", "norm/elementwise"), ("aten::convolution_backward", "gemm"),
     ("aten::unbind", "other")],
)  # fmt: skip
def test_kernel_names_fall_into_their_categories(name, category):
    assert categorize(name) == category


def _step_row(config, mode, rate, variant="plain", batch=128, sweep=False, oom=False):
    row = {"name": "pretrain_step", "model": "mae_vit_large_patch16", "decoder_depth": 8, "encoder_mode": mode,
           "config": config, "variant": variant, "batch_size": batch, "sweep": sweep}  # fmt: skip
    if oom:
        return {**row, "oom": True}
    return {**row, "dtype": "bf16", "attn_backend": "sdpa", "kernels": {"masking": "triton"}, "compile": True,
            "compile_mode": "default", "img_per_s": rate, "tflops": rate * 989.4 / 10_000, "mfu": rate / 10_000,
            "peak_mem_gb": batch / 10, "peak_mem_gb_per_image": 0.1}  # fmt: skip


def test_speedups_take_each_configuration_at_its_best_variant_and_find_the_knee(tmp_path):
    """visible vs mask-token with both at their best settings (here: graphs for one, plain for the other); a batch
    sweep beside the fixed batch gives the best batch and the knee (smallest batch within 5% of the best rate)."""
    from fastmae.train import bench_report as bench

    rows = [_step_row("eager", "visible", 1000), _step_row("compiled-reference", "visible", 2000),
            _step_row("fastmae", "visible", 2400), _step_row("fastmae", "visible", 3000, "graphs"),
            _step_row("fastmae", "mask_token", 1100), _step_row("fastmae", "mask_token", 1000, "graphs"),
            _step_row("fastmae", "visible", 2000, batch=64, sweep=True),
            _step_row("fastmae", "visible", 3100, batch=256, sweep=True),
            _step_row("fastmae", "visible", 0, batch=512, sweep=True, oom=True)]  # fmt: skip
    (s,) = bench.speedups(rows)
    assert s["visible_vs_mask_token"] == pytest.approx(3000 / 1100) and s["best_variant"] == "graphs"
    assert s["fastmae_vs_eager"] == pytest.approx(3.0) and s["fastmae_vs_compiled_reference"] == pytest.approx(1.5)
    assert (s["best_batch"], s["knee_batch"], s["oom_batches"]) == (256, 128, [512])
    env = {"gpu": "NVIDIA H200", "torch": "2.11", "triton": "3.6", "date": "d", "git_sha": "abc"}
    table = bench.results_table({"env": env, "rows": rows}, "x.json")
    assert "| fastmae | visible | graphs | 128 |" in table and "| 3.00 | 1.50 | 2.73 |" in table
    assert "64: 2000 img/s, 6.4 GB, 128: 3000 img/s, 12.8 GB, 256: 3100 img/s, 25.6 GB, 512: out of memory" in table
    assert "best batch 256 (3100 img/s, MFU 31.0%), knee 128" in table


def test_bench_flags_fail_in_one_line(capsys):
    from fastmae.cli import main

    for args, message in ((["--configs", "eager,fast"], "--configs: unknown fast"),
                          (["--batches", "64,x"], "--batches must be whole numbers"),
                          (["--attn-backend", "enc=flash"], "unknown call site 'enc'")):  # fmt: skip
        assert main(["bench", "--quick", "--suite", "pretrain", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_report_writes_the_breakdown_table_between_its_markers(tmp_path):
    from fastmae.train import bench_report as bench

    row = _step_row("fastmae", "visible", 2400)
    row["breakdown"] = {"categories_ms": dict.fromkeys(CATEGORIES, 1.0), "kernel_ms": 7.0, "idle_ms": 3.0,
                        "step_ms": 10.0, "kernels_per_step": 900.0}  # fmt: skip
    env = {"gpu": "NVIDIA H200", "torch": "2.11", "triton": "3.6", "date": "d", "git_sha": "abc"}
    path = bench.write_results([row], env, tmp_path / "b.json")
    readme = tmp_path / "README.md"
    readme.write_text(f"{bench.TABLE_START}\n{bench.TABLE_END}\n<!-- {bench.BREAKDOWN}:start -->\nold\n"
                      f"<!-- {bench.BREAKDOWN}:end -->\n")  # fmt: skip
    bench.report(path, readme=readme)
    text = readme.read_text()
    assert "old" not in text
    assert "| mae_vit_large_patch16 | 8 | fastmae | visible | plain | 128 | 10.00 | 1.00 |" in text
    assert "| 3.00 | 900 |" in text


@pytest.mark.filterwarnings("ignore:No artists with labels")
def test_tables_written_into_a_docs_page_link_their_charts_from_there(tmp_path):
    """The tables live in docs/*.md: a chart under benchmarks/results/ is linked as ../benchmarks/results/x.png."""
    from fastmae.train import bench_report as bench

    results, docs = tmp_path / "benchmarks" / "results", tmp_path / "docs"
    results.mkdir(parents=True)
    docs.mkdir()
    env = {"gpu": "NVIDIA H200", "torch": "2.11", "triton": "3.6", "date": "d", "git_sha": "abc"}
    path = bench.write_results([_step_row("fastmae", "visible", 2400)], env, results / "b.json")
    page = docs / "benchmarks.md"
    page.write_text(f"{bench.TABLE_START}\n{bench.TABLE_END}\n")
    bench.report(path, readme=page)
    assert "![pretrain step chart](../benchmarks/results/b.png)" in page.read_text()
    index = results / "index.json"
    index.write_text(json.dumps({"env": {"cpu": "x86_64", "torch": "2", "git_sha": "abc", "date": "d"}, "rows": []}))
    page = docs / "data.md"
    page.write_text("<!-- index-bench:start -->\n<!-- index-bench:end -->\n")
    _load("bench_index").report([index], page)
    assert "![index start against file count](../benchmarks/results/index.png)" in page.read_text()


def test_attention_benchmark_writes_rows_and_merges_the_table(tmp_path):
    """bench_attention --smoke on CPU: every backend either timed (checked against math first) or its reasons; the
    table gets one entry per shape with the fastest, and a second run replaces entries of the same key only."""
    mod = _load("bench_attention")
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"entries": [{"gpu": "other", "dtype": "bf16", "head_dim": 64, "tokens": 50,
                                              "batch_heads": 1, "ms": {"flash": 1.0}, "best": "flash"}]}))
    mod.main(["--smoke", "--reps", "1", "--out", str(tmp_path / "a.json"), "--write-table", str(table)])
    rows = json.loads((tmp_path / "a.json").read_text())["rows"]
    assert {r["backend"] for r in rows} == set(mod.CANDIDATES) and len(rows) == 2 * len(mod.CANDIDATES)
    for r in rows:
        if r["backend"] in ("sdpa", "math"):
            assert r["ms"] > 0 and r["rel_err"] < 1e-5
        else:
            assert r["ms"] is None and r["reasons"]
    entries = json.loads(table.read_text())["entries"]
    mine = [e for e in entries if e["gpu"] == "cpu"]
    assert len(entries) == 3 and len(mine) == 2
    assert all(set(e["ms"]) == {"sdpa", "math"} and e["best"] in ("sdpa", "math") for e in mine)
    assert all(e["ms"][e["best"]] <= 1.02 * min(e["ms"].values()) for e in mine)
    mod.main(["--smoke", "--reps", "1", "--out", str(tmp_path / "b.json"), "--write-table", str(table)])
    assert len(json.loads(table.read_text())["entries"]) == 3


def test_loader_benchmark_refuses_a_setting_that_starves_workers_and_runs_one_process_per_count(tmp_path):
    mod = _load("bench_loader")
    with pytest.raises(SystemExit, match="24 images at batch 4 are 6 batches an epoch, fewer than 8 workers x 2"):
        mod.main(["--smoke", "--workers", "8"])
    out = tmp_path / "l.json"
    mod.main(["--smoke", "--workers", "1,2", "--loaders", "official,fastmae", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["loader"], r["workers"]) for r in rows] == [("official", 1), ("fastmae", 1), ("official", 2),
                                                           ("fastmae", 2)]  # fmt: skip
    assert all(r["img_per_s"] > 0 for r in rows) and rows[2]["vs_official"] == 1.0


def test_jpegs_are_the_same_whatever_the_process_count(tmp_path):
    mod = _load("bench_loader")
    a, b = mod.make_jpegs(tmp_path / "a", 300, processes=1), mod.make_jpegs(tmp_path / "b", 300, processes=2)
    names = sorted(p.relative_to(a) for p in a.rglob("*.jpg"))
    assert len(names) == 300 and names == sorted(p.relative_to(b) for p in b.rglob("*.jpg"))
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names[::37])


def test_e2e_benchmark_runs_the_real_loop_against_the_bare_step(tmp_path):
    """--smoke on CPU: the bare step and a real fastmae pretrain child process, rates and their ratio in the row; a
    loader that cannot run here is a row with its one-line reason, not a crash."""
    out = tmp_path / "e.json"
    _load("bench_e2e").main(["--smoke", "--loaders", "torchvision,gpu", "--out", str(out)])
    rows = {r["loader"]: r for r in json.loads(out.read_text())["rows"]}
    tv, gpu = rows["torchvision"], rows["gpu"]
    assert tv["step_img_per_s"] > 0 and tv["loop_img_per_s"] > 0 and tv["loop_loader"] == "torchvision"
    assert tv["loop_vs_step"] == pytest.approx(tv["loop_img_per_s"] / tv["step_img_per_s"])
    assert len(tv["loop_rates"]) >= 1 and tv["loop_skipped_files"] == 0
    assert gpu["loop_img_per_s"] is None and "--loader gpu: it decodes on a CUDA device" in gpu["error"]


def test_compile_benchmark_runs_fresh_processes_and_states_the_targets(tmp_path):
    bench_compile = _load("bench_compile")
    out = tmp_path / "compile.json"
    bench_compile.main(["--models", "mae_vit_tiny_patch16", "--variants", "off", "--img-size", "32", "--steps", "2",
                        "--out", str(out)])  # fmt: skip
    (row,) = json.loads(out.read_text())["rows"][:1]
    assert row["variant"] == "off" and row["cache"] == "cold" and "error" not in row, row
    assert row["first_step_s"] > 0 and row["step_s"] > 0 and row["graphs"] == 0 and row["loss"] > 0
    # the ratios docs/benchmarks.md states, from rows as a full run writes them
    rows = [{"model": "m", "variant": v, "cache": c, "overhead_s": o} for v, c, o in
            (("full", "cold", 60.0), ("full", "warm", 6.0), ("regional", "cold", 15.0), ("regional", "warm", 3.0))]
    (s,) = bench_compile.summarise(rows)
    assert s == {"model": "m", "summary": True, "regional_over_full_cold": 0.25, "full_warm_over_cold": 0.1,
                 "regional_warm_over_cold": 0.2}  # fmt: skip
    failed = rows[:3] + [{"model": "m", "variant": "regional", "cache": "warm", "error": "KeyError: x"}]
    assert "regional_warm_over_cold" not in bench_compile.summarise(failed)[0]
    saved = {"env": {"cpu": "x86_64", "device": "cpu", "torch": "2.14", "git_sha": "abc", "date": "2026-12-02"},
             "rows": [dict(r, batch=2, step_s=1.0, first_step_s=r["overhead_s"] + 1, graphs=2, fxgraph_cache_hit=0,
                           fxgraph_cache_miss=4) for r in rows] + [s]}  # fmt: skip
    table = bench_compile.readme_table(saved, "compile.json")
    assert "| m | regional | cold | 16.0 | 1.00 | 15.0 | 2 | 0 / 4 |" in table
    assert "regional / full cold 0.25" in table and "regional warm / cold 0.20" in table


def test_gpu_smoke_runs_each_check_in_its_own_process_one_line_each(tmp_path):
    """Each check a line with its status; a check past its time is killed with its process group and is "timed
    out", which is slow, not failed. (The real loop's check, fastmae pretrain for 8 steps, runs in the CPU rehearsals:
    half a minute on 2 cores; its verdict is tested below.)"""
    smoke = _load("gpu_smoke")
    out = tmp_path / "smoke.jsonl"
    names = ["attn-sdpa-h32", "graphs-full", "cuda", "nan-guard"]
    smoke.run_all(names, out, "cpu", timeout=60, jobs=4, deadline=90)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    by = {r["check"]: r for r in lines}
    assert len(lines) == 4 and set(by) == set(names)
    assert by["attn-sdpa-h32"]["ok"] and by["attn-sdpa-h32"]["details"]["grad_rel_err"] < 1e-3  # checked vs float64
    assert by["nan-guard"]["ok"]  # the CPU form: the guard's skip and count, on the device counters
    assert by["graphs-full"]["error"] == "CUDA graphs need CUDA (device is cpu)" and by["cuda"]["status"] == "fail"
    assert set(smoke.failed_checks(out)) == {"graphs-full", "cuda"}
    # a check past its own time is killed with its process group: timed out (slow), not among the failed
    smoke.run_all(["fused-ops"], out, "cpu", timeout=1.5, jobs=1, deadline=10)
    last = json.loads(out.read_text().splitlines()[-1])
    assert last["check"] == "fused-ops" and last["status"] == "timed out" and not last["ok"]
    assert last["error"].startswith("timed out after 2 s")
    assert "fused-ops" not in smoke.failed_checks(out) and "fused-ops" in smoke.checks_by_status(out)["timed out"]
    assert not list(tmp_path.glob(".smoke.jsonl.*"))  # no per-check part files left behind


def test_the_real_loop_check_names_every_miss():
    smoke = _load("gpu_smoke")
    good = {"steps": 8, "loader": "gpu", "compile": "regional", "cuda_graphs": True, "skipped_files": 0,
            "nan_skipped": 0, "final_loss": 0.9}  # fmt: skip
    captured = ["INFO the training step is one CUDA graph from here on (captured after 3 ordinary steps)"]
    smoke.judge_loop(good, captured, cuda=True)
    with pytest.raises(smoke.CheckFailed) as err:
        smoke.judge_loop({**good, "steps": 5, "loader": "torchvision", "final_loss": float("nan")},
                         ["W torch._dynamo hit config.recompile_limit (8)"], cuda=True)  # fmt: skip
    assert str(err.value) == ("fastmae pretrain: steps 5 (expected 8); loader 'torchvision' (expected 'gpu'); final "
                              "loss nan; the step was never captured (no 'one CUDA graph from here on' in its log); "
                              "recompile limit hit: W torch._dynamo hit config.recompile_limit (8)")  # fmt: skip
    smoke.judge_loop({**good, "loader": "torchvision", "compile": "off", "cuda_graphs": False}, [], cuda=False)


def test_gpu_smoke_stopped_by_a_signal_writes_every_line_and_leaves_no_check_running(tmp_path):
    import os
    import signal
    import subprocess
    import time

    out = tmp_path / "smoke.jsonl"
    marker = f"smoke-{os.getpid()}-{time.time_ns()}"
    proc = subprocess.Popen([sys.executable, str(BENCH / "gpu_smoke.py"), "--device", "cpu", "--only",
                             "fused-ops,cuda,nan-guard", "--jobs", "2", "--out", str(out)],
                            env={**os.environ, "FASTMAE_SITTING": marker}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    sitting = _load("gpu_sitting")
    end = time.monotonic() + 60
    while len(sitting.marked("FASTMAE_SITTING", marker)) < 3 and time.monotonic() < end:  # the stage and 2 checks
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    console = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 128 + signal.SIGTERM, console
    by = {r["check"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(by) == {"fused-ops", "cuda", "nan-guard"}, console
    # a check that ended before the signal keeps its own line (a fast machine can end one in the race); every other
    # one says it was stopped, and the third one, which waited for a free job, was never started
    stopped = [r for r in by.values() if r["status"] == "not run"]
    assert stopped and all("stopped" in r["error"] for r in stopped), console
    assert all(r["status"] in ("pass", "fail") for r in by.values() if r["status"] != "not run"), console
    time.sleep(0.3)
    assert _load("gpu_sitting").marked("FASTMAE_SITTING", marker) == []


def test_gpu_smoke_xformers_and_torchcodec_checks_say_why_on_a_cpu(tmp_path, monkeypatch):
    """The issue-33 checks: xformers at the encoder's and the decoder's shape (with and without its C++ extension)
    and TorchCodec's CUDA batch decode; on a CPU each fails at once with its reason. A -noext check runs without the
    PYTHONPATH entry that holds libcudart.so.12."""
    smoke = _load("gpu_smoke")
    out = tmp_path / "smoke.jsonl"
    names = ["attn-xformers-h64", "attn-xformers-noext-h32", "torchcodec-cuda"]
    assert set(names) <= set(smoke.CHECKS)
    smoke.run_all(names, out, "cpu", timeout=60, jobs=3, deadline=90)
    by = {r["check"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert by["attn-xformers-h64"]["error"].startswith("xformers cannot run: xformers has no CPU operator")
    assert "C++ extension loaded in this process" in by["attn-xformers-noext-h32"]["error"] or "no CPU operator" in by[
        "attn-xformers-noext-h32"]["error"]  # fmt: skip
    assert by["torchcodec-cuda"]["error"] == "needs CUDA (device is cpu)"
    cu12 = tmp_path / "cu12"
    (cu12 / "nvidia" / "cuda_runtime" / "lib").mkdir(parents=True)
    (cu12 / "nvidia" / "cuda_runtime" / "lib" / "libcudart.so.12").write_bytes(b"")
    site = tmp_path / "site"  # the wheels without the CUDA 12 runtime
    monkeypatch.setenv("PYTHONPATH", f"{site}:{cu12}")
    assert smoke._env_for("attn-xformers-noext-h64")["PYTHONPATH"] == str(site)
    assert smoke._env_for("attn-xformers-h64")["PYTHONPATH"] == f"{site}:{cu12}"


def test_bench_results_are_whole_after_every_row_and_a_failing_configuration_is_a_row(tmp_path):
    import os
    import signal
    import subprocess
    import time

    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "fastmae.cli", "bench", "--quick", "--suite", "pretrain", "--decoder-depths", "1",
           "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and len(json.loads(out.read_text())["rows"]) >= 2:  # whole at every moment: it parses
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # mid-run, as the sitting stops a command at its budget
    finally:
        proc.kill()
        proc.wait(timeout=30)
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["name"] == "equivalence" and rows[0]["ok"]
    assert len(rows) >= 2 and rows[1]["name"] == "pretrain_step" and rows[1]["img_per_s"] > 0

    from fastmae.cli import main

    out = tmp_path / "flash.json"  # flash attention cannot run on a CPU: its rows say so, the others are measured
    assert main(["bench", "--quick", "--suite", "pretrain", "--decoder-depths", "1", "--attn-backend", "flash",
                 "--out", str(out)]) == 0  # fmt: skip
    rows = [r for r in json.loads(out.read_text())["rows"] if r["name"] == "pretrain_step"]
    failed = [r for r in rows if "error" in r]
    assert {r["config"] for r in failed} == {"fastmae"} and all("flash" in r["error"] for r in failed)
    assert {r["config"] for r in rows if "error" not in r} == {"eager", "compiled-reference"}


def test_a_row_measured_while_torch_compile_hit_its_recompile_limit_fails(tmp_path, monkeypatch):
    """A recompile-limit hit while a row runs (dynamo then runs the step's code uncompiled for new inputs) fails that
    row, with the numbers kept beside the error and out of the tables; rows record their warm-up seconds."""
    import fastmae.train.bench as bench_module

    from fastmae.cli import main

    hits: list[str] = []

    def hit_once_per_row():  # called before and after each row: every row sees one new hit
        if len(hits) % 2:
            hits.append("torch._dynamo hit config.recompile_limit (8) function: 'forward' (models.py:78)")
        hits.append(None)
        return [h for h in hits if h]

    monkeypatch.setattr(bench_module, "recompile_limit_hits", hit_once_per_row)
    out = tmp_path / "r.json"
    assert main(["bench", "--quick", "--suite", "pretrain", "--decoder-depths", "1", "--configs", "fastmae",
                 "--out", str(out)]) == 0  # fmt: skip
    saved = json.loads(out.read_text())
    rows = [r for r in saved["rows"] if r["name"] == "pretrain_step"]
    assert rows and all(r["error"].startswith("torch.compile hit its recompile limit during this row") for r in rows)
    assert all(r["recompile_limit_hits"] and r["img_per_s"] > 0 and r["warmup_s"] >= 0 for r in rows)
    assert saved["speedups"] == [] or all(s.get("fastmae_vs_eager") is None for s in saved["speedups"])


def test_e2e_table_puts_the_gpu_loader_beside_the_synthetic_loop():
    """--loaders gpu,synthetic: the GPU loader's loop as a fraction of the loop with no feed (what decoding and
    augmenting beside the step takes from it)."""
    e2e = _load("bench_e2e")
    row = {"name": "e2e", "model": "m", "batch_size": 256, "workers": 16, "step_img_per_s": 1000.0}
    saved = {"env": {"gpu": "NVIDIA H200", "torch": "2.11", "git_sha": "abc", "date": "2026-12-03"},
             "rows": [{**row, "loader": "gpu", "loop_img_per_s": 900.0, "loop_vs_step": 0.9},
                      {**row, "loader": "synthetic", "loop_img_per_s": 960.0, "loop_vs_step": 0.96}]}  # fmt: skip
    table = e2e.readme_table(saved, "e2e.json")
    assert "| m | 256 | gpu | 16 | 1000 | 900 | 0.900 | 0.938 |" in table
    assert "| m | 256 | synthetic | 16 | 1000 | 960 | 0.960 | 1.000 |" in table


def test_checkpoint_benchmark_sizes_are_exact_and_saves_are_timed(tmp_path):
    """The computed size is the file's (the few hundred bytes of pickle and zip headers aside); the table marks a
    model that was saved as measured and one that was not as derived from the other's write rate."""
    bench = _load("bench_checkpoint")
    out = tmp_path / "ckpt.json"
    bench.main(["--models", "mae_vit_mini_patch4,mae_vit_tiny_patch16", "--save", "mae_vit_mini_patch4",
                "--repeat", "2", "--dir", str(tmp_path), "--out", str(out)])  # fmt: skip
    mini, tiny = json.loads(out.read_text())["rows"]
    assert mini["model"] == "mae_vit_mini_patch4" and len(mini["save_s"]) == 2 and min(mini["save_s"]) > 0
    assert 0 <= mini["file_bytes"] - mini["computed_bytes"] < 200_000, mini
    assert "save_s" not in tiny and tiny["computed_bytes"] == 4 * tiny["params"] + 8 * tiny["trained_params"] + (
        4 * tiny["trained_tensors"])  # fp32 weights (frozen position tables too), AdamW's moments, step counters
    assert list(tmp_path.glob("fastmae-ckpt-*")) == []  # the saved files are gone
    table = bench.main(["--report", str(out)])["table"]
    assert "| mae_vit_mini_patch4 |" in table and "measured here |" in table
    assert "| mae_vit_tiny_patch16 |" in table and "derived: mae_vit_mini_patch4's write rate here |" in table


def test_gpu_plan_marks_each_number_and_the_page_is_current(tmp_path):
    """Measured rates are the results files' own; ViT-H's are derived; the docs table is what the script writes from
    the committed results (regenerated into a copy of the page and compared)."""
    plan = _load("gpu_plan")
    root = BENCH.parent
    page = (root / "docs" / "pretraining.md").read_text()
    copy = tmp_path / "pretraining.md"
    copy.write_text(page)
    text = plan.main(["--readme", str(copy)])
    assert copy.read_text() == page, "docs/pretraining.md's gpu-plan table is stale: run benchmarks/gpu_plan.py"
    rates = {r["model"]: r["img_per_s"] for f in plan.DEFAULT_RESULTS
             for r in json.loads((BENCH / "results" / f).read_text())["rows"]
             if r.get("config") == "fastmae" and r.get("encoder_mode") == "visible"}  # fmt: skip
    row = next(line for line in text.splitlines() if line.startswith("| step rate per H200"))
    cells = [c.strip() for c in row.split("|")[2:-1]]
    assert cells[:2] == [f"{rates['mae_vit_base_patch16']:.0f} (m)", f"{rates['mae_vit_large_patch16']:.0f} (m)"]
    assert cells[2].endswith("(d3)")
    for line in text.splitlines()[2:]:  # every number in the table says where it comes from
        if line.startswith("| ") and not line.startswith("| parameters"):
            cells = [c.strip() for c in line.split("|")[2:-1]]
            assert all("(m" in c or "(d" in c or c == "-" for c in cells) or "(d" in line.split("|")[1], line

def test_a_sitting_out_of_time_stops_its_command_keeps_its_rows_and_packs(tmp_path):
    """benchmarks/sitting.sh with a limit that ends inside the second stand-in command: the sitting's own deadline
    (the limit less the margin and 10 s) stops that command with its group and logs the third as not run, and the
    packed $OUT holds the rows written before; the call ends inside its limit."""
    import os
    import subprocess
    import tarfile
    import time

    sitting = _load("gpu_sitting")
    out, run, marker = tmp_path / "out", tmp_path / "run", f"rehearsal-{os.getpid()}-{time.time_ns()}"
    env = {**os.environ, "OUT": str(out), "RUN": str(run), "PY": sys.executable, "FASTMAE_SITTING": marker,
           "SITTING_SKIP": "install,facts,probes", "SITTING_MARGIN": "5"}  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(BENCH / "sitting.sh"), "22", "rehearse"], cwd=BENCH.parent, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)  # fmt: skip
    assert proc.returncode == 0 and time.monotonic() - t0 < 22, proc.stdout.decode()
    with tarfile.open(out / "sitting.tgz") as tar:
        files = {Path(m.name).name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}
    records = [json.loads(line) for line in files["sitting.jsonl"].splitlines()]
    assert [(r["command"], r["status"]) for r in records] == [("a", "done"), ("b", "stopped"), ("c", "not run")]
    assert 1 <= len(json.loads(files["rows-b.json"])["rows"]) < 30
    assert "# not run: the sitting's time is spent" in files["stage-rehearse.log"]
    assert sitting.marked(sitting.MARKER, marker) == []
