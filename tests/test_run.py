"""The shared run machinery: the epoch-end checkpoint policy, --help, and one-line errors for bad paths."""

import zipfile

import pytest
import torch

from fastmae.cli import build_parser, main

from ._util import noise_pngs

TINY = ["--model", "mae_vit_tiny_patch16", "--img-size", "32", "--batch-size", "2", "--warmup-epochs", "0",
        "--num-workers", "0", "--no-progress", "--log-every", "1", "--num-reconstructions", "1"]  # fmt: skip


@pytest.fixture
def folder(tmp_path):
    return noise_pngs(tmp_path / "imgs", 4, seed=3)  # 2 steps per epoch at batch 2


class _CountSaves:
    def __init__(self, monkeypatch):
        from fastmae.train import checkpointer

        self.paths = []
        real = checkpointer.save_torch

        def spy(state, path):
            self.paths.append(path.name)
            return real(state, path)

        monkeypatch.setattr(checkpointer, "save_torch", spy)


def test_epoch_end_saves_follow_the_time_interval(folder, tmp_path, monkeypatch, capsys):
    """Default policy: 5 epochs of 2 steps in seconds write one checkpoint (the end), not one per epoch;
    --save-interval 0 saves at every epoch end; --save-every still saves on its step count."""
    saves = _CountSaves(monkeypatch)
    base = ["pretrain", *TINY, "--data", str(folder), "--epochs", "5"]
    assert main([*base, "--output-dir", str(tmp_path / "a")]) == 0
    assert saves.paths == ["checkpoint-last.pth"]
    saves.paths.clear()
    assert main([*base, "--output-dir", str(tmp_path / "b"), "--save-interval", "0"]) == 0
    assert len(saves.paths) == 4 + 1  # epoch ends 1..4 (the 5th is the end of the run), then the end
    saves.paths.clear()
    assert main([*base, "--output-dir", str(tmp_path / "c"), "--save-every", "3"]) == 0
    assert len(saves.paths) == 3 + 1  # steps 3, 6, 9, then the end (step 10)
    # the resume from a run that saved only at its end is still exact
    ckpt = torch.load(tmp_path / "a" / "checkpoint-last.pth", weights_only=True)
    assert ckpt["step"] == 10 and ckpt["data_position"] == [4, 2]
    capsys.readouterr()


def test_help_shows_preset_values_never_none(capsys):
    parser = build_parser()
    for command in ("pretrain", "finetune", "linprobe", "export", "visualize", "bench"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        text = capsys.readouterr().out
        assert "(default: None)" not in text, command
        assert "None" not in text.replace("Nones", ""), command
    with pytest.raises(SystemExit):
        parser.parse_args(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(demo: 96)" in text and "(demo: mae_vit_tiny_patch16)" in text and "(demo: 5.0)" in text


def test_help_imports_no_torch():
    """``fastmae --help`` and ``fastmae pretrain --help`` parse flags without importing torch (a fresh process: the
    configs, the CLI and the registry are torch-free)."""
    import subprocess
    import sys

    code = ("import sys\nfrom fastmae.cli import main\nfor argv in (['--help'], ['pretrain', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "False", proc.stderr


def _one_line_error(args, capsys) -> str:
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


def test_output_dir_that_is_a_file_is_one_line(folder, tmp_path, capsys):
    path = tmp_path / "taken"
    path.write_text("a file")
    for command in ("pretrain", "finetune", "linprobe"):
        err = _one_line_error([command, "--output-dir", str(path / "sub"), "--no-progress"], capsys)
        assert f"--output-dir {path / 'sub'}: {path} is a file, not a folder" in err, err


@pytest.mark.parametrize("kind", ["text", "truncated", "zip"])
def test_resume_and_pretrained_that_are_not_checkpoints(kind, folder, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.pth"
    if kind == "text":
        bad.write_text("hello, not a checkpoint\n")
        want = "is not a PyTorch checkpoint"
    elif kind == "truncated":
        torch.save({"model": {"w": torch.zeros(1000)}}, tmp_path / "good.pth")
        bad.write_bytes((tmp_path / "good.pth").read_bytes()[:700])
        want = "is truncated or corrupt"
    else:
        with zipfile.ZipFile(bad, "w") as z:
            z.writestr("readme.txt", "zip, but no torch")
        want = "is a zip archive but not a PyTorch checkpoint (no data.pkl inside)"
    # --resume is checked before the data set is indexed: indexing would fail the test
    from fastmae.train import pretrain

    indexer = lambda *a, **k: pytest.fail("indexed the data before checking --resume")
    monkeypatch.setattr(pretrain, "pretrain_index", indexer)
    err = _one_line_error(["pretrain", *TINY, "--data", str(folder), "--resume", str(bad)], capsys)
    assert err.startswith(f"fastmae: error: --resume {bad} {want}"), err
    for command in ("finetune", "linprobe"):
        err = _one_line_error([command, "--pretrained", str(bad), "--no-progress"], capsys)
        assert err.startswith(f"fastmae: error: --pretrained {bad} {want}"), err
    err = _one_line_error(["export", str(bad), str(tmp_path / "out.pth")], capsys)
    assert f"{bad} {want}" in err


@pytest.fixture
def compiled_triton_only(monkeypatch):
    """As if fastmae was imported without TRITON_INTERPRET=1: Triton's kernels need a GPU."""
    from fastmae.kernels import _common

    monkeypatch.setattr(_common, "INTERPRETED", False)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--attn-backend", "bogus"], "fastmae: error: unknown attention backend 'bogus'; choose one of auto, "),
        (["--kernels", "triton", "--device", "cpu"], "fastmae: error: --kernels triton: masking, unshuffle, "
         "masked_mse cannot run: Triton kernels need a CUDA device, the inputs are on cpu"),
    ],
)
def test_flags_that_cannot_run_here_fail_in_one_line_before_indexing(args, message, folder, tmp_path, monkeypatch,
                                                                     capsys, compiled_triton_only):  # fmt: skip
    """The run spec decides attention and kernels before any data is indexed (a cold 1.28M-file folder takes minutes)
    or a file is written, instead of the model's constructor or the first forward failing after that."""
    from fastmae.train import pretrain

    monkeypatch.setattr(pretrain, "pretrain_index", lambda *a, **k: pytest.fail("indexed the data first"))
    args = ["pretrain", *TINY, "--data", str(folder), "--output-dir", str(tmp_path / "o"), *args]
    err = _one_line_error(args, capsys)
    assert err.startswith(message), err
    assert not (tmp_path / "o").exists()


def test_every_problem_of_the_run_spec_is_in_its_one_line(compiled_triton_only):
    from fastmae.train.spec import Asked, decide

    from fastmae import FastMAEError

    asked = Asked(device="cpu", graphs=True, kernels="masking=triton", attn_backend="encoder=flash",
                  model="mae_vit_tiny_patch16")
    with pytest.raises(FastMAEError) as info:
        decide(asked)
    assert str(info.value) == (
        "3 problems: --cuda-graphs cannot run here: CUDA graphs need a CUDA device (this run is on cpu); attention "
        "backend 'flash' cannot run: flash attention needs CUDA (inputs are on cpu); --kernels triton: masking cannot "
        "run: Triton kernels need a CUDA device, the inputs are on cpu; set TRITON_INTERPRET=1 before importing "
        "fastmae to run them (slowly) on CPU"
    )
    spec = decide(Asked(device="cpu", kernels="auto", attn_backend="decoder=math", model="mae_vit_tiny_patch16"))
    assert spec.kernels == {"masking": "reference", "unshuffle": "reference", "masked_mse": "reference"}
    assert spec.attention == {"encoder": "auto", "decoder": "math"} and spec.precision == "fp32"


def test_the_model_is_built_with_the_choices_the_run_spec_resolved(folder, tmp_path, monkeypatch):
    import fastmae

    seen, real = {}, fastmae.create_model

    def spy(name, **kw):
        seen.update(kw)
        return real(name, **kw)

    monkeypatch.setattr(fastmae, "create_model", spy)
    assert main(["pretrain", *TINY, "--data", str(folder), "--output-dir", str(tmp_path / "o"), "--stop-after-steps",
                 "1", "--attn-backend", "decoder=math", "--picture-every", "0"]) == 0  # fmt: skip
    assert seen["kernels"] == {"masking": "reference", "unshuffle": "reference", "masked_mse": "reference"}
    assert seen["attn_backend"] == {"encoder": "auto", "decoder": "math"}
