"""The recipes' effective batch at any number of processes: fastmae.batching against the batch table's own numbers and
the docs' plan, the flags that set or derive the batch, --help per preset, and --print-config."""

import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from fastmae import FastMAEError
from fastmae.batching import TABLE, batch_table, choose_batch, resolve_batch
from fastmae.cli import main
from fastmae.config import FINETUNE_PRESETS, LINPROBE_PRESETS, preset

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = ("mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14")


def _fits(model: str, world: int, gib: float, command: str = "pretrain", ema: bool = False) -> int:
    """The largest batch per process the table's numbers allow, worked out here from the rule as the docs state it."""
    row = batch_table()["commands"][command]["models"][model]
    state = row["state_bytes"]["value"] + (row["ddp_bytes"]["value"] if world > 1 and "ddp_bytes" in row else 0)
    state += row["ema_bytes"]["value"] if ema else 0
    return int((0.9 * gib * 2**30 - state) / row["bytes_per_image"]["value"]) // 8 * 8


def _fewest_accum(model: str, world: int, gib: float, target: int = 4096, command: str = "pretrain") -> int:
    """The smallest accumulation that splits target / world evenly into batches that fit (a brute-force search)."""
    share, fits = target // world, _fits(model, world, gib, command)
    return next(a for a in range(1, share + 1) if share % a == 0 and share // a <= fits)


def test_the_batch_table_is_what_gpu_plan_writes(tmp_path):
    """fastmae/batch_table.json is generated from the GPU sittings' results (never typed), and every number in it says
    whether it was measured or how it was derived."""
    spec = importlib.util.spec_from_file_location("gpu_plan", ROOT / "benchmarks" / "gpu_plan.py")
    plan = importlib.util.module_from_spec(spec)
    sys.modules["gpu_plan"] = plan
    spec.loader.exec_module(plan)
    out = tmp_path / "batch_table.json"
    plan.main(["--table", str(out)])
    assert out.read_text() == TABLE.read_text(), "fastmae/batch_table.json is stale: run benchmarks/gpu_plan.py --table"
    table = json.loads(out.read_text())
    assert list(table["commands"]) == ["pretrain", "finetune", "linprobe"]
    for section in table["commands"].values():
        assert sorted(section["models"]) == sorted(OFFICIAL)
        for row in section["models"].values():
            for number in row.values():
                assert number["mark"] in ("measured", "derived") and number["from"] and number["value"] > 0
    pretrain = table["commands"]["pretrain"]["models"]
    base = pretrain["mae_vit_base_patch16"]["bytes_per_image"]
    assert base["file"] == f"benchmarks/results/{plan.DEFAULT_RESULTS[0]}" and base["date"] == "2026-11-30"
    assert "not measured" in pretrain["mae_vit_huge_patch14"]["bytes_per_image"]["from"]
    for command in ("finetune", "linprobe"):  # derived from pretraining's, and they say so
        assert "nothing here is measured" in table["commands"][command]["about"]
        for row in table["commands"][command]["models"].values():
            assert row["bytes_per_image"]["from"].endswith("not measured") and "file" not in row["bytes_per_image"]


# (depth, width, tokens at 224 px) and the pretraining decoder's (depth 8, width 512, every token), kept tokens: 25%
ARCH = {"mae_vit_base_patch16": (12, 768, 197), "mae_vit_large_patch16": (24, 1024, 197),
        "mae_vit_huge_patch14": (32, 1280, 257)}  # fmt: skip


@pytest.mark.parametrize("model", OFFICIAL)
def test_the_downstream_numbers_follow_the_stated_rule(model):
    """Finetuning's activations per image = pretraining's x (every block over every token) / (pretraining's encoder
    over the kept tokens + decoder); linear probing's = one block's share; worked out here from the architecture."""
    depth, width, tokens = ARCH[model]
    kept = (tokens - 1) // 4 + 1
    pretrain_sum = depth * kept * width + 8 * tokens * 512
    models = {c: batch_table()["commands"][c]["models"][model] for c in ("pretrain", "finetune", "linprobe")}
    per_image = models["pretrain"]["bytes_per_image"]["value"]
    assert models["finetune"]["bytes_per_image"]["value"] == pytest.approx(
        per_image * depth * tokens * width / pretrain_sum, abs=1)
    assert models["linprobe"]["bytes_per_image"]["value"] == pytest.approx(per_image * tokens * width / pretrain_sum,
                                                                             abs=1)  # fmt: skip
    # the fixed state: finetuning trains every parameter (16 B each, + 4 B DDP, + 4 B EMA); probing holds fp32 weights
    ft, lp = models["finetune"], models["linprobe"]
    assert ft["state_bytes"]["value"] == 4 * ft["ddp_bytes"]["value"] == 4 * ft["ema_bytes"]["value"]
    assert "ddp_bytes" not in lp and lp["state_bytes"]["value"] < ft["state_bytes"]["value"] / 4  # no head
    assert ft["state_bytes"]["value"] < models["pretrain"]["state_bytes"]["value"]  # no decoder


@pytest.mark.parametrize("model", OFFICIAL)
@pytest.mark.parametrize("world", [1, 8, 64])
@pytest.mark.parametrize("gib", [80, 140])
def test_the_recipe_batch_is_kept_with_the_largest_batch_that_fits(model, world, gib):
    batch, accum, reasons = resolve_batch(model, world, gib, None, None, 4096)
    assert batch * accum * world == 4096
    assert batch <= _fits(model, world, gib)
    assert accum == _fewest_accum(model, world, gib)
    assert reasons[0].startswith(f"batch {batch} x accum {accum} x {world} process")
    assert reasons[1].startswith(f"why: at most {_fits(model, world, gib)} images per process fit")


def test_the_expected_splits_and_the_docs_plan_agree():
    """The splits the issue expects, and the docs table's 'batch x accum-iter for 4096 on 8 H100' row (made by
    benchmarks/gpu_plan.py from the same numbers): 8 GPUs of 80 GB give ViT-H 256 x 2 and ViT-L 512 x 1."""
    assert resolve_batch("mae_vit_huge_patch14", 8, 80, None, None, 4096)[:2] == (256, 2)
    assert resolve_batch("mae_vit_large_patch16", 8, 80, None, None, 4096)[:2] == (512, 1)
    assert resolve_batch("mae_vit_large_patch16", 64, 80, None, None, 4096)[:2] == (64, 1)
    assert resolve_batch("mae_vit_base_patch16", 1, 80, None, None, 4096)[:2] == (1024, 4)  # 1576 fit: 4096 / 4
    page = (ROOT / "docs" / "pretraining.md").read_text().splitlines()
    for gpu, gib in (("H100", 80), ("H200", 143771 / 1024)):
        row = next(line for line in page if line.startswith(f"| batch x accum-iter for 4096 on 8 {gpu}"))
        want = [cell.strip() for cell in row.split("|")[2:-1]]
        got = ["{} x {}".format(*resolve_batch(m, 8, gib, None, None, 4096)[:2]) for m in OFFICIAL]
        assert got == want, gpu


def test_a_world_that_does_not_divide_the_recipe_batch_gets_the_closest_and_says_so():
    batch, accum, reasons = resolve_batch("mae_vit_base_patch16", 3, 80, None, None, 4096)
    assert (batch, accum) == (1365, 1)
    assert reasons[-1] == ("4096 is not a multiple of 3 processes: 1365 x 1 x 3 = 4095 is the closest effective batch "
                           "(-1; the lr follows it)")  # fmt: skip
    batch, accum, reasons = resolve_batch("mae_vit_huge_patch14", 3, 80, None, None, 4096)  # 488 fit: 3 steps
    assert (batch, accum) == (455, 3) and batch <= _fits("mae_vit_huge_patch14", 3, 80)
    assert "3 = 4095 is the closest" in reasons[-1]


def test_without_known_memory_the_share_is_the_batch_and_the_reason_says_so():
    batch, accum, reasons = resolve_batch("mae_vit_large_patch16", 8, None, None, None, 4096)
    assert (batch, accum) == (512, 1)
    assert reasons == ["batch 512 x accum 1 x 8 processes: recipe batch 4096 / 8 processes, no memory limit applied",
                       "why: no GPU memory known (the run is not on a GPU, and no --gpu-mem GIB)"]  # fmt: skip
    batch, accum, reasons = resolve_batch("mae_vit_tiny_patch16", 2, 80, None, None, 64)  # not in the table
    assert (batch, accum) == (32, 1) and "no memory numbers for mae_vit_tiny_patch16" in reasons[1]


def test_what_is_given_is_kept_and_the_rest_derived():
    # a batch alone: accumulation 1 (or the one given), no recipe batch
    assert resolve_batch("mae_vit_large_patch16", 8, 80, 64, None, None)[:2] == (64, 1)
    assert resolve_batch("mae_vit_large_patch16", 8, 80, 64, 3, None)[:2] == (64, 3)
    # a batch and a recipe batch: the accumulation; an accumulation and a recipe batch: the batch
    assert resolve_batch("mae_vit_large_patch16", 8, 80, 128, None, 4096)[:2] == (128, 4)
    assert resolve_batch("mae_vit_large_patch16", 8, 80, None, 8, 4096)[:2] == (64, 8)
    assert resolve_batch("mae_vit_large_patch16", 8, 80, 256, 2, 4096)[:2] == (256, 2)  # all three, agreeing
    # a batch given past what fits: kept, with a reason that says what will happen and what to do
    batch, accum, reasons = resolve_batch("mae_vit_huge_patch14", 8, 80, 512, None, 4096)
    assert (batch, accum) == (512, 1) and reasons[-1].startswith("batch 512 is more than the 488 that fit")
    assert reasons[-1].endswith("lower --batch-size and raise --accum-iter")


def test_a_batch_accum_and_recipe_batch_that_disagree_are_one_line():
    with pytest.raises(FastMAEError) as err:
        resolve_batch("mae_vit_large_patch16", 8, 80, 256, 4, 4096)
    assert str(err.value) == ("--batch-size 256 x --accum-iter 4 x 8 processes = 8192, not --recipe-batch 4096: drop "
                              "--batch-size or --accum-iter (it is then chosen to make 4096), or --recipe-batch")
    with pytest.raises(FastMAEError, match="no room for a batch of 8 per process in 12 GiB"):
        resolve_batch("mae_vit_huge_patch14", 8, 12, None, None, 4096)


@pytest.mark.parametrize("world, want", [(1, (4096, 1)), (8, (512, 1)), (64, (64, 1))])
def test_a_preset_keeps_4096_at_1_8_and_64_processes(world, want):
    """Config level, no GPU: the preset's recipe batch is split over the processes (no memory limit known)."""
    cfg = preset("mae_vit_large_patch16")
    reasons = choose_batch(cfg, world, None)
    assert (cfg.batch_size, cfg.accum_iter) == want and cfg.effective_batch(world) == 4096
    assert cfg.effective_lr(world) == pytest.approx(1.5e-4 * 4096 / 256)
    assert reasons[0].startswith(f"batch {want[0]} x accum 1 x {world} process")


DOWNSTREAM = {"finetune": (FINETUNE_PRESETS, 1024), "linprobe": (LINPROBE_PRESETS, 16384)}


@pytest.mark.parametrize("command", DOWNSTREAM)
@pytest.mark.parametrize("model", OFFICIAL)
@pytest.mark.parametrize("world", [1, 8, 64])
def test_the_downstream_presets_keep_their_recipe_batch_at_1_8_and_64_processes(command, model, world):
    """Finetuning's 1024 and linear probing's 16384 (FINETUNE.md, LINPROBE.md) are effective batches: without a known
    memory the share is the batch; on 80 GiB GPUs, the largest batch that fits the command's own numbers."""
    presets, target = DOWNSTREAM[command]
    cfg = presets[model].replace()
    assert (cfg.batch_size, cfg.accum_iter, cfg.recipe_batch) == (None, None, target)
    reasons = choose_batch(cfg, world, None, command)
    assert (cfg.batch_size, cfg.accum_iter) == (target // world, 1) and cfg.effective_batch(world) == target
    assert reasons[0] == (f"batch {target // world} x accum 1 x {world} process{'es' if world > 1 else ''}: recipe "
                          f"batch {target} / {world} process{'es' if world > 1 else ''}, no memory limit applied")
    cfg = presets[model].replace()
    reasons = choose_batch(cfg, world, 80, command)
    assert cfg.effective_batch(world) == target and cfg.batch_size <= _fits(model, world, 80, command)
    assert cfg.accum_iter == _fewest_accum(model, world, 80, target, command)
    assert reasons[1].startswith(f"why: at most {_fits(model, world, 80, command)} images per process fit")
    assert reasons[1].endswith("derived, not measured: fastmae/batch_table.json)")
    lr = cfg.effective_lr(world)  # the lr follows the effective batch, not the process count
    assert lr == pytest.approx((cfg.blr if command == "finetune" else cfg.blrs()[0]) * target / 256)


def test_the_downstream_splits_the_docs_name():
    """docs/downstream.md's examples, and what the derived numbers mean: one 80 GiB GPU finetunes ViT-L at 256 x 4
    and probes it at 8192 x 2, ViT-H at 128 x 8 and 4096 x 4; 8 GPUs need no accumulation."""
    want = {("finetune", "mae_vit_large_patch16", 1): (256, 4), ("finetune", "mae_vit_huge_patch14", 1): (128, 8),
            ("finetune", "mae_vit_base_patch16", 1): (1024, 1), ("linprobe", "mae_vit_large_patch16", 1): (8192, 2),
            ("linprobe", "mae_vit_huge_patch14", 1): (4096, 4), ("finetune", "mae_vit_huge_patch14", 8): (128, 1),
            ("linprobe", "mae_vit_huge_patch14", 8): (2048, 1)}  # fmt: skip
    page = " ".join((ROOT / "docs" / "downstream.md").read_text().split())
    for (command, model, world), split in want.items():
        assert resolve_batch(model, world, 80, None, None, DOWNSTREAM[command][1], command=command)[:2] == split
    assert "one 80 GB GPU finetunes ViT-L/16 at 256 x 4 (ViT-B/16 1024 x 1, ViT-H/14 128 x 8)" in page
    assert "one 80 GB GPU probes ViT-L/16 at 8192 x 2 (ViT-H/14 4096 x 4)" in page
    large = {c: batch_table()["commands"][c]["models"]["mae_vit_large_patch16"] for c in ("pretrain", "finetune")}
    ratio = large["finetune"]["bytes_per_image"]["value"] / large["pretrain"]["bytes_per_image"]["value"]
    assert f"no decoder: {ratio:.1f}x ViT-L/16's pretraining" in page
    # the EMA's copy of the weights is counted: ViT-H/14 loses room for a few images
    assert _fits("mae_vit_huge_patch14", 1, 80, "finetune", ema=True) < _fits("mae_vit_huge_patch14", 1, 80, "finetune")
    got = resolve_batch("mae_vit_huge_patch14", 1, 80, None, None, 1024, command="finetune", ema=True)
    assert got[:2] == (128, 8) and "weights, gradients, AdamW and the EMA" in got[2][1]


def _print_config(capsys, *args, command="pretrain") -> dict:
    assert main([command, *args, "--print-config"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("command", DOWNSTREAM)
def test_print_config_for_finetune_and_linprobe(capsys, command):
    target = DOWNSTREAM[command][1]
    cfg = _print_config(capsys, "--preset", "mae_vit_large_patch16", "--world-size", "8", command=command)
    assert (cfg["batch_size"], cfg["accum_iter"], cfg["effective_batch"]) == (target // 8, 1, target)
    assert cfg["command"] == command and cfg["recipe_batch"] == target and "--gpu-mem GIB" in cfg["batch_choice"][1]
    cfg = _print_config(capsys, "--preset", "mae_vit_large_patch16", "--gpu-mem", "80", command=command)
    assert (cfg["batch_size"], cfg["accum_iter"], cfg["world_size"]) == ((256, 4) if command == "finetune" else
                                                                        (8192, 2)) + (1,)  # fmt: skip
    cfg = _print_config(capsys, "--preset", "mae_vit_large_patch16", "--world-size", "8", "--batch-size", "32",
                        command=command)  # a batch alone keeps its meaning: per process, no recipe batch
    assert (cfg["batch_size"], cfg["accum_iter"], cfg["recipe_batch"], cfg["effective_batch"]) == (32, 1, None, 256)
    cfg = _print_config(capsys, "--world-size", "8", command=command)  # demo keeps its own batch per process
    assert cfg["recipe_batch"] is None and cfg["accum_iter"] == 1 and cfg["effective_batch"] == 8 * cfg["batch_size"]


def test_print_config_shows_the_batch_chosen_for_a_world_and_a_gpu(capsys):
    cfg = _print_config(capsys, "--preset", "mae_vit_huge_patch14", "--world-size", "8", "--gpu-mem", "80")
    assert (cfg["batch_size"], cfg["accum_iter"], cfg["world_size"], cfg["effective_batch"]) == (256, 2, 8, 4096)
    assert cfg["model"] == "mae_vit_huge_patch14" and cfg["lr"] == pytest.approx(2.4e-3)
    assert cfg["batch_choice"][0].startswith("batch 256 x accum 2 x 8 processes")
    assert cfg["batch_choice"][1].startswith("why: at most 488 images per process fit (90% of 80 GiB")
    cfg = _print_config(capsys, "--preset=mae_vit_large_patch16", "--world-size", "8")  # no GPU looked at
    assert (cfg["batch_size"], cfg["accum_iter"]) == (512, 1) and "--gpu-mem GIB" in cfg["batch_choice"][1]


def test_the_batch_flags_on_the_command_line(capsys):
    """--batch-size alone keeps its per-process meaning (the preset's recipe batch is dropped); with --recipe-batch it
    derives the accumulation; --accum-iter alone derives the batch; demo keeps its own batch."""
    base = ["--preset", "mae_vit_base_patch16", "--world-size", "8", "--gpu-mem", "80"]
    cfg = _print_config(capsys, *base, "--batch-size", "64")
    assert (cfg["batch_size"], cfg["accum_iter"], cfg["recipe_batch"], cfg["effective_batch"]) == (64, 1, None, 512)
    cfg = _print_config(capsys, *base, "--batch-size", "64", "--recipe-batch", "4096")
    assert (cfg["batch_size"], cfg["accum_iter"], cfg["effective_batch"]) == (64, 8, 4096)
    cfg = _print_config(capsys, *base, "--accum-iter", "4")
    assert (cfg["batch_size"], cfg["accum_iter"], cfg["effective_batch"]) == (128, 4, 4096)
    cfg = _print_config(capsys, "--world-size", "2")
    assert (cfg["batch_size"], cfg["accum_iter"], cfg["recipe_batch"]) == (8, 1, None)
    assert main(["pretrain", *base, "--batch-size", "64", "--accum-iter", "2", "--recipe-batch", "4096",
                 "--print-config"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fastmae: error: --batch-size 64 x --accum-iter 2 x 8 processes = 1024, not --recipe-batch 4096: "
                   "drop --batch-size or --accum-iter (it is then chosen to make 4096), or --recipe-batch"]  # fmt: skip


def test_print_config_imports_no_torch():
    code = ("import sys; from fastmae.cli import main; "
            "main(['pretrain', '--preset', 'mae_vit_base_patch16', '--print-config', '--world-size', '8']); "
            "assert 'torch' not in sys.modules, 'torch was imported'")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["batch_size"] == 512


def _help(capsys, *args) -> str:
    with pytest.raises(SystemExit) as stop:
        main(["pretrain", *args, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def test_help_with_a_preset_shows_that_presets_values(capsys):
    plain = _help(capsys)
    base = _help(capsys, "--preset", "mae_vit_base_patch16")
    assert base != plain and base == _help(capsys, "--preset=mae_vit_base_patch16")
    flat = " ".join(base.split())  # argparse wraps the help at the terminal's width
    assert "the values shown below are mae_vit_base_patch16's" in flat
    assert "(unset by default) (mae_vit_base_patch16: 4096)" in flat  # --recipe-batch
    assert "(mae_vit_base_patch16: 1000)" in flat and "(mae_vit_base_patch16: mae_vit_base_patch16)" in flat
    assert "(demo: 8)" in " ".join(plain.split()) and "(demo:" not in flat
    # a misspelt preset is still the short one-line error, --help or not
    with pytest.raises(SystemExit) as stop:
        main(["pretrain", "--preset", "mae_vit_bas", "--help"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1
    assert err[0].startswith("fastmae pretrain: error: --preset mae_vit_bas: no such choice; did you mean")


def test_a_run_chooses_before_it_starts_and_says_so_first(tmp_path, caplog, capsys):
    """The wiring: start_run chooses the batch (here from --recipe-batch and --accum-iter), the recipe check logs the
    reasons first, and config.json holds them; a --world-size that is not the launcher's is one line."""
    out = tmp_path / "run"
    args = ["pretrain", "--model", "mae_vit_tiny_patch16", "--img-size", "32", "--loader", "synthetic",
            "--synthetic-images", "8", "--epochs", "1", "--warmup-epochs", "0", "--recipe-batch", "4", "--accum-iter",
            "2", "--no-progress", "--num-workers", "0", "--output-dir", str(out)]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="fastmae"):
        assert main(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["batch_size"], config["accum_iter"], config["effective_batch"]) == (2, 2, 4)
    assert config["batch_choice"] == ["batch 2 x accum 2 x 1 process: batch chosen to make recipe batch 4"]
    recipe = [r.getMessage() for r in caplog.records if r.getMessage().startswith("recipe: ")]
    assert recipe[:2] == ["recipe: batch 2 x accum 2 x 1 process: batch chosen to make recipe batch 4",
                          "recipe: effective batch 4 = 2 per step x 2 accumulation x 1 process"]  # fmt: skip
    capsys.readouterr()
    assert main([*args, "--output-dir", str(tmp_path / "other"), "--world-size", "8"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "fastmae: error: --world-size 8, but this run has 1 process(es): --world-size plans a batch for "
        "--print-config; drop it, or start 8 processes (fastmae launch --nproc-per-node 8, or srun)"]  # fmt: skip
    assert not (tmp_path / "other").exists()  # refused before any folder was made


@pytest.mark.parametrize("command", DOWNSTREAM)
def test_finetune_and_linprobe_runs_log_the_choice_first(command, tmp_path, caplog):
    """A downstream run chooses its batch at the start as pretraining does: the reasons are the first lines of the
    recipe check in the log, and config.json holds them; --gpu-mem looks the model up in the command's own numbers."""
    out = tmp_path / command
    args = [command, "--img-size", "32", "--num-workers", "0", "--no-progress", "--recipe-batch", "64", "--gpu-mem",
            "80", "--stop-after-steps", "1", "--output-dir", str(out)]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="fastmae"):
        assert main([*args, *(["--knn-k", "0"] if command == "linprobe" else [])]) == 0
    first = ["batch 64 x accum 1 x 1 process: recipe batch 64 / 1 process, no memory limit applied",
             f"why: no memory numbers for mae_vit_tiny_patch16 in fastmae/batch_table.json's {command} section (it "
             "holds mae_vit_base_patch16, mae_vit_large_patch16, mae_vit_huge_patch14)"]  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert (config["batch_size"], config["accum_iter"], config["effective_batch"]) == (64, 1, 64)
    assert config["batch_choice"] == first and config["recipe_warnings"] == []
    recipe = [r.getMessage() for r in caplog.records if r.getMessage().startswith("recipe: ")]
    assert recipe[:3] == [*(f"recipe: {line}" for line in first),
                          "recipe: effective batch 64 = 64 per step x 1 accumulation x 1 process"]  # fmt: skip
    started = next(i for i, r in enumerate(caplog.records) if "effective batch 64, " in r.getMessage())
    assert started > max(i for i, r in enumerate(caplog.records) if r.getMessage().startswith("recipe: "))
