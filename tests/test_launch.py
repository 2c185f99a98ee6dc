"""Who a process is from its launcher's variables (torchrun, SLURM with or without srun), SLURM node lists read in
Python, the deadline that bounds fastmae's own waits, and the command ``fastmae launch`` runs."""

import os
import subprocess
import sys
import time

import pytest
import torch
from fastmae.train import job
from fastmae.train.launch import launch_command

from fastmae.errors import FastMAEError

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def env():
    """A clean slate: no launcher variable of this process leaks into the case, and none the case sets (by hand or
    through export_slurm_env) leaks out of it: later tests call fastmae in this process."""
    saved = dict(os.environ)
    for key in [*LAUNCH_VARS, *(k for k in os.environ if k.startswith("SLURM_"))]:
        os.environ.pop(key, None)

    def set_env(**values):
        os.environ.update({key: str(value) for key, value in values.items()})

    job._EXPORTED.clear()
    yield set_env
    os.environ.clear()
    os.environ.update(saved)
    job._EXPORTED.clear()


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("localhost", ["localhost"]),
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("a,b", ["a", "b"]),
        ("gpu[07-09,12],cpu1", ["gpu07", "gpu08", "gpu09", "gpu12", "cpu1"]),
        ("rack[1-2]-n[8-10]", ["rack1-n8", "rack1-n9", "rack1-n10", "rack2-n8", "rack2-n9", "rack2-n10"]),
        ("n[9-11]", ["n9", "n10", "n11"]),
        (" x[3] ", ["x3"]),
    ],
)
def test_nodelist_expands_as_scontrol_show_hostnames(nodelist, hosts):
    assert job.expand_nodelist(nodelist) == hosts
    assert job.first_host(nodelist) == hosts[0]


@pytest.mark.parametrize(
    ("nodelist", "why"),
    [("node[01-", "unbalanced brackets"), ("a,,b", "an empty host name"), ("n[4-2]", "runs backwards"),
     ("n[a-c]", "is not a number or a range"), ("n]1[", "unbalanced brackets"), ("n[[1]]", "unbalanced")],
)  # fmt: skip
def test_unreadable_nodelist_names_the_list_and_why(nodelist, why):
    with pytest.raises(ValueError, match=why) as info:
        job.expand_nodelist(nodelist)
    assert repr(nodelist) in str(info.value)


ISSUE_TASK = dict(SLURM_NTASKS=2, SLURM_NODEID=0, SLURM_NNODES=1, SLURM_JOB_ID=77, SLURM_JOB_NODELIST="localhost",
                  SLURM_TASKS_PER_NODE=2)  # fmt: skip


def test_slurm_tasks_without_step_id_are_one_job(env):
    """The issue's environment: SLURM_PROCID/NTASKS/LOCALID and the node list, no SLURM_STEP_ID, no scontrol."""
    env(**ISSUE_TASK, SLURM_PROCID=1, SLURM_LOCALID=1)
    assert job.launcher() == "slurm" and job.dist_info() == (1, 2, 1) and job.without_step_id()
    job.export_slurm_env()
    assert os.environ["MASTER_ADDR"] == "localhost" and os.environ["MASTER_PORT"] == str(job.slurm_port("77"))
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_WORLD_SIZE"]) == ("1", "2", "2")
    # RANK is set now, yet the process stays a SLURM task without a step id (for the lines that report a wait)
    assert job.launcher() == "slurm" and job.without_step_id()
    from fastmae.train.distributed import wait_hint

    assert wait_hint().startswith("SLURM_STEP_ID is not set: if this is the batch script itself, start the tasks")


def test_the_batch_script_itself_is_not_a_task(env):
    env(**ISSUE_TASK, SLURM_PROCID=0, SLURM_STEP_ID="batch")
    assert job.launcher() == "none" and job.dist_info() == (0, 1, 0)
    env(SLURM_STEP_ID="0")  # srun's tasks
    assert job.launcher() == "slurm" and not job.without_step_id()


def test_one_task_without_step_id_is_one_process(env):
    env(SLURM_PROCID=0, SLURM_NTASKS=1, SLURM_JOB_ID=5)
    assert job.launcher() == "none"


def test_torchrun_variables_win(env):
    env(**ISSUE_TASK, SLURM_PROCID=1, RANK=3, WORLD_SIZE=4, LOCAL_RANK=1)
    assert job.launcher() == "torchrun" and job.dist_info() == (3, 4, 1)


def test_master_from_a_multi_node_list_and_local_rank_from_the_rank_on_one_node(env):
    env(SLURM_PROCID=5, SLURM_NTASKS=16, SLURM_LOCALID=5, SLURM_NNODES=2, SLURM_JOB_ID=9,
        SLURM_JOB_NODELIST="gpu[07-08]", SLURM_STEP_NODELIST="gpu[08,07]", SLURM_NTASKS_PER_NODE=8)  # fmt: skip
    job.export_slurm_env()
    assert os.environ["MASTER_ADDR"] == "gpu08"  # the step's own list comes first
    for key in LAUNCH_VARS:
        os.environ.pop(key)
    env(SLURM_PROCID=1, SLURM_NTASKS=2, SLURM_JOB_ID=9)
    for key in ("SLURM_LOCALID", "SLURM_NNODES", "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST"):
        os.environ.pop(key)
    assert job.dist_info() == (1, 2, 1)  # one node: the local rank is the rank
    job.export_slurm_env()
    assert os.environ["MASTER_ADDR"] == "localhost"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (dict(SLURM_PROCID=2, SLURM_NTASKS=2), "SLURM_PROCID=2 is not a task of SLURM_NTASKS=2"),
        (dict(SLURM_PROCID="x", SLURM_NTASKS=2), "SLURM_PROCID='x' is not a whole number"),
        (dict(SLURM_PROCID=1, SLURM_NTASKS=4, SLURM_NNODES=2), "SLURM_LOCALID is not set and the job has 2 nodes"),
        (dict(SLURM_PROCID=1, SLURM_NTASKS=4, SLURM_LOCALID=1, SLURM_NNODES=2, SLURM_JOB_ID=3),
         "the job has 2 nodes but none of SLURM_STEP_NODELIST, SLURM_JOB_NODELIST, SLURM_NODELIST is set"),
        (dict(SLURM_PROCID=1, SLURM_NTASKS=2, SLURM_LOCALID=1, SLURM_JOB_ID=3, SLURM_JOB_NODELIST="node[01-"),
         "SLURM_JOB_NODELIST: cannot read the SLURM node list 'node\\[01-'"),
        (dict(SLURM_PROCID=1, SLURM_NTASKS=2, SLURM_LOCALID=1), "SLURM_JOB_ID is not set"),
    ],
)  # fmt: skip
def test_what_cannot_be_read_is_one_line(env, values, message):
    env(**values)
    with pytest.raises(FastMAEError, match=message):
        job.export_slurm_env()


def test_launch_command_sets_the_store_switch_and_standalone(env):
    os.environ.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    cmd, cmd_env = launch_command(["--nproc-per-node", "2", "--max-restarts", "3", "pretrain", "--data", "d"])
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert cmd[4:] == ["--nproc-per-node", "2", "--max-restarts", "3", "-m", "fastmae.cli", "pretrain", "--data", "d"]
    assert cmd_env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    cmd, _ = launch_command(["--nnodes=2", "--rdzv-endpoint=h:29400", "--nproc_per_node=8", "finetune"])
    assert "--standalone" not in cmd and cmd[-3:] == ["-m", "fastmae.cli", "finetune"]
    cmd, _ = launch_command(["linprobe", "--batch-size", "8"])  # one process per visible GPU, at least 1
    assert cmd[3:9] == ["--standalone", "--nproc-per-node", str(max(1, torch.cuda.device_count())), "-m",
                        "fastmae.cli", "linprobe"]  # fmt: skip
    with pytest.raises(FastMAEError, match="name the command to run"):
        launch_command(["--nproc-per-node", "2"])


DEADLINE = """
import os, sys, threading
from fastmae.train.distributed import Deadline
deadline = Deadline(float(sys.argv[1]), "rank 1 of 2 (torchrun)")
with deadline("could not join the gloo process group at localhost:1"):
    if sys.argv[2] == "hang":
        threading.Event().wait()  # a wait that never ends, as a gloo constructor reading stale keys
print("joined")
with deadline("the other ranks did not reach a barrier"):
    pass
threading.Event().wait(2 * float(sys.argv[1]))  # disarmed: nothing happens after the deadline
print("done")
"""


@pytest.mark.parametrize("shared", [False, True])
def test_a_wait_past_its_deadline_ends_the_process_in_one_line(shared):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    if shared:
        env["TORCHELASTIC_USE_AGENT_STORE"] = "True"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", DEADLINE, "1.5", "hang"], capture_output=True, text=True, env=env,
                          timeout=60)  # fmt: skip
    took = time.monotonic() - t0
    assert proc.returncode == 1 and proc.stdout == "" and 1.5 <= took < 30
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fastmae: error: rank 1 of 2 (torchrun): could not join the gloo process group at "
                               "localhost:1 within --dist-timeout 0.025 min (the wait did not end); ")  # fmt: skip
    assert ("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in lines[0]) == shared
    ok = subprocess.run([sys.executable, "-c", DEADLINE, "0.5", "pass"], capture_output=True, text=True, env=env,
                        timeout=60)  # fmt: skip
    assert ok.returncode == 0 and ok.stdout.split() == ["joined", "done"] and ok.stderr == ""
