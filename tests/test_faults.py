"""Faults injected for real, each bounded in time: a rank SIGKILLed under torchrun (restarted, bit-identical), a
DataLoader worker SIGKILLed (survived, bit-identical), a save that runs out of room, an unreadable last checkpoint,
a peer that never comes, and ranks started with only SLURM's variables."""

import fcntl
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from fastmae.train.procs import finish, free_port, logged_steps, pids_with, start, torchrun_cmd, wait_for_step

from ._util import noise_pngs

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
# A run of 96 optimizer steps (2 ranks x batch 2 over 16 images: 4 steps an epoch), a checkpoint every 8.
RUN = ["--model", "mae_vit_mini_patch4", "--img-size", "32", "--batch-size", "2", "--epochs", "24",
       "--warmup-epochs", "1", "--blr", "1e-2", "--no-progress", "--log-every", "1", "--save-every", "8",
       "--picture-every", "0", "--num-reconstructions", "2", "--precision", "fp32", "--no-tensorboard",
       "--num-workers", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return noise_pngs(tmp_path_factory.mktemp("faults") / "imgs", 16, seed=5)


def _start(cmd, env=None, whole_env=False, **kw):
    """``cmd`` with ``env`` added to the test environment (or, with ``whole_env``, as the whole environment)."""
    return start(cmd, env if whole_env else {**ENV, **(env or {})}, **kw)


def _torchrun(args, nproc=2, restarts=0, env=None):
    return _start(torchrun_cmd(args, nproc, restarts), env)


def _finish(proc, timeout):
    """(exit code, output) of ``proc``; a test fails when it does not end within ``timeout`` (a hang)."""
    code, out, hung = finish(proc, timeout)
    if hung:
        pytest.fail(f"no exit within {timeout} s (a hang):\n{out[-3000:]}")
    return code, out


_steps, _pids_with = logged_steps, pids_with
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa["step"] == wb["step"]
    for key, value in wa["model"].items():
        assert torch.equal(value, wb["model"][key]), key
    for idx, state in wa["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], wb["optimizer"]["state"][idx]["exp_avg_sq"]), idx


@pytest.fixture(scope="module")
def uninterrupted(images, tmp_path_factory):
    """The 2-process run that nothing interrupts: the reference every fault must end at, bit for bit."""
    out = tmp_path_factory.mktemp("reference") / "run"
    code, log = _finish(_torchrun(["pretrain", *RUN, "--data", str(images), "--output-dir", str(out)]), 300)
    assert code == 0, log[-3000:]
    return out / "checkpoint-last.pth"


def _launch(args, restarts=1, env=None):
    """``fastmae launch`` from an environment without TORCH_DISABLE_SHARE_RDZV_TCP_STORE (it sets it itself)."""
    plain = {k: v for k, v in ENV.items() if k != "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"}
    cmd = [sys.executable, "-m", "fastmae.cli", "launch", "--nproc-per-node", "2", f"--max-restarts={restarts}",
           "--monitor-interval=0.5", *args]  # fmt: skip
    return _start(cmd, {**plain, **(env or {})}, whole_env=True)


@pytest.mark.parametrize("form, kill_after", [("torchrun", 20), ("fastmae launch", 36)])
def test_killed_rank_restarts_and_ends_bit_identical(images, uninterrupted, tmp_path, form, kill_after):
    """The two launch forms of docs/long-runs.md (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun ..., and ``fastmae
    launch``, which sets it; --max-restarts, --resume auto): rank 1 is SIGKILLed mid-run, torchrun restarts both
    ranks, they resume from the last checkpoint and finish with the weights of the run that was never interrupted.
    Killed at two different points (after the second checkpoint, and past the fourth). (It ran three times, twice in
    the torchrun form; the second torchrun run proved nothing the first does not.)"""
    out, marker = tmp_path / "run", uuid.uuid4().hex
    args = ["pretrain", *RUN, "--data", str(images), "--output-dir", str(out), "--resume", "auto"]
    start = _launch if form == "fastmae launch" else lambda a, env: _torchrun(a, restarts=1, env=env)
    proc = start(args, env={"FASTMAE_TEST_RUN": marker})
    assert wait_for_step(proc, out, kill_after), "the run ended before the kill"
    victims = _pids_with(marker, rank="1")
    assert len(victims) == 1
    os.kill(victims[0], signal.SIGKILL)
    code, log = _finish(proc, 240)
    assert code == 0, log[-3000:]
    assert "resumed from" in log and "Traceback" not in log.split("resumed from")[-1]
    _assert_same_weights(out / "checkpoint-last.pth", uninterrupted)


def test_plain_torchrun_restart_ends_within_the_dist_timeout(images, uninterrupted, tmp_path):
    """torchrun's plain form (its rendezvous store shared with the workers), a rank SIGKILLed, one restart: restarted
    ranks often hang in the gloo constructor past torch's own timeout, or fail to join. Whatever happens ends within
    --dist-timeout (15 s here): bit-identical when the restart worked, else one line per restarted rank naming the
    variable that makes restarts reliable."""
    out, marker = tmp_path / "run", uuid.uuid4().hex
    plain = {k: v for k, v in ENV.items() if k != "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"}
    cmd = torchrun_cmd(["pretrain", *RUN, "--data", str(images), "--output-dir", str(out), "--resume", "auto",
                        "--dist-timeout", "0.25"], restarts=1)  # fmt: skip
    proc = _start(cmd, {**plain, "FASTMAE_TEST_RUN": marker}, whole_env=True)
    assert wait_for_step(proc, out, 20), "the run ended before the kill"
    os.kill(_pids_with(marker, rank="1")[0], signal.SIGKILL)
    t0 = time.monotonic()
    code, log = _finish(proc, 120)
    assert time.monotonic() - t0 < 90, log[-3000:]
    if code == 0:
        _assert_same_weights(out / "checkpoint-last.pth", uninterrupted)
        return
    after = log.split("lost another rank", 1)[-1]
    lines = [line for line in after.splitlines() if line.startswith("fastmae: error:")]
    assert lines and all("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun" in line for line in lines), log[-3000:]
    assert all("within --dist-timeout 0.25 min" in line for line in lines)
    assert len(lines) == len({line.split(":")[2] for line in lines}) <= 2  # one line per restarted rank


def _fastmae(args, env=None, preexec=None, timeout=300):
    """``fastmae ARGS`` in a child process of its own; returns (exit code, output)."""
    return _finish(_start([sys.executable, "-m", "fastmae.cli", *args], env, preexec_fn=preexec), timeout)


ONE = [a if a != "24" else "12" for a in RUN]  # one process, batch 2 over 16 images: 8 steps an epoch, 96 in all


@pytest.fixture(scope="module")
def one_process(images, tmp_path_factory):
    """One process, no worker processes, nothing interrupted: the reference of the one-process faults."""
    out = tmp_path_factory.mktemp("one") / "run"
    code, log = _fastmae(["pretrain", *ONE, "--data", str(images), "--output-dir", str(out)])
    assert code == 0, log[-3000:]
    return out


def test_killed_dataloader_worker_costs_no_step(images, one_process, tmp_path):
    """The out-of-memory killer's usual victim: a DataLoader worker SIGKILLed mid-run. The workers start again at
    the batch reached and the run ends with the weights of the run without worker processes, bit for bit."""
    out, marker = tmp_path / "run", uuid.uuid4().hex
    args = [*ONE[:-2], "--num-workers", "2", "--data", str(images), "--output-dir", str(out)]
    proc = _start([sys.executable, "-m", "fastmae.cli", "pretrain", *args], {"FASTMAE_TEST_RUN": marker})
    assert wait_for_step(proc, out, 30), "the run ended before the kill"
    workers = _pids_with(marker, workers=True)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    code, log = _finish(proc, 240)
    assert code == 0, log[-3000:]
    assert f"DataLoader worker pid {workers[0]} (SIGKILL) died at batch" in log and "starting the workers again" in log
    assert "Traceback" not in log
    _assert_same_weights(out / "checkpoint-last.pth", one_process / "checkpoint-last.pth")


def test_unreadable_last_checkpoint_falls_back_to_a_numbered_one(images, one_process, tmp_path):
    """checkpoint-last.pth cut short (a dying file system): --resume auto warns, naming both files, resumes from the
    newest readable checkpoint-<step>.pth and ends where the uninterrupted run ends."""
    out = tmp_path / "run"
    base = ["pretrain", *ONE, "--data", str(images), "--output-dir", str(out), "--keep-every", "16"]
    code, log = _fastmae([*base, "--stop-after-steps", "40"])
    assert code == 0, log[-3000:]
    last = out / "checkpoint-last.pth"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    code, log = _fastmae([*base, "--resume", "auto"])
    assert code == 0, log[-3000:]
    assert f"{last} is truncated or corrupt" in log and "resuming from checkpoint-0000032.pth (step 32) instead" in log
    _assert_same_weights(last, one_process / "checkpoint-last.pth")


def _limit_file_size(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_save_beyond_the_file_size_limit_is_one_line_and_keeps_the_old_checkpoint(images, one_process, tmp_path):
    """A save that cannot be written (here a real RLIMIT_FSIZE: the kernel refuses the write with EFBIG) ends in one
    line naming the folder, what was needed and what is free; the previous checkpoint is untouched."""
    out = tmp_path / "run"
    out.mkdir()
    last = out / "checkpoint-last.pth"
    last.write_bytes((one_process / "checkpoint-last.pth").read_bytes())
    before = last.read_bytes()
    size = len(before)
    code, log = _fastmae(["pretrain", *ONE, "--data", str(images), "--output-dir", str(out), "--resume", "auto",
                          "--epochs", "13"], preexec=_limit_file_size(size // 2))  # fmt: skip
    lines = [line for line in log.splitlines() if line.startswith("fastmae: error:")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in log, log[-3000:]
    assert f"cannot save checkpoint-last.pth in {out}: the file size limit (ulimit -f) is reached" in lines[0]
    assert "it needs about" in lines[0] and "free on that disk" in lines[0]
    assert "checkpoint-last.pth there is the previous one, intact" in lines[0]
    assert "less than one checkpoint" in log  # the warning at the start
    assert last.read_bytes() == before and not list(out.glob(".checkpoint-last.pth.*.tmp"))


def test_full_disk_is_one_line_and_keeps_the_old_checkpoint(images, one_process, tmp_path):
    """A real full disk: a 1.5-checkpoint tmpfs mounted in a user and mount namespace (unshare -rm), a resumed run
    writing its next checkpoint there. Warned at the start, one line at the save, the old checkpoint intact."""
    ckpt = one_process / "checkpoint-last.pth"
    size = ckpt.stat().st_size
    mnt = tmp_path / "small"
    mnt.mkdir()
    script = (f'mount -t tmpfs -o size={size * 3 // 2} tmpfs "{mnt}" && cp "{ckpt}" "{mnt}/checkpoint-last.pth" && '
              f'"{sys.executable}" -m fastmae.cli pretrain {" ".join(ONE)} --data "{images}" '
              f'--output-dir "{mnt}" --resume auto --epochs 13; echo "exit=$?"; '
              f'cmp "{ckpt}" "{mnt}/checkpoint-last.pth" && echo intact; ls -a "{mnt}"')  # fmt: skip
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"user + mount namespaces are not available here: {probe.stderr.decode().strip()}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                          env=ENV)  # fmt: skip
    log = proc.stdout + proc.stderr
    lines = [line for line in log.splitlines() if line.startswith("fastmae: error:")]
    assert "exit=1" in log and len(lines) == 1 and "Traceback" not in log, log[-3000:]
    assert f"cannot save checkpoint-last.pth in {mnt}: the disk is full (it needs about" in lines[0]
    assert "less than two checkpoints" in log and "intact" in log.splitlines()
    assert ".checkpoint-last.pth." not in log  # no temp file left behind


def test_missing_peer_is_one_line_within_the_dist_timeout(images, tmp_path):
    """Rank 0 of 2 whose peer never comes: one line and exit 1 after --dist-timeout (6 s here), not a hang."""
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}  # fmt: skip
    t0 = time.monotonic()
    code, log = _fastmae(["pretrain", *ONE, "--data", str(images), "--output-dir", str(tmp_path / "run"),
                          "--dist-timeout", "0.1"], env=env, timeout=120)  # fmt: skip
    lines = [line for line in log.splitlines() if line.startswith("fastmae: error:")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in log, log[-3000:]
    assert "rank 0 of 2 (torchrun): could not join the gloo process group at 127.0.0.1:" in lines[0]
    assert "within --dist-timeout 0.1 min" in lines[0] and time.monotonic() - t0 < 100


def test_lost_peer_saves_the_last_whole_step_and_a_resume_ends_bit_identical(images, uninterrupted, tmp_path):
    """No restarts left: rank 1 SIGKILLed, rank 0's collective fails; it saves the last whole step alone and ends
    with one line. The same command with --resume auto then ends with the uninterrupted run's weights."""
    out, marker = tmp_path / "run", uuid.uuid4().hex
    args = ["pretrain", *RUN, "--data", str(images), "--output-dir", str(out), "--resume", "auto"]
    proc = _torchrun(args, env={"FASTMAE_TEST_RUN": marker})
    assert wait_for_step(proc, out, 30), "the run ended before the kill"
    os.kill(_pids_with(marker, rank="1")[0], signal.SIGKILL)
    code, log = _finish(proc, 120)
    assert code != 0
    lines = [line for line in log.splitlines() if "fastmae: error: rank 0 of 2: lost another rank" in line]
    assert len(lines) == 1 and "; saved " in lines[0], log[-3000:]
    step = torch.load(out / "checkpoint-last.pth", weights_only=True)["step"]
    assert step >= 30 and f"after step {step};" in lines[0]
    code, log = _finish(_torchrun(args), 240)
    assert code == 0, log[-3000:]
    _assert_same_weights(out / "checkpoint-last.pth", uninterrupted)


def test_two_processes_with_only_slurm_variables_are_one_ddp_run(images, uninterrupted, tmp_path):
    """What srun starts without torchrun: SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, the node list and the job id,
    nothing else. The two tasks form one DDP run (master: the node list's first host, a port from the job id) and end
    with the weights of the torchrun run."""
    out = tmp_path / "run"
    job = str(10_000 + os.getpid() % 20_000)
    base = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                      "MASTER_PORT", "LOCAL_WORLD_SIZE")}  # fmt: skip
    slurm = {"SLURM_NTASKS": "2", "SLURM_JOB_ID": job, "SLURM_JOB_NODELIST": "localhost", "SLURM_STEP_ID": "0",
             "SLURM_NTASKS_PER_NODE": "2"}  # fmt: skip
    cmd = [sys.executable, "-m", "fastmae.cli", "pretrain", *RUN, "--data", str(images), "--output-dir", str(out)]
    procs = [_start(cmd, {**base, **slurm, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)}, whole_env=True)
             for r in range(2)]  # fmt: skip
    logs = [_finish(p, 300) for p in procs]
    assert [code for code, _ in logs] == [0, 0], logs[0][1][-2000:] + logs[1][1][-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] and summary["parallel"] == "ddp"
    assert logs[1][1].strip() == ""  # rank 1 is quiet
    _assert_same_weights(out / "checkpoint-last.pth", uninterrupted)


def _slurm_tasks(args, values, tmp_path, count=2):
    """``count`` processes with only SLURM's variables (``values`` plus SLURM_PROCID / SLURM_LOCALID each), no
    torchrun variable, and no ``scontrol`` on PATH; returns [(exit code, output)] in rank order."""
    base = {k: v for k, v in ENV.items() if k not in (*LAUNCH_VARS, "PATH") and not k.startswith("SLURM_")}
    bin_dir = tmp_path / "no-scontrol"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").symlink_to(sys.executable)
    base["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    assert shutil.which("scontrol", path=base["PATH"]) is None
    procs = [_start([sys.executable, "-m", "fastmae.cli", *args], {**base, **values, "SLURM_PROCID": str(r),
                                                                   "SLURM_LOCALID": str(r)}, whole_env=True)
             for r in range(count)]  # fmt: skip
    return [_finish(p, 300) for p in procs]


# The environment: what a hand-made launch (or an MPI launcher) gives each task; no SLURM_STEP_ID.
SLURM_ONLY = {"SLURM_NTASKS": "2", "SLURM_NODEID": "0", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "localhost",
              "SLURM_TASKS_PER_NODE": "2"}  # fmt: skip


def test_slurm_tasks_without_step_id_or_scontrol_form_one_run(images, tmp_path):
    """Two processes with only SLURM_* variables, no SLURM_STEP_ID and no scontrol: one DDP run of two processes
    into the folder (it was two one-process runs writing the same files, one of them ending in a traceback)."""
    out = tmp_path / "run"
    args = ["pretrain", "--device", "cpu", "--num-workers", "0", "--batch-size", "2", "--stop-after-steps", "6",
            "--output-dir", str(out), "--data", str(images), "--no-progress", "--picture-every", "0"]  # fmt: skip
    job = {**SLURM_ONLY, "SLURM_JOB_ID": str(30_000 + os.getpid() % 10_000)}
    logs = _slurm_tasks(args, job, tmp_path)
    assert [code for code, _ in logs] == [0, 0], logs[0][1][-2000:] + logs[1][1][-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["parallel"] == "ddp" and summary["ranks_in_sync"]
    assert summary["steps"] == 6 and "2 processes (ddp)" in logs[0][1] and "Traceback" not in logs[1][1]


@pytest.mark.parametrize(
    ("values", "message"),
    [({"SLURM_NNODES": "2", "SLURM_JOB_NODELIST": ""}, "the job has 2 nodes but none of SLURM_STEP_NODELIST"),
     ({"SLURM_JOB_NODELIST": "node[01-"}, "SLURM_JOB_NODELIST: cannot read the SLURM node list 'node[01-'")],
)  # fmt: skip
def test_slurm_tasks_that_cannot_form_a_run_stop_in_one_line_each(images, tmp_path, values, message):
    """SLURM's variables that do not say where the master is: every task stops with one line, nothing is written."""
    out = tmp_path / "run"
    args = ["pretrain", *ONE, "--data", str(images), "--output-dir", str(out)]
    job = {**SLURM_ONLY, "SLURM_JOB_ID": "12", **values}
    for code, log in _slurm_tasks(args, {k: v for k, v in job.items() if v}, tmp_path):
        lines = [line for line in log.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("fastmae: error: ") and message in lines[0], log
    assert not out.exists()


def test_a_folder_another_run_is_writing_is_refused_in_one_line(images, one_process, tmp_path):
    """Two runs never write one folder: while another process holds the folder's lock (here this test, with the
    same POSIX record lock a run takes), a run into it stops with one line naming that process, and touches nothing."""
    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint-last.pth", "config.json"):
        (out / name).write_bytes((one_process / name).read_bytes())
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    with open(out / ".fastmae.lock", "w") as held:
        fcntl.lockf(held, fcntl.LOCK_EX)
        code, log = _fastmae(["pretrain", *ONE, "--data", str(images), "--output-dir", str(out), "--resume", "auto"])
    lines = [line for line in log.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, log
    assert lines[0] == (f"fastmae: error: --output-dir {out} is being written by another fastmae run (pid "
                        f"{os.getpid()}); wait for it to end, or choose another --output-dir")  # fmt: skip
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.name != ".fastmae.lock"} == {
        k: v for k, v in before.items() if k != ".fastmae.lock"}  # fmt: skip


FAKE_SRUN = """#!{python}
# srun for the tests: SLURM_NTASKS copies of the command on this machine, each with SLURM_PROCID / SLURM_LOCALID /
# SLURM_STEP_ID; SIGTERM forwarded; --kill-on-bad-exit kills the others when one fails.
import os, signal, subprocess, sys, time
args, kill_on_bad = sys.argv[1:], False
while args and args[0].startswith("-"):
    kill_on_bad |= args[0].startswith("--kill-on-bad-exit")
    args = args[1:]
tasks = int(os.environ["SLURM_NTASKS"])
procs = [subprocess.Popen(args, env={{**os.environ, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r),
                                      "SLURM_STEP_ID": "0"}}) for r in range(tasks)]
signal.signal(signal.SIGTERM, lambda *_: [p.send_signal(signal.SIGTERM) for p in procs if p.poll() is None])
codes = [None] * tasks
while None in codes:
    for i, p in enumerate(procs):
        if codes[i] is None and p.poll() is not None:
            codes[i] = p.returncode
            if codes[i] != 0 and kill_on_bad:
                [q.kill() for q in procs if q.poll() is None]
    time.sleep(0.05)
sys.exit(0 if all(c == 0 for c in codes) else 1)
"""


@pytest.fixture
def slurm_job(images, tmp_path):
    """A SLURM job's environment for examples/slurm/pretrain.sbatch, with stand-ins for srun and scontrol."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN.format(python=sys.executable))
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    marker = uuid.uuid4().hex
    env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                     "MASTER_PORT", "LOCAL_WORLD_SIZE")}  # fmt: skip
    env.update({"PATH": f"{bin_dir}:{env['PATH']}", "SLURM_JOB_ID": str(20_000 + os.getpid() % 10_000),
                "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "localhost",
                "DATA": str(images), "OUT": str(tmp_path / "run"), "PRESET": "demo", "EXTRA": " ".join(RUN),
                "FASTMAE": f"{sys.executable} -m fastmae.cli", "MAX_RESTARTS": "1", "FASTMAE_TEST_RUN": marker})
    script = Path(__file__).resolve().parents[1] / "examples" / "slurm" / "pretrain.sbatch"
    start = lambda: _start(["bash", str(script)], env, whole_env=True)
    return start, tmp_path / "run", marker, tmp_path / "scontrol.log"


def test_sbatch_script_restarts_a_killed_task(slurm_job, uninterrupted):
    """examples/slurm/pretrain.sbatch under a stand-in srun: a task SIGKILLed mid-run ends the step, the script
    starts it again, the run resumes and ends with the weights of the run that was never interrupted."""
    start, out, marker, _ = slurm_job
    proc = start()
    assert wait_for_step(proc, out, 30), "the run ended before the kill"
    os.kill(_pids_with(marker, rank="1", key="SLURM_PROCID")[0], signal.SIGKILL)
    code, log = _finish(proc, 300)
    assert code == 0, log[-3000:]
    assert "attempt 0 ended with exit code 1; starting again" in log and "resumed from" in log
    _assert_same_weights(out / "checkpoint-last.pth", uninterrupted)


def test_sbatch_script_requeues_at_the_time_limit_signal(slurm_job, uninterrupted):
    """SLURM's --signal=TERM before the time limit: the tasks save and exit 0, the script requeues the job; the
    requeued job resumes and ends bit-identical to the uninterrupted run."""
    start, out, marker, scontrol = slurm_job
    proc = start()
    assert wait_for_step(proc, out, 20), "the run ended before the signal"
    for pid in _pids_with(marker, key="SLURM_PROCID"):
        os.kill(pid, signal.SIGTERM)
    code, log = _finish(proc, 120)
    assert code == 0 and "requeueing job" in log, log[-3000:]
    assert scontrol.read_text().split() == ["requeue", str(20_000 + os.getpid() % 10_000)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM" and summary["steps"] < 96
    code, log = _finish(start(), 300)  # the requeued job
    assert code == 0 and "requeueing" not in log, log[-3000:]
    _assert_same_weights(out / "checkpoint-last.pth", uninterrupted)


def test_sbatch_script_default_keeps_the_recipe_batch(tmp_path):
    """examples/slurm/pretrain.sbatch as the README submits it (no PRESET, no EXTRA) under the stand-in srun with the
    job's 64 tasks: ViT-L/16 at batch 64 x accum 1 x 64 tasks, the recipe's effective 4096 (each task resolves its
    configuration and prints it instead of training: the FASTMAE stand-in adds --print-config)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN.format(python=sys.executable))
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    (bin_dir / "fastmae").write_text(f'#!/bin/sh\nexec {sys.executable} -m fastmae.cli "$@" --print-config\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {k: v for k, v in ENV.items() if k not in LAUNCH_VARS}
    env.update({"PATH": f"{bin_dir}:{env['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "64",
                "SLURM_NTASKS_PER_NODE": "64", "SLURM_JOB_NODELIST": "localhost", "DATA": str(tmp_path),
                "OUT": str(tmp_path / "run"), "FASTMAE": str(bin_dir / "fastmae")})  # fmt: skip
    script = Path(__file__).resolve().parents[1] / "examples" / "slurm" / "pretrain.sbatch"
    code, log = _finish(_start(["bash", str(script)], env, whole_env=True), 240)
    assert code == 0, log[-3000:]
    config, _ = json.JSONDecoder().raw_decode(log[log.index("{"):])  # rank 0's; the other tasks print nothing
    assert log.count('"command": "pretrain"') == 1
    assert (config["model"], config["world_size"], config["recipe_batch"]) == ("mae_vit_large_patch16", 64, 4096)
    assert (config["batch_size"], config["accum_iter"], config["effective_batch"]) == (64, 1, 4096)
    assert config["batch_choice"][0].startswith("batch 64 x accum 1 x 64 processes")
    assert not (tmp_path / "run").exists() and not (tmp_path / "scontrol.log").exists()  # nothing run or requeued


def test_a_run_killed_with_its_workers_alive_frees_its_folder_at_once(images, tmp_path):
    """The OOM killer's case: the main process SIGKILLed while its 2 DataLoader workers live on (they notice a few
    seconds later). The folder's lock dies with the process that took it, so a restart at once (torchrun's, a job
    script's) is not refused, and resumes."""
    out, marker = tmp_path / "run", uuid.uuid4().hex
    args = ["pretrain", *ONE, "--data", str(images), "--output-dir", str(out), "--resume", "auto"]
    args[args.index("--num-workers") + 1] = "2"
    proc = _start([sys.executable, "-m", "fastmae.cli", *args], {"FASTMAE_TEST_RUN": marker})
    try:
        assert wait_for_step(proc, out, 9), "the run ended before the kill"  # after the checkpoint of step 8
        children = _pids_with(marker, workers=True)
        assert len(children) == 2, children
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        alive = [pid for pid in children if Path(f"/proc/{pid}").exists()]
        again = [sys.executable, "-m", "fastmae.cli", *args, "--stop-after-steps", "12"]
        code, log = _finish(_start(again, {"FASTMAE_TEST_RUN": marker}), 180)
    finally:
        finish(proc, 1)
    assert alive, "the workers were gone before the restart: this run did not test the case"
    assert code == 0 and "being written by another fastmae run" not in log, log[-3000:]
    assert "resumed from" in log and "at step 8" in log.split("resumed from")[1].splitlines()[0], log[-3000:]
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["step"] == 12


def test_a_repeated_sigterm_changes_nothing_a_second_ctrl_c_stops_at_once():
    """Under srun a task can receive SIGTERM twice (from SLURM and forwarded by srun, docs/long-runs.md): the stop
    stays a clean one (finish the step, save); only a second Ctrl-C interrupts."""
    from fastmae.train.trainer import StopSignal

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == "SIGTERM" and stop.stopped_by(True) == "SIGTERM"
    with pytest.raises(KeyboardInterrupt), StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == "SIGINT"
        os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # the handlers put back
