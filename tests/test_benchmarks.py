"""The benchmark scripts run (tiny smoke shapes) and write valid results JSON; no timing is asserted."""

import importlib.util
import json
import shlex
from pathlib import Path

import pytest

from fastmae import FastMAEError
from fastmae.profiling import CATEGORIES, breakdown_table, categorize

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
    assert cases == {(d, c, m) for d in (2, 1) for c, m in (("eager", "visible"), ("compiled-reference", "visible"),
                                                            ("fastmae", "visible"), ("fastmae", "mask_token"))}
    keys = {"name", "model", "decoder_depth", "encoder_mode", "config", "variant", "batch_size", "dtype",
            "attn_backend", "kernels", "compile", "compile_mode", "graphs", "img_per_s", "tflops", "mfu",
            "peak_mem_gb"}  # fmt: skip
    for r in rows:
        assert keys <= set(r) and r["name"] == "pretrain_step" and r["img_per_s"] > 0 and r["tflops"] > 0
        assert r["attn_backend"] == ("math" if r["config"] == "eager" else "sdpa")  # what actually ran on CPU
        assert set(r["kernels"]) == {"masking", "unshuffle", "masked_mse"}
        assert r["variant"] == "plain" and r["graphs"] is False and r["compile"] is False  # no CUDA here
        assert set(r["kernels"].values()) == {"reference"} and r["embed"] == "full"
    assert {(s["decoder_depth"]) for s in data["speedups"]} == {1, 2}
    assert all(s["fastmae_vs_compiled_reference"] > 0 for s in data["speedups"])
    assert "wrote" in capsys.readouterr().out


def test_report_draws_the_chart_and_rewrites_only_the_table(tmp_path):
    from fastmae import bench

    rows = []
    for depth in (8, 1):
        for (config, mode), rate in zip(bench.CASES, (100.0, 200.0, 250.0, 80.0), strict=True):
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
    assert "| mae_vit_large_patch16 | 8 | fastmae | visible | plain | 128 | bf16 | sdpa | triton | yes | 2000.0 |" in (
        text)
    assert "| 2.50 | 1.25 | 3.12 |" in text  # same-run ratios: 250/100 vs eager, 250/200 compiled, 250/80 [M]
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
    assert "l8.json, b1.json" in done["table"] and done["table"].count("| 3.00 | n/a | 3.00 |") == 2
    other = bench.write_results([row("mae_vit_base_patch16", 8, *cases[0])], {**env, "gpu": "NVIDIA A100"},
                                tmp_path / "a100.json")  # fmt: skip
    with pytest.raises(FastMAEError, match="measured on NVIDIA A100, not NVIDIA H100"):
        bench.report([a, other])


def test_gpu_sitting_step_stage_is_ordered_by_value_within_one_call(tmp_path, capsys):
    """Issue 26's sitting: correctness of the new paths, the attention table, the ViT-L headline with every
    configuration, graphs and the breakdown, then ViT-B, the batch sweep, the optimizer, max-autotune; each with its
    own budget, all within one 8-minute call."""
    sitting = _load("gpu_sitting")
    assert sitting.main(["--stage", "step", "--dry-run", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.splitlines()
    budgets = [int(line.rsplit("(budget ", 1)[1].split(" s)")[0]) for line in printed]
    assert len(printed) == 8 and sum(budgets[:4]) <= sitting.BUDGETS["step"] <= 480
    assert "nvidia-smi" in printed[0] and "graph or sync or attention or step" in printed[1]
    assert "bench_attention.py" in printed[2] and "--write-table" in printed[2]
    headline = printed[3]
    assert "mae_vit_large_patch16 --decoder-depths 8" in headline and "--graphs --profile" in headline
    assert "--configs" not in headline  # all four: eager, compiled-reference, fastmae, mask-token
    assert "--batches 256,512" in printed[5] and "--optimizer-bench" in printed[6]
    assert "max-autotune-no-cudagraphs" in printed[7] and not list(tmp_path.iterdir())
    from fastmae.cli import build_parser

    for line in printed[3:]:  # every bench command parses
        argv = shlex.split(line.split("]", 1)[1].rsplit("  (budget", 1)[0])
        build_parser().parse_args(argv[argv.index("bench"):])


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
    assert table.count("| q.json | mae_vit_tiny_patch16 | 1 |") == 4 and "other rows: none" in table
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
    assert "first" in log and "(stopped at its budget)" in log and "never" not in log
    # A command's own budget stops it alone: the stage goes on with the next one.
    commands = [(2, [sys.executable, "-c", "import time; time.sleep(60)"]), [sys.executable, "-c", "print('next')"]]
    t0 = time.monotonic()
    assert sitting.run_stage("u", commands, tmp_path, dry_run=False, budget=30) == 0
    assert time.monotonic() - t0 < 20
    log = (tmp_path / "stage-u.log").read_text()
    assert "(stopped at its budget)" in log and "next" in log


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
            "compile_mode": "default", "img_per_s": rate, "tflops": 1.0, "mfu": rate / 10_000,
            "peak_mem_gb": batch / 10, "peak_mem_gb_per_image": 0.1}  # fmt: skip


def test_speedups_take_each_configuration_at_its_best_variant_and_find_the_knee(tmp_path):
    """visible vs mask-token with both at their best settings (here: graphs for one, plain for the other); a batch
    sweep beside the fixed batch gives the best batch and the knee (smallest batch within 5% of the best rate)."""
    from fastmae import bench

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
    from fastmae import bench

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
