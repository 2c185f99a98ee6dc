"""`fastmae pretrain` end to end on tiny runs: the files it leaves, resume, and one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastmae.cli import main

TINY = ["--model", "mae_vit_tiny_patch16", "--img-size", "32", "--batch-size", "2", "--epochs", "2",
        "--warmup-epochs", "1", "--num-workers", "0", "--no-progress", "--log-every", "1", "--blr", "1e-3"]  # fmt: skip


@pytest.fixture
def image_folder(tmp_path):
    """ImageFolder layout with 6 good images, one corrupt JPEG and a non-image file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            arr = rng.integers(0, 255, (40 + 7 * i, 48, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


def _run(args, capsys):
    code = main(["pretrain", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_short_run_writes_every_file(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = _run([*TINY, "--data", str(image_folder), "--output-dir", str(out), "--stop-after-steps", "3"],
                           capsys)  # fmt: skip
    assert code == 0, stdout
    cfg = json.loads((out / "config.json").read_text())
    assert (
        cfg["model"] == "mae_vit_tiny_patch16" and cfg["img_size"] == 32 and cfg["lr"] == pytest.approx(1e-3 * 2 / 256)
    )
    assert cfg["num_images"] == 6  # the broken file is found by the validated index and left out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert {"step", "epoch", "loss", "lr", "img_per_s"} <= set(r) and np.isfinite(r["loss"])
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["config"]["model"] == "mae_vit_tiny_patch16"
    assert {"model", "optimizer", "epoch"} <= set(ckpt) and "blocks.0.attn.qkv.weight" in ckpt["model"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["attn_backend"] == "sdpa" and summary["loader"] == "torchvision"
    assert summary["kernels"] == {"masking": "reference", "unshuffle": "reference", "masked_mse": "reference"}
    assert summary["images_seen"] == 6 and summary["skipped_files"] == 1
    pngs = sorted(p.name for p in (out / "reconstructions").glob("*.png"))
    assert pngs == ["step0000000.png", "step0000003.png"]
    with Image.open(out / "reconstructions" / pngs[1]) as im:
        # original | masked | reconstruction, one row per decodable image, 32 px drawn 3x under a 34-px header
        assert im.size == (3 * 96, 6 * 96 + 34)
    assert np.isfinite(summary["eval_loss_start"]) and np.isfinite(summary["eval_loss_end"])


@pytest.mark.parametrize("loader", ["torchvision", "dali"])
def test_every_image_mode_trains_and_broken_files_are_counted(loader, tmp_path, capsys):
    from .test_data import BROKEN, make_mixed_folder

    root = make_mixed_folder(tmp_path / "mixed")
    out = tmp_path / "run"
    # Batch 4 over the valid files: every one is decoded (all modes), each broken one is counted once.
    code, _, err = _run([*TINY, "--data", str(root), "--output-dir", str(out), "--loader", loader,
                         "--batch-size", "4", "--epochs", "1"], capsys)  # fmt: skip
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loader"] == loader and summary["steps"] >= 3
    assert summary["skipped_files"] == len(BROKEN)
    assert sorted(p.rsplit("/", 1)[-1] for p in summary["skipped_examples"]) == sorted(BROKEN)[:5]
    assert np.isfinite(summary["final_loss"])


def test_resume_continues_from_the_checkpoint(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    base = [*TINY, "--data", str(image_folder), "--output-dir", str(out)]
    assert _run([*base, "--stop-after-steps", "2"], capsys)[0] == 0
    first = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert _run([*base, "--stop-after-steps", "4", "--resume", "auto"], capsys)[0] == 0
    second = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert first["step"] == 2 and second["step"] == 4
    assert [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert not torch.equal(first["model"]["blocks.0.attn.qkv.weight"], second["model"]["blocks.0.attn.qkv.weight"])


def test_synthetic_loader(tmp_path, capsys):
    out = tmp_path / "syn"
    code, _, _ = _run([*TINY, "--loader", "synthetic", "--synthetic-images", "4", "--output-dir", str(out),
                       "--encoder-mode", "mask_token"], capsys)  # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loader"] == "synthetic" and summary["steps"] == 4 and summary["skipped_files"] == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mask-ratio", "1.0"], r"mask_ratio must be in \[0, 1\), got 1.0"),
        (["--mask-ratio", "-0.2"], r"mask_ratio must be in \[0, 1\)"),
        (["--img-size", "100"], "img_size 100 is not divisible by patch_size 16"),
        (["--model", "mae_vit_enormous"], "unknown model 'mae_vit_enormous'; known models: mae_vit_tiny_patch16"),
        (["--data", "/nonexistent/imagenet"], "--data /nonexistent/imagenet does not exist"),
        (["--attn-backend", "xformers"], "attention backend 'xformers' cannot run"),
        (["--resume", "/nonexistent/ckpt.pth"], "--resume /nonexistent/ckpt.pth does not exist"),
    ],
)
def test_bad_input_is_one_line(args, message, tmp_path, capsys, image_folder):
    code, _, err = _run([*TINY, "--data", str(image_folder), "--output-dir", str(tmp_path / "o"), *args], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastmae: error: ")
    assert __import__("re").search(message, lines[0]), lines[0]


def test_folder_without_images(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("x")
    code, _, err = _run([*TINY, "--data", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "no images" in err and str(tmp_path / "empty") in err


def test_console_script_error_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fastmae.cli", "pretrain", "--data", str(tmp_path / "missing"), "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"fastmae: error: --data {tmp_path / 'missing'} does not exist"


def test_default_demo_learns_on_the_bundled_photos(tmp_path, capsys):
    """The main job as a new user runs it (`fastmae pretrain`, no flags but the output folder): the loss falls."""
    out = tmp_path / "demo"
    code, stdout, _ = _run(["--output-dir", str(out), "--no-progress", "--num-workers", "2"], capsys)
    assert code == 0 and "done:" in stdout
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and rows[-1]["step"] == json.loads((out / "config.json").read_text())["total_steps"]
    summary = json.loads((out / "summary.json").read_text())
    # loss on fixed images with a fixed mask, before and after training: it must fall clearly
    assert summary["eval_loss_end"] < 0.75 * summary["eval_loss_start"], summary
    assert summary["skipped_files"] == 2  # scikit-image ships a multi-page RGB TIFF and a float64 .npy
    total = json.loads((out / "config.json").read_text())["total_steps"]
    want = sorted({0, total, *range(250, total, 250)})  # the demo draws every 250 steps, at the start and the end
    assert sorted(int(p.stem[4:]) for p in (out / "reconstructions").glob("*.png")) == want
    assert [r["step"] for r in rows if "eval_loss" in r] == want[1:-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error given when no GPU exists")
@pytest.mark.parametrize("command, device", [(["pretrain", *TINY], "cuda"), (["bench", "--quick"], "cuda:1")])
def test_cuda_without_a_gpu_is_one_line(command, device, tmp_path, capsys):
    extra = ["--output-dir", str(tmp_path)] if command[0] == "pretrain" else []
    code = main([*command, "--device", device, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"fastmae: error: --device {device} was requested but no CUDA device is available"]


def test_log_lines_go_above_a_progress_bar():
    """A log line written while a progress bar is shown starts on a line of its own (it was glued to the bar)."""
    import io
    import logging

    from tqdm import tqdm

    from fastmae.cli import _BarSafeHandler

    stream = io.StringIO()
    handler = _BarSafeHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    record = logging.LogRecord("fastmae.finetune", logging.INFO, __file__, 1, "epoch 1: val loss 0.5", None, None)
    with tqdm(total=10, file=stream, ascii=True) as bar:
        bar.update(3)
        handler.emit(record)
    lines = stream.getvalue().replace("\r", "\n").splitlines()
    assert "epoch 1: val loss 0.5" in lines  # a whole line, not a bar's tail


def test_a_misspelt_flag_names_its_command_and_the_closest_flag(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["pretrain", "--batchsize", "64"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and err == [
        "usage: fastmae pretrain [FLAGS]  (`fastmae pretrain --help` lists them)",
        "fastmae pretrain: error: unrecognized argument --batchsize; did you mean --batch-size?"]  # fmt: skip
    with pytest.raises(SystemExit):
        main(["finetune", "--blrr=3", "--foo"])
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "fastmae finetune: error: unrecognized arguments --blrr --foo; did you mean --blr?")


def test_a_misspelt_preset_or_command_is_one_line_with_the_choices(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["pretrain", "--preset", "mae_vit_bas"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and err == [
        "fastmae pretrain: error: --preset mae_vit_bas: no such choice; did you mean mae_vit_base_patch16? (choose "
        "from demo, digits, mae_vit_base_patch16, mae_vit_large_patch16, mae_vit_huge_patch14)"]  # fmt: skip
    with pytest.raises(SystemExit):
        main(["pretrian"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastmae: error: pretrian: no such command; did you mean pretrain?")


@pytest.mark.parametrize("broken", [False, True])
def test_a_refused_run_leaves_no_folder_and_no_lock(broken, tmp_path, capsys):
    data = tmp_path / "data"
    if broken:  # a folder whose only image does not decode
        (data / "a").mkdir(parents=True)
        (data / "a" / "x.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "kept").mkdir()
    for out in (tmp_path / "new" / "run", tmp_path / "kept"):
        code, _, err = _run([*TINY, "--data", str(data), "--output-dir", str(out)], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1
        why = (f"the only image under {data} does not decode ({data / 'a' / 'x.jpg'}: " if broken else
               f"--data {data} does not exist")  # fmt: skip
        assert err.startswith(f"fastmae: error: {why}"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["data", "kept"] if broken else ["kept"])
    assert list((tmp_path / "kept").iterdir()) == []  # a folder that existed stays, without a lock file
