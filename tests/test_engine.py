"""The pretraining engine: bit-exact resume, per-sample masks, preemption (SIGTERM), checkpoints kept."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from fastmae.train.noise import mask_noise
from PIL import Image

from fastmae.cli import main

TINY = ["--model", "mae_vit_tiny_patch16", "--img-size", "32", "--batch-size", "2", "--warmup-epochs", "1",
        "--num-workers", "0", "--no-progress", "--log-every", "1", "--blr", "1e-2",
        "--num-reconstructions", "2"]  # fmt: skip


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(7):
        Image.fromarray(rng.integers(0, 255, (36 + 3 * i, 40, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def test_mask_noise_is_per_sample():
    a = mask_noise(0, 3, torch.tensor([5, 9, 2]), 49)
    b = mask_noise(0, 3, torch.tensor([2, 11, 5, 40, 9]), 49)
    assert a.shape == (3, 49) and a.dtype == torch.float32
    assert torch.equal(a[0], b[2]) and torch.equal(a[1], b[4]) and torch.equal(a[2], b[0])  # batch-independent
    assert not torch.equal(a, mask_noise(0, 4, torch.tensor([5, 9, 2]), 49))  # new masks every epoch
    assert not torch.equal(a, mask_noise(1, 3, torch.tensor([5, 9, 2]), 49))  # and per seed
    big = mask_noise(7, 0, torch.arange(4096), 196)
    assert 0 <= big.min() and big.max() < 1 and abs(big.mean().item() - 0.5) < 0.002
    assert abs(big.var().item() - 1 / 12) < 0.001
    # the kept set is a uniform choice: every patch is kept about 25% of the time
    kept = torch.zeros(196)
    kept.index_add_(0, big.argsort(dim=1)[:, :49].flatten(), torch.ones(4096 * 49))
    assert (kept / 4096 - 0.25).abs().max() < 0.04


def _losses(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def test_interrupted_and_resumed_run_is_bit_identical(folder, tmp_path, capsys):
    """5 steps straight == 2 steps, stop, resume to 5 (mid-epoch restart, epoch boundary at 3 in between)."""
    base = [*TINY, "--data", str(folder), "--epochs", "4"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["pretrain", *base, "--output-dir", str(straight), "--stop-after-steps", "5"]) == 0
    assert main(["pretrain", *base, "--output-dir", str(split), "--stop-after-steps", "2"]) == 0
    mid = torch.load(split / "checkpoint-last.pth", weights_only=True)
    assert mid["step"] == 2 and mid["data_position"] == [0, 2]
    assert main(["pretrain", *base, "--output-dir", str(split), "--stop-after-steps", "5", "--resume", "auto"]) == 0
    assert _losses(split) == _losses(straight) and [s for s, _ in _losses(split)] == [1, 2, 3, 4, 5]
    a = torch.load(straight / "checkpoint-last.pth", weights_only=True)
    b = torch.load(split / "checkpoint-last.pth", weights_only=True)
    assert a["step"] == b["step"] == 5
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert torch.equal(a["optimizer"]["state"][0]["exp_avg"], b["optimizer"]["state"][0]["exp_avg"])
    capsys.readouterr()


def test_numbered_checkpoints_are_kept(folder, tmp_path, capsys):
    out = tmp_path / "run"
    args = [*TINY, "--data", str(folder), "--epochs", "2", "--save-every", "2", "--keep-every", "2"]
    assert main(["pretrain", *args, "--output-dir", str(out)]) == 0
    kept = sorted(p.name for p in out.glob("checkpoint-0*.pth"))
    assert kept == ["checkpoint-0000002.pth", "checkpoint-0000004.pth", "checkpoint-0000006.pth"]
    assert torch.load(out / kept[0], weights_only=True)["step"] == 2
    capsys.readouterr()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_finishes_the_step_saves_and_exits_zero(folder, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastmae.cli", "pretrain", *TINY, "--data", str(folder), "--epochs", "500",
         "--output-dir", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert time.time() - sent < 30
    assert "SIGTERM received" in err
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
    rows = [json.loads(r) for r in metrics.read_text().splitlines()]
    assert ckpt["step"] == rows[-1]["step"] >= 3  # the checkpoint is the last finished step
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM" and summary["steps"] == ckpt["step"]
    # resuming continues right after it
    proc = subprocess.run(
        [sys.executable, "-m", "fastmae.cli", "pretrain", *TINY, "--data", str(folder), "--epochs", "500",
         "--output-dir", str(out), "--resume", "auto", "--stop-after-steps", str(ckpt["step"] + 2)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    steps = [json.loads(r)["step"] for r in metrics.read_text().splitlines()]
    assert steps[-2:] == [ckpt["step"] + 1, ckpt["step"] + 2]
