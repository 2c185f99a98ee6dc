"""`fastmae pretrain` on the one Trainer: bit-exact resume, per-sample masks, preemption (SIGTERM), checkpoints kept,
DDP and FSDP2 against one process."""

import json
import math
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

from ._util import losses, resumed_run_is_bit_identical
from ._util import noise_pngs as _noise_pngs
from ._util import torchrun as _torchrun

TINY = ["--model", "mae_vit_tiny_patch16", "--img-size", "32", "--batch-size", "2", "--warmup-epochs", "1",
        "--num-workers", "0", "--no-progress", "--log-every", "1", "--blr", "1e-2",
        "--num-reconstructions", "2"]  # fmt: skip


@pytest.fixture
def folder(tmp_path):
    return _noise_pngs(tmp_path / "imgs", 7, seed=1)


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


def test_interrupted_and_resumed_run_is_bit_identical(folder, tmp_path, capsys):
    """5 steps straight == 2 steps, stop, resume to 5 (mid-epoch restart, epoch boundary at 3 in between)."""

    def stopped(split):
        mid = torch.load(split / "checkpoint-last.pth", weights_only=True)
        assert mid["step"] == 2 and mid["data_position"] == [0, 2]

    resumed_run_is_bit_identical(main, [*TINY, "--data", str(folder), "--epochs", "4"], tmp_path, stopped)
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


def _run_cfg(folder, out, **kw):
    from fastmae.train.pretrain import pretrain

    from fastmae.config import PretrainConfig

    args = dict(model="mae_vit_tiny_patch16", img_size=32, batch_size=2, epochs=2, warmup_epochs=0, blr=1e-2,
                num_workers=0, progress=False, log_every=1, data=str(folder), output_dir=str(out),
                num_reconstructions=1)  # fmt: skip
    args.update(kw)
    return pretrain(PretrainConfig(**args))


def test_gradient_accumulation_matches_the_large_batch(folder, tmp_path):
    """accum 2 x batch 2 == batch 4: the same samples (sharded order), the same per-sample masks and crops."""
    small = _run_cfg(folder, tmp_path / "a", batch_size=2, accum_iter=2, lr=1e-3, stop_after_steps=1)
    large = _run_cfg(folder, tmp_path / "b", batch_size=4, accum_iter=1, lr=1e-3, stop_after_steps=1)
    assert small["steps"] == large["steps"] == 1 and small["images_seen"] == large["images_seen"] == 4
    assert small["final_loss"] == pytest.approx(large["final_loss"], rel=1e-6)
    a = torch.load(tmp_path / "a" / "checkpoint-last.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint-last.pth", weights_only=True)["model"]
    # Adam's first step is lr * g / (|g| + eps), about +-lr per weight: only weights whose gradient is ~0 (sign decided
    # by rounding) may differ, and by at most 2 lr.
    diff = torch.cat([(a[n] - b[n]).abs().flatten() for n in a])
    assert diff.max() <= 2e-3 * 1.01 and (diff > 1e-6).float().mean() < 1e-3, (diff > 1e-6).float().mean()
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["effective_batch"] == 4 and cfg["steps_per_epoch"] == 1  # 7 images: 3 batches of 2 -> 1 step of 2


class _NaNAt:
    """Wrap create_model so that the model's loss is NaN on the training forward calls ``bad(n)`` picks (1-based)."""

    def __init__(self, bad):
        self.bad, self.count = bad, 0

    def __call__(self, name, **kw):
        import fastmae.models

        model = fastmae.models.create_model(name, **kw)
        forward = model.forward

        def patched(imgs, *a, **k):
            loss, pred, mask = forward(imgs, *a, **k)
            if model.training:
                self.count += 1
                if self.bad(self.count):
                    loss = loss * float("nan")
            return loss, pred, mask

        model.forward = patched
        return model


def test_non_finite_steps_are_skipped_without_touching_the_weights(folder, tmp_path, monkeypatch):
    import fastmae

    monkeypatch.setattr(fastmae, "create_model", _NaNAt(lambda n: n in (3, 4)))
    summary = _run_cfg(folder, tmp_path / "n", stop_after_steps=5, save_every=1)
    assert summary["nan_skipped"] == 2 and summary["rollbacks"] == 0 and summary["steps"] == 5
    rows = [json.loads(r) for r in (tmp_path / "n" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] is None for r in rows] == [False, False, True, True, False]
    assert [r["nan_skipped"] for r in rows] == [0, 0, 1, 2, 2]
    ckpt = torch.load(tmp_path / "n" / "checkpoint-last.pth", weights_only=True)
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert int(ckpt["optimizer"]["state"][0]["step"]) == 3  # 5 steps, 2 skipped: AdamW counted only 3


def test_persistent_non_finite_steps_roll_back_then_stop(folder, tmp_path, monkeypatch, caplog):
    import fastmae
    from fastmae import FastMAEError

    monkeypatch.setattr(fastmae, "create_model", _NaNAt(lambda n: n >= 3))  # every step from the 3rd on
    with pytest.raises(FastMAEError, match=r"not finite for 2 steps in a row at step \d+ after 1 rollback"):
        _run_cfg(folder, tmp_path / "r", epochs=10, save_every=1, nan_rollback_after=2, max_rollbacks=1)
    assert "rolled back to" in caplog.text
    ckpt = torch.load(tmp_path / "r" / "checkpoint-last.pth", weights_only=True)  # still loadable and finite
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_recipe_check_warns_about_suspicious_settings():
    from fastmae.batching import choose_batch
    from fastmae.config import PretrainConfig, preset

    cfg = preset("mae_vit_large_patch16")  # the recipe's 4096 is the effective batch: chosen per process at the start
    choice = choose_batch(cfg, world=8, gpu_mem_gib=80)
    lines, warns = cfg.recipe_check(world_size=8, steps_per_epoch=312, batch_choice=choice)
    assert lines[: len(choice)] == choice and choice[0].startswith("batch 512 x accum 1 x 8 processes: ")
    assert lines[len(choice)] == "effective batch 4096 = 512 per step x 1 accumulation x 8 processes"
    assert lines[len(choice) + 1] == "lr 0.0024 = blr 0.00015 x 4096 / 256" and warns == []
    cfg = PretrainConfig(model="mae_vit_base_patch16", batch_size=64, accum_iter=2, epochs=10, warmup_epochs=10,
                         mask_ratio=0.4)  # fmt: skip
    lines, warns = cfg.recipe_check(world_size=2, steps_per_epoch=100)
    assert "effective batch 256 = 64 per step x 2 accumulation x 2 processes" == lines[0]
    assert cfg.effective_lr(2) == pytest.approx(1.5e-4)
    assert any("warmup (1000 steps) is as long as the whole run (1000)" in w for w in warns)
    assert any("effective batch 256 is far from the recipe's 4096" in w for w in warns)
    assert any("mask ratio 0.4 is unusual" in w for w in warns)


def test_fp16_grad_scaler_tensorboard_and_pictures_every_n_steps(folder, tmp_path):
    """fp16 autocast with the dynamic GradScaler (its state in the checkpoint and on resume), TensorBoard scalars
    matching metrics.jsonl, and reconstruction pictures + eval loss every --picture-every steps."""
    out = tmp_path / "fp16"
    args = [*TINY, "--data", str(folder), "--epochs", "2", "--precision", "fp16", "--picture-every", "2",
            "--output-dir", str(out)]  # fmt: skip
    assert main(["pretrain", *args, "--stop-after-steps", "4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"] == "fp16" and summary["fp16_scale"] > 0 and summary["nan_skipped"] == 0
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert ckpt["scaler"]["scale"] == summary["fp16_scale"]
    assert sorted(p.name for p in (out / "reconstructions").iterdir()) == [
        "step0000000.png", "step0000002.png", "step0000004.png"]  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    assert [s for s, _ in evals] == [2] and math.isfinite(evals[0][1])  # step 4 is the end: summary's eval_loss_end
    logged = losses(out)
    assert all(math.isfinite(v) for _, v in logged)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"loss", "lr", "img_per_s", "eval_loss"} <= set(events.Tags()["scalars"])
    assert [(e.step, round(e.value, 5)) for e in events.Scalars("loss")] == [(s, round(v, 5)) for s, v in logged]
    assert main(["pretrain", *args, "--stop-after-steps", "5", "--resume", "auto"]) == 0
    assert [s for s, _ in losses(out)][-1] == 5


def test_tensorboard_requested_but_missing_is_one_line(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when not installed
    code = main(["pretrain", *TINY, "--data", str(folder), "--tensorboard", "--output-dir", str(tmp_path / "o")])
    assert code == 2 and "pip install 'fastmae[tensorboard]'" in capsys.readouterr().err


def test_world_size_without_torchrun_is_a_one_line_error(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    code = main(["pretrain", *TINY, "--data", str(folder), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "could not join the gloo process group" in err and "launch with torchrun" in err
    assert len(err.strip().splitlines()) == 1


@pytest.fixture
def folder8(tmp_path):
    return _noise_pngs(tmp_path / "imgs8", 8, seed=2)  # an even count: 2 ranks split it without padding


def test_two_process_ddp_and_fsdp_match_one_process(folder8, tmp_path):
    """torchrun, 2 gloo processes: DDP (batch 1 x accum 2, so no_sync runs) and FSDP2 (batch 2) on the same global
    batch of 4 as one process: same per-step losses, same weights, ranks in sync; the one process then resumes the
    FSDP run's checkpoint."""
    base = [*TINY, "--data", str(folder8), "--epochs", "2", "--precision", "fp32"]
    single, ddp, fsdp = tmp_path / "single", tmp_path / "ddp", tmp_path / "fsdp"
    assert main(["pretrain", *base, "--batch-size", "4", "--output-dir", str(single)]) == 0
    _torchrun(["pretrain", *base, "--batch-size", "1", "--accum-iter", "2", "--output-dir", str(ddp)])
    _torchrun(["pretrain", *base, "--batch-size", "2", "--parallel", "fsdp", "--output-dir", str(fsdp)])
    ref = losses(single)
    assert [s for s, _ in ref] == [1, 2, 3, 4]
    want = torch.load(single / "checkpoint-last.pth", weights_only=True)
    for out, parallel in ((ddp, "ddp"), (fsdp, "fsdp")):
        summary = json.loads((out / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["parallel"] == parallel and summary["ranks_in_sync"]
        assert summary["images_seen"] == 16
        config = json.loads((out / "config.json").read_text())
        assert config["effective_batch"] == 4 and config["lr"] == pytest.approx(1e-2 * 4 / 256)
        got = losses(out)
        assert [s for s, _ in got] == [1, 2, 3, 4]
        assert np.allclose([v for _, v in got], [v for _, v in ref], rtol=1e-5, atol=1e-6), (parallel, got, ref)
        ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
        assert ckpt["model"].keys() == want["model"].keys() and ckpt["step"] == 4
        for key, value in want["model"].items():
            torch.testing.assert_close(ckpt["model"][key], value, rtol=1e-4, atol=1e-5, msg=f"{parallel}: {key}")
        for idx, state in want["optimizer"]["state"].items():  # FSDP's sharded moments come back in one-process form
            torch.testing.assert_close(ckpt["optimizer"]["state"][idx]["exp_avg"], state["exp_avg"], rtol=1e-3,
                                       atol=1e-6)  # fmt: skip
    # a one-process run resumes the FSDP checkpoint (different world size: a warning, then it goes on)
    assert main(["pretrain", *base, "--batch-size", "4", "--epochs", "3", "--output-dir", str(fsdp), "--resume",
                 "auto"]) == 0  # fmt: skip
    assert [s for s, _ in losses(fsdp)][-2:] == [5, 6]


def test_visualize_any_checkpoint_and_loss_curve(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", *TINY, "--data", str(folder), "--output-dir", str(out), "--epochs", "1"]) == 0
    assert (out / "loss.png").stat().st_size > 1000
    png = tmp_path / "rec.png"
    assert main(["visualize", "--checkpoint", str(out / "checkpoint-last.pth"), "--images", str(folder),
                 "--output", str(png), "--count", "3"]) == 0  # fmt: skip
    with Image.open(png) as im:
        assert im.size == (3 * 96, 3 * 96 + 34)  # original | masked | reconstruction, 3 rows of 32 px drawn 3x
    assert "wrote" in capsys.readouterr().out
    code = main(["visualize", "--checkpoint", str(tmp_path / "missing.pth"), "--output", str(png)])
    assert code == 2 and "missing.pth" in capsys.readouterr().err


def test_checkpoint_of_another_model_is_a_one_line_error(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", *TINY, "--data", str(folder), "--output-dir", str(out), "--stop-after-steps", "1"]) == 0
    capsys.readouterr()
    code = main(["pretrain", *TINY, "--model", "mae_vit_small_patch16", "--data", str(folder), "--output-dir",
                 str(out), "--resume", "auto"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "is a ViT with patch 16, width 192, 12 blocks, not mae_vit_small_patch16 (patch 16, width 384" in err[0]


_SAVER = """
import sys, torch
from fastmae.files import save_torch as save_checkpoint
path = sys.argv[1]
step = 0
while True:
    step += 1
    save_checkpoint({"model": {"w": torch.full((1_000_000,), float(step))}, "step": step}, path)
    print(step, flush=True)
"""


def test_kill_9_while_saving_leaves_a_loadable_checkpoint(tmp_path):
    """SIGKILL at arbitrary moments of back-to-back saves: the file on disk is always a whole checkpoint."""
    from fastmae.train.checkpointer import load_checkpoint

    path = tmp_path / "checkpoint-last.pth"
    rng = np.random.default_rng(0)
    last = 0
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(path)], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one save finished
        time.sleep(rng.uniform(0.05, 0.4))
        proc.kill()
        proc.wait()
        ckpt = load_checkpoint(path)
        assert torch.all(ckpt["model"]["w"] == ckpt["step"]) and ckpt["step"] >= 1
        last = ckpt["step"]
    assert last >= 1
    from fastmae.files import save_torch as save_checkpoint

    save_checkpoint({"step": last + 1}, path)  # the next save also clears temp files a killed writer left behind
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
