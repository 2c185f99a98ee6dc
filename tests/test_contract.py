"""The output folder as a contract, and a newcomer's first hour: a finished run started again, a second run into a
folder that holds one, the messages that name the way out, where `fastmae bench` writes, the skip line, the
pictures' titles and labels."""

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from fastmae.cli import main

from ._util import noise_pngs

TINY = ["--model", "mae_vit_mini_patch4", "--img-size", "32", "--batch-size", "4", "--warmup-epochs", "0",
        "--num-workers", "0", "--no-progress", "--log-every", "2", "--no-tensorboard", "--picture-every", "4",
        "--num-reconstructions", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return noise_pngs(tmp_path_factory.mktemp("contract") / "imgs", 8, seed=3)


def _snapshot(out: Path) -> dict:
    """Every file under ``out``: (bytes, mtime)."""
    return {str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.rglob("*"))
            if p.is_file()}  # fmt: skip


def _error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("fastmae: error:")]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("stop", [None, "3"])
def test_a_finished_run_started_again_touches_nothing(folder, tmp_path, capsys, stop):
    """A scheduler requeues a finished job: 'already finished at step N', exit 0, every file as it was."""
    out = tmp_path / "run"
    args = ["pretrain", *TINY, "--data", str(folder), "--epochs", "2", "--output-dir", str(out)]
    args += ["--stop-after-steps", stop] if stop else []
    assert main(args) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert main([*args, "--resume", "auto"]) == 0
    printed = capsys.readouterr().out
    assert f"already finished at step {3 if stop else 4}: nothing to do" in printed
    assert _snapshot(out) == before


def test_a_second_run_into_a_folder_that_holds_one_is_refused_then_overwrite_moves_it_aside(folder, tmp_path,
                                                                                            capsys):  # fmt: skip
    out = tmp_path / "run"
    assert main(["pretrain", *TINY, "--data", str(folder), "--epochs", "1", "--output-dir", str(out)]) == 0
    before = _snapshot(out)
    capsys.readouterr()
    other = ["pretrain", *TINY, "--model", "mae_vit_tiny_patch16", "--data", str(folder), "--epochs", "1",
             "--output-dir", str(out)]  # fmt: skip
    assert main(other) == 2
    err = _error(capsys)
    assert f"--output-dir {out} holds a run (mae_vit_mini_patch4 at step 2 of 2)" in err
    assert "--resume auto" in err and "--overwrite" in err and "another --output-dir" in err
    assert _snapshot(out) == before  # nothing touched
    assert main([*other, "--overwrite", "--resume", "auto"]) == 2 and "give one of them" in _error(capsys)
    assert main([*other, "--overwrite"]) == 0
    aside = [p for p in out.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1
    moved = {k: v[0] for k, v in _snapshot(aside[0]).items()}
    # the old run, byte for byte, nothing deleted; the folder's lock stays where it is (it belongs to the folder)
    assert moved == {k: v[0] for k, v in before.items() if k != ".fastmae.lock"} and (out / ".fastmae.lock").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]  # the new run's rows only
    assert json.loads((out / "config.json").read_text())["model"] == "mae_vit_tiny_patch16"


def test_resume_auto_with_no_checkpoint_starts_anew_with_the_old_files_aside(folder, tmp_path):
    """A run that died before its first checkpoint left config and metrics: --resume auto has nothing to continue,
    so the new run starts with its own files (the old ones moved aside, not appended to)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    assert main(["pretrain", *TINY, "--data", str(folder), "--epochs", "1", "--output-dir", str(out), "--resume",
                 "auto"]) == 0  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("loss") != 9.0 for r in rows)
    assert len([p for p in out.iterdir() if p.name.startswith("replaced-")]) == 1


def test_resume_takes_a_run_folder_and_a_resumed_run_logs_each_step_once(folder, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["pretrain", *TINY, "--data", str(folder), "--epochs", "3", "--output-dir", str(out), "--log-every", "1"]
    assert main([*base, "--save-every", "2", "--stop-after-steps", "4"]) == 0
    rows = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(rows + ['{"step": 5, "loss": 1.0}', '{"step": 6, "lo']) + "\n")
    assert main([*base, "--resume", str(out)]) == 0  # a folder: its checkpoint-last.pth
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]  # fmt: skip
    assert steps == [1, 2, 3, 4, 5, 6]  # the interrupted run's rows after step 4 (and a cut line) are gone


def test_resume_with_another_model_names_the_mismatch_and_the_way_out(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", *TINY, "--data", str(folder), "--epochs", "1", "--output-dir", str(out)]) == 0
    capsys.readouterr()
    assert main(["pretrain", *TINY, "--model", "mae_vit_tiny_patch4", "--data", str(folder), "--epochs", "2",
                 "--output-dir", str(out), "--resume", "auto"]) == 2  # fmt: skip
    err = _error(capsys)
    assert "is a ViT with patch 4, width 192, 6 blocks, not mae_vit_tiny_patch4 (patch 4, width 192, 12 blocks)" in err
    assert main(["pretrain", *TINY, "--img-size", "24", "--data", str(folder), "--epochs", "2", "--output-dir",
                 str(out), "--resume", "auto"]) == 2  # fmt: skip
    err = _error(capsys)
    assert "shapes differ: pos_embed (1, 65, 192) in the checkpoint, (1, 37, 192) in the model" in err
    assert "its config.json" in err and "another --output-dir" in err


def test_finetune_digits_before_pretraining_names_the_way_out(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no output/digits/checkpoint-last.pth here
    assert main(["finetune", "--preset", "digits", "--stop-after-steps", "1", "--no-progress"]) == 2
    err = _error(capsys)
    assert "--preset digits starts from output/digits/checkpoint-last.pth, which does not exist yet" in err
    assert "fastmae pretrain --preset digits" in err and "--pretrained none" in err


def test_visualize_a_finetune_checkpoint_says_it_needs_a_pretraining_one(tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(["finetune", "--pretrained", "none", "--model", "mae_vit_mini_patch4", "--img-size", "32",
                 "--batch-size", "16", "--epochs", "1", "--stop-after-steps", "1", "--no-progress", "--num-workers",
                 "0", "--mixup", "0", "--cutmix", "0", "--output-dir", str(out)]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["visualize", "--checkpoint", str(out / "checkpoint-last.pth"), "--output",
                 str(tmp_path / "r.png")]) == 2  # fmt: skip
    err = _error(capsys)
    assert "holds no MAE decoder" in err and "pretraining checkpoint" in err and not (tmp_path / "r.png").exists()


def test_finetune_stopped_inside_an_epoch_logs_no_epoch_end(tmp_path):
    """--stop-after-steps 2 of a 22-step epoch: no 'epoch 1' evaluation row, the summary scores where it stopped."""
    out = tmp_path / "ft"
    assert main(["finetune", "--pretrained", "none", "--model", "mae_vit_mini_patch4", "--img-size", "32",
                 "--batch-size", "64", "--epochs", "2", "--stop-after-steps", "2", "--no-progress", "--num-workers",
                 "0", "--mixup", "0", "--cutmix", "0", "--log-every", "1", "--output-dir", str(out)]) == 0  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("top1" not in r for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["top1"] is not None


def test_bench_writes_into_the_current_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    import fastmae

    package_results = Path(fastmae.__file__).resolve().parents[1] / "benchmarks" / "results"
    before = set(os.listdir(package_results)) if package_results.is_dir() else set()
    assert main(["bench", "--quick", "--suite", "pretrain", "--decoder-depths", "1"]) == 0
    written = list(tmp_path.glob("fastmae-bench-cpu-*.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["rows"]
    after = set(os.listdir(package_results)) if package_results.is_dir() else set()
    assert after == before


def test_demo_data_skip_line_is_one_quiet_line(tmp_path, capsys, caplog):
    """scikit-image's float64 .npy and multipage TIFF: one line naming both, no object repr, no xformers advice on a
    CPU."""
    caplog.set_level("INFO")
    out = tmp_path / "demo"
    assert main(["pretrain", "--stop-after-steps", "1", "--num-workers", "0", "--no-progress", "--picture-every", "0",
                 "--no-tensorboard", "--output-dir", str(out)]) == 0  # fmt: skip
    text = caplog.text
    skipped = [r.getMessage() for r in caplog.records if "not decode" in r.getMessage()]
    assert len(skipped) == 1 and skipped[0].startswith("skipped 2 files that do not decode: ")
    assert "lfw_subset.npy (.npy array of dtype float64: fastmae reads uint8, uint16, int16, float32)" in skipped[0]
    assert skipped[0].endswith("multipage_rgb.tif (TIFF of shape (2, 3, 10, 10) with axes QSYX: more than one axis "
                               "besides Y and X)")  # fmt: skip
    assert "object at 0x" not in text and "pip install 'fastmae[xformers]'" not in text
    assert "1 process" in text and "process(es)" not in text and "(none)" not in text


def test_pictures_have_a_title_and_column_labels(folder, tmp_path):
    out = tmp_path / "run"
    assert main(["pretrain", *TINY, "--data", str(folder), "--epochs", "2", "--output-dir", str(out)]) == 0
    pictures = sorted((out / "reconstructions").glob("step*.png"))
    assert [p.name for p in pictures] == ["step0000000.png", "step0000004.png"]
    with Image.open(pictures[-1]) as img:
        assert img.text["Title"].startswith("step 4, eval loss ")
        assert img.text["Description"] == "columns: original | masked | reconstruction"
        # 32-px images drawn 3x (at least 96 px high by default): 2 rows of 96 px under a 34-px header
        assert img.size == (3 * 96, 2 * 96 + 34)
    with Image.open(out / "loss.png") as img:
        assert img.text["Description"] == "top: training loss, eval loss; bottom: learning rate"
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert ckpt["config"]["picture_scale"] is None  # auto, resolved when drawing
