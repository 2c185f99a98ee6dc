"""A GPU sitting: stages of commands, each command with its own time budget inside one deadline, every JSON and log
under one run folder, that folder packed into the output folder as it is written, a short table last.
../shared/GPU.md says how a session uses it; ``benchmarks/sitting.sh`` is the one command a device call runs
(CONTRIBUTING.md, "GPU sittings": the exact call):

    bash benchmarks/sitting.sh 540                                  # the device call (timeout_s 540, carry .whl)
    python benchmarks/gpu_sitting.py --stage smoke,step,codec,feed --out RUN --deadline 450 --pack $OUT/sitting.tgz
    python benchmarks/gpu_sitting.py --stage smoke,step --dry-run   # the commands and their budgets only
    python benchmarks/gpu_sitting.py --table RUN                    # the table of a run folder
    python benchmarks/gpu_sitting.py --facts RUN/facts.json         # what the machine has, against GPU.md's claims
    python benchmarks/gpu_sitting.py --probe torchcodec             # one import probe (torchcodec, xformers, fastmae)
    python benchmarks/gpu_sitting.py --reap                         # end every process of this sitting still running

The plan (:data:`PLAN`, most value first; one call of 540 s holds about smoke and step, a second call the rest):
``smoke`` (every GPU-only path once, the real loop's fast path included), ``step`` (the step's ratio to eager and to
the compiled reference and its MFU at ViT-L and ViT-B, compiled per block, plain and as one CUDA graph; then ViT-L
compiled whole: regional against full compile time), ``codec`` (xformers' step, the attention table, TorchCodec's
decode), ``feed`` (the GPU loader's loop against the synthetic one, the loaders). Outside the plan: ``feed2``,
``step2``, ``bands`` (issue 43: the ViT-B step at 13 bands beside 3, and loading 13-band tiles on 16 cores), and older
stages.

What a sitting brings back even when it is cut short:

- **Rows as they are measured.** ``fastmae bench`` and the scripts rewrite their JSON (atomically) after every row;
  with ``--pack FILE`` the whole run folder is packed into FILE (one ``.tgz``, written atomically) every
  :data:`PACK_EVERY` seconds, after every command and at the end, so a call killed at any moment has its finished
  rows in its output folder.
- **Every command runs** until the deadline: one that fails is logged with its exit code and the stage goes on. Each
  command's limit is its own budget plus what the commands before it left, within its stage's budget and the
  sitting's ``--deadline``; a command left no time is logged as not run.
- **Nothing left running.** Each command runs in a process group of its own in the sitting's session (never a new
  session: the device tool ends a call's session, and a process in a session of its own would keep the GPU busy into
  the next call). At its limit its group gets SIGTERM, then SIGKILL with every descendant and every process that
  carries its marker in its environment (``FASTMAE_SITTING_COMMAND``). SIGTERM, SIGINT or SIGHUP to the sitting stops
  the running command the same way, logs it and every command not run, packs, and exits 143 (130, 129).
- **Slow is not failed.** Later commands adapt to smoke checks that *failed* (a failed CUDA-graph check drops
  ``--graphs``, a failed GPU-loader check the ``gpu`` loader); a check that timed out or was not run changes nothing.
- ``--resume``: commands that ran to their end in this run folder (``sitting.jsonl``) are skipped, so a second call on
  the same (warm) machine goes on where the first stopped.
- ``sitting.jsonl``: one line per command (stage, name, status: done / failed / stopped / interrupted / not run,
  exit, seconds, limit, adaptations); ``stage-NAME.log``: each command's output and its exit line.

Every command that needs a GPU says ``--device cuda``, so on a machine without one each fails at once (the tests and
the CPU rehearsals run whole sittings that way).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from gpu_smoke import checks_by_status, failed_checks  # noqa: E402

PY = sys.executable
# The GPU tests run in this one process: pyproject's addopts ask pytest-xdist for parallel workers, and the GPU
# machines' image has pytest without xdist (../shared/GPU.md), where `-n auto` would stop pytest at its arguments.
PYTEST = (PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra")
BENCH = [PY, "-m", "fastmae.cli", "bench"]
PLAN = "smoke,step,codec,feed"  # benchmarks/sitting.sh's default, most value first
PACK_EVERY = 5.0  # seconds between packs of the run folder while a command runs (a few ms each)
GRACE = 3.0  # seconds between a stopped command's SIGTERM and SIGKILL
MARKER, COMMAND_MARKER = "FASTMAE_SITTING", "FASTMAE_SITTING_COMMAND"  # environment markers every process inherits


@dataclass
class Cmd:
    """One command of a stage: ``name`` (the log's and ``sitting.jsonl``'s), ``argv``, its own ``budget`` in
    seconds, and ``on_fail``: for a smoke check that failed, argv tokens to drop (None) or replace."""

    name: str
    budget: float
    argv: list[str]
    on_fail: dict[str, dict[str, str | None]] = field(default_factory=dict)

    def adapted(self, failed: dict[str, str]) -> tuple[list[str], list[str]]:
        """(argv with the adaptations for the failed smoke checks, what was changed in words)."""
        argv, notes = list(self.argv), []
        for check, changes in self.on_fail.items():
            if check not in failed:
                continue
            for token, replacement in changes.items():
                if token in argv:
                    argv = [t for t in argv if t != token] if replacement is None else [
                        replacement if t == token else t for t in argv]  # fmt: skip
                    notes.append(f"smoke check {check} failed ({failed[check][:120]}): "
                                 + (f"dropped {token}" if replacement is None else f"{token} -> {replacement}"))
        return argv, notes


# seconds per stage; a stage's commands add up to at most its budget
BUDGETS = {"smoke": 110, "step": 310, "codec": 150, "feed": 340, "feed2": 380, "step2": 435, "bands": 260,
           "rehearse": 40, "quick": 450, 2: 480, 3: 480, 4: 480, 5: 480}  # fmt: skip
NO_GRAPHS = {"graphs-full": {"--graphs": None}}
NO_REGIONAL_GRAPHS = {"graphs-regional": {"--graphs": None}}


def stages(out: Path) -> dict[str, list[Cmd]]:
    """The commands of each stage, in the order they run (by value: a wrong fast path is worse than a slow one, so
    correctness first, then the headline); every result goes under ``out``."""
    cuda = ["--device", "cuda"]
    pretrain = [*BENCH, "--suite", "pretrain", *cuda, "--attn-table", str(out / "attention_table.json")]
    timing = ["--steps", "8", "--warmup", "3"]
    fast = ["--steps", "5", "--warmup", "2"]
    large, base = ["--models", "mae_vit_large_patch16"], ["--models", "mae_vit_base_patch16"]
    dec8 = ["--decoder-depths", "8"]
    jpegs = "/tmp/fastmae-feed-jpegs"  # on the machine's disk, not under out (nothing to bring back)
    smi = Cmd("nvidia-smi", 5, ["nvidia-smi"])
    # Batched decode of 256 ImageNet-like JPEGs: TorchCodec (hardware JPEG engine) vs torchvision's CUDA decode vs the
    # CPU decoders, one call each, pixels checked first.
    decode = Cmd("decode", 45, [PY, str(HERE / "bench_decode.py"), *cuda, "--images", "256", "--out",
                                str(out / "decode.json")])
    # ViT-B with the GPU loader decoding and augmenting beside the step, against the synthetic loader (no feed): what
    # the feed takes from the step. Eager (--compile off): the ratio is the question, and three compiles do not fit.
    # 20480 images at batch 256 (80 full batches an epoch: the training order drops none, so no short batch).
    feed_vs_synthetic = Cmd("e2e-feed", 150, [PY, str(HERE / "bench_e2e.py"), *cuda, "--data", jpegs, "--images",
                                              "20480", "--models", "mae_vit_base_patch16", "--loaders",
                                              "gpu,synthetic", "--workers", "16", "--compile", "off", "--steps",
                                              "100", "--skip", "30", "--out", str(out / "e2e-feed.json")])
    # The ViT-B step with xformers at both call sites (fastmae names the operators in its log; one compiled graph per
    # block as with SDPA), beside b8's auto rows of the step stage.
    b8_xformers = Cmd("b8-xformers", 60, [*pretrain, *base, *dec8, "--configs", "fastmae", "--compile", "regional",
                                          "--attn-backend", "xformers", *fast, "--out", str(out / "b8-xformers.json")])
    b8_auto = Cmd("b8-auto", 55, [*pretrain, *base, *dec8, "--configs", "fastmae", "--compile", "regional", *fast,
                                  "--out", str(out / "b8-auto.json")])
    attn = Cmd("attention", 40, [PY, str(HERE / "bench_attention.py"), *cuda, "--out", str(out / "attention.json"),
                                 "--write-table", str(out / "attention_table.json")])
    return {
        # 8 checks at a time (16 cores): the real loop's fast path and the compiling checks first (they take longest).
        "smoke": [Cmd("smoke", 110, [PY, str(HERE / "gpu_smoke.py"), "--out", str(out / "smoke.jsonl"),
                                     "--deadline", "100", "--jobs", "8"])],
        # The step at its limit (issues 26, 31, 45). ViT-L dec 8 compiled per block: fastmae first (its MFU), then
        # the mask-token encoder (the headline ratio: 3x promised, 2.40x on the H200), the compiled reference and
        # eager (the other ratios), each plain and as one CUDA graph, profiled (where the time goes); the same at
        # ViT-B (its MFU target); then ViT-L compiled whole (45-80 s to compile on the H200): regional against full
        # compile time (each row's warmup_s) and step rate, which chooses the default.
        "step": [Cmd("l8", 150, [*pretrain, *large, *dec8, "--configs",
                                 "fastmae,mask-token,compiled-reference,eager",
                                 "--compile", "regional", "--graphs", "--profile", *timing,
                                 "--out", str(out / "l8.json")], NO_REGIONAL_GRAPHS),
                 Cmd("b8", 80, [*pretrain, *base, *dec8, "--configs", "fastmae,mask-token,compiled-reference,eager",
                                "--compile",
                                "regional", "--graphs", *fast, "--out", str(out / "b8.json")], NO_REGIONAL_GRAPHS),
                 Cmd("l8-full", 80, [*pretrain, *large, *dec8, "--configs", "fastmae", "--compile", "full",
                                      "--graphs", *fast, "--out", str(out / "l8-full.json")], NO_GRAPHS)],
        # Issue 33's rows: the ViT-B step with xformers (beside b8's auto), the attention table per call site (xformers'
        # operators beside SDPA's kernels; auto reads it in later calls), TorchCodec's decode.
        "codec": [b8_xformers, attn, decode],
        # Feeding the step (issues 27, 33): the GPU loader's loop against the synthetic one; the loaders at 4, 8, 16
        # workers on 20480 ImageNet-like JPEGs (written first when missing, 16 processes), batch 256.
        "feed": [feed_vs_synthetic,
                 Cmd("loader", 180, [PY, str(HERE / "bench_loader.py"), *cuda, "--make-data", jpegs, "--data", jpegs,
                                     "--images", "20480", "--workers", "4,8,16", "--batch", "256", "--batches", "20",
                                     "--rounds", "2", "--settle", "1", "--loaders", "official,fastmae,decode,gpu",
                                     "--out", str(out / "loader.json")],
                     {"gpu-loader": {"official,fastmae,decode,gpu": "official,fastmae,decode"}})],
        # The real fastmae pretrain against the bare step at ViT-B and ViT-L dec 8 with the torchvision and the gpu
        # loader, compiled per block (three compiles per model).
        "feed2": [smi,
                  Cmd("e2e-b", 130, [PY, str(HERE / "bench_e2e.py"), *cuda, "--data", jpegs, "--images", "20480",
                                     "--models", "mae_vit_base_patch16", "--loaders", "torchvision,gpu", "--workers",
                                     "16", "--compile", "regional", "--steps", "120", "--skip", "40",
                                     "--out", str(out / "e2e-b.json")],
                      {"gpu-loader": {"torchvision,gpu": "torchvision"}}),
                  Cmd("e2e-l", 120, [PY, str(HERE / "bench_e2e.py"), *cuda, "--data", jpegs, "--images", "20480",
                                     "--models", "mae_vit_large_patch16", "--loaders", "gpu,torchvision", "--workers",
                                     "16", "--compile", "regional", "--steps", "80", "--skip", "30",
                                     "--out", str(out / "e2e-l.json")],
                      {"gpu-loader": {"gpu,torchvision": "torchvision"}})],
        # What the step stage leaves out: visible against mask-token, the compiled reference compiled whole (the
        # user's five-minute torch.compile), the optimizer alone, inductor's GEMM autotuning, decoder depth 1, the
        # ViT-L batch sweep (per block: each batch size is a compiled entry, not a whole recompile), auto beside b8.
        "step2": [Cmd("l8-mask-token", 70, [*pretrain, *large, *dec8, "--configs", "fastmae,mask-token", "--compile",
                                            "regional", *fast, "--out", str(out / "l8-mask-token.json")]),
                  Cmd("l8-reference-full", 90, [*pretrain, *large, *dec8, "--configs", "compiled-reference",
                                                "--compile", "full", *fast, "--out",
                                                str(out / "l8-reference-full.json")]),
                  Cmd("l8-optimizer", 30, [*pretrain, *large, *dec8, "--configs", "", "--optimizer-bench",
                                           "--out", str(out / "l8-optimizer.json")]),
                  Cmd("b8-autotune", 100, [*pretrain, *base, *dec8, "--configs", "fastmae", "--compile-mode",
                                           "max-autotune-no-cudagraphs", *fast, "--out",
                                           str(out / "b8-autotune.json")]),
                  Cmd("l1", 45, [*pretrain, *large, "--decoder-depths", "1", "--configs", "fastmae", "--compile",
                                 "regional", *fast, "--out", str(out / "l1.json")]),
                  Cmd("l8-batches", 45, [*pretrain, *large, *dec8, "--configs", "fastmae", "--compile", "regional",
                                         "--batches", "256,512", *fast, "--out", str(out / "l8-batches.json")]),
                  b8_auto],
        # Issue 43's multispectral row: the ViT-B step at 13 uint16 bands (normalised per band on the device) beside
        # 3 uint8 ones, same run, compiled per block; then loading 13-band tiles (SYNTHETIC, 264 px) with the
        # machine's 16 cores: fastmae's loader against the plain tifffile / numpy + torchvision v2 pipeline, batches
        # moved to the GPU (and the uint16 ones normalised there). 2048 tiles: 16 workers x 2 prefetched x batch 64
        # (written by 16 threads: about 110 ms a tile as TIFF and .npy on one core here, 2x with 2 threads).
        "bands": [Cmd("b8-bands", 110, [*pretrain, *base, *dec8, "--configs", "fastmae", "--compile", "regional",
                                        "--in-chans", "3,13", *fast, "--out", str(out / "b8-bands.json")]),
                  Cmd("loader-bands", 150, [PY, str(HERE / "bench_bands.py"), *cuda, "--images", "2048", "--workers",
                                            "16", "--batch", "64", "--batches", "10", "--rounds", "2", "--out",
                                            str(out / "bands-loader.json")])],
        # Stand-ins for the CPU rehearsals of a stop (tests/test_benchmarks.py, benchmarks/results/rehearsal-*): each
        # writes a JSON row every half second as a benchmark does; b first starts a child in a session of its own.
        "rehearse": [Cmd(n, budget, [PY, str(HERE / "gpu_sitting.py"), "--stand-in", str(out / f"rows-{n}.json"),
                                     "--rows", str(rows), *(["--stray"] if n == "b" else [])])
                     for n, budget, rows in (("a", 8, 3), ("b", 20, 30), ("c", 8, 3))],
        # The first sitting's headline (ran 2026-11-30), and the older stages.
        "quick": [smi,
                  Cmd("gpu-tests", 60, [*PYTEST, "-m", "gpu and not slow"]),
                  Cmd("l8", 160, [*pretrain, *fast, *large, *dec8, "--out", str(out / "l8.json")]),
                  Cmd("b8", 130, [*pretrain, *fast, *base, *dec8, "--out", str(out / "b8.json")]),
                  Cmd("loader", 95, [PY, str(HERE / "bench_loader.py"), *cuda, "--workers", "16", "--images", "10240",
                                     "--loaders", "official,fastmae,decode", "--rounds", "2",
                                     "--out", str(out / "loader.json")])],
        2: [Cmd("gpu-tests-slow", 300, [*PYTEST, "-m", "gpu and slow"]),
            Cmd("kernels", 180, [PY, str(HERE / "bench_kernels.py"), *cuda, "--out", str(out / "kernels.json")])],
        3: [Cmd("b1", 200, [*pretrain, *base, "--decoder-depths", "1", "--out", str(out / "b1.json")]),
            Cmd("l1", 280, [*pretrain, *large, "--decoder-depths", "1", "--out", str(out / "l1.json")])],
        4: [Cmd("h8", 480, [*pretrain, "--models", "mae_vit_huge_patch14", *dec8, "--out", str(out / "h8.json")])],
        5: [Cmd("finetune", 200, [PY, str(HERE / "bench_finetune.py"), *cuda, "--out", str(out / "finetune.json")]),
            Cmd("l8-profile", 280, [*pretrain, "--profile", *large, *dec8, "--out", str(out / "l8-profile.json")])],
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------ processes
class Stopped(Exception):
    """The sitting got SIGTERM, SIGINT or SIGHUP: the running command is stopped, the rest logged as not run."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def stop_on_signals() -> dict:
    """The first SIGTERM, SIGINT or SIGHUP raises :class:`Stopped` in the main thread (where the sitting waits); later
    ones are ignored, so that stopping, logging and packing run to their end. Returns the handlers it replaced."""

    def stop(signum, _frame):
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise Stopped(signum)

    return {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc: parent links), children before grandchildren."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _ancestors(pid: int) -> set[int]:
    out = set()
    while pid > 1:
        out.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out


def marked(name: str, value: str) -> list[int]:
    """The processes whose environment holds ``name=value`` (a marker every process of a command or a sitting
    inherits, also one that left its parent's process group or session), this process and its ancestors left out."""
    entry = f"{name}={value}".encode()
    spare = _ancestors(os.getpid())
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in spare:
            continue
        try:
            if entry in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _kill(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def kill_tree(proc: subprocess.Popen, marker: str | None = None, grace: float = GRACE) -> None:
    """Stop a command: SIGTERM to its process group (a benchmark or the smoke stage ends and says so), then after
    ``grace`` seconds SIGKILL to the group, every descendant (also those that started a session of their own) and every
    process carrying the command's ``marker``."""
    victims = set(_descendants(proc.pid))  # first: once the parent is dead, its children are no longer below it
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    end = time.monotonic() + grace
    while proc.poll() is None and time.monotonic() < end:
        time.sleep(0.05)
    victims |= set(_descendants(proc.pid)) | set(marked(COMMAND_MARKER, marker) if marker else ())
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    _kill(victims, signal.SIGKILL)


_RUN_ID: str | None = None  # this sitting's FASTMAE_SITTING, given to every command (main sets it)


def reap(run_id: str | None = None) -> list[int]:
    """SIGKILL every process of the sitting ``run_id`` (default: this sitting's, or this environment's
    ``FASTMAE_SITTING``) still running, found by the marker in its environment; returns their ids."""
    run_id = run_id or _RUN_ID or os.environ.get(MARKER)
    if not run_id:
        return []
    found = marked(MARKER, run_id)
    _kill(found, signal.SIGKILL)
    return found


def run_command(argv: list[str], limit: float, log, echo=True, marker: str | None = None) -> tuple[int | None, float,
                                                                                                    bool]:
    """(exit code, seconds, stopped at the limit) of ``argv`` in a process group of its own, its output into ``log``;
    127 when it cannot start. A :class:`Stopped` while it runs stops it (:func:`kill_tree`) and is raised again."""
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1", **({COMMAND_MARKER: marker} if marker else {}),
               **({MARKER: _RUN_ID} if _RUN_ID else {}))  # fmt: skip
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, process_group=0,
                                env=env)  # fmt: skip
    except OSError as exc:
        log.write(f"cannot start: {exc}\n")
        return 127, time.perf_counter() - t0, False

    def pump():
        for text in proc.stdout:
            if echo:
                sys.stdout.write(text)
                sys.stdout.flush()
            log.write(text)
            log.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    stopped = False
    try:
        try:
            code = proc.wait(timeout=max(limit, 0.1))
        except subprocess.TimeoutExpired:
            stopped = True
            kill_tree(proc, marker)
            code = proc.wait()
    except Stopped:  # (also in the middle of the kill above: it is done again, whole)
        kill_tree(proc, marker, grace=1.0)
        proc.wait()
        reader.join(timeout=5)
        raise
    reader.join(timeout=10)
    if marker and (strays := marked(COMMAND_MARKER, marker)):  # exited, and left a process running (a stray child)
        _kill(strays, signal.SIGKILL)
        log.write(f"# ended {len(strays)} process(es) it left running: {strays}\n")
    return code, time.perf_counter() - t0, stopped


# ------------------------------------------------------------------------------------------------ packing
class Packer:
    """The run folder packed into one ``.tgz`` (written beside it, then renamed: always a whole archive), on demand
    (:meth:`pack`) and every ``every`` seconds from a thread. Temporaries (names starting with ".") stay out."""

    def __init__(self, folder: Path, target: Path, every: float = PACK_EVERY):
        self.folder, self.target, self.every = Path(folder), Path(target), every
        self.lock, self.done = threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._loop, name="sitting-packer", daemon=True)

    def start(self) -> Packer:
        self.thread.start()
        return self

    def _loop(self) -> None:
        while not self.done.wait(self.every):
            self.pack()

    def pack(self) -> None:
        part = self.target.with_name(self.target.name + ".part")
        with self.lock:
            try:
                self.target.parent.mkdir(parents=True, exist_ok=True)
                with tarfile.open(part, "w:gz") as tar:
                    tar.add(self.folder, arcname=self.folder.name,
                            filter=lambda info: None if Path(info.name).name.startswith(".") else info)  # fmt: skip
                os.replace(part, self.target)
            except OSError as exc:  # a full disk must not end the sitting: the next pack tries again
                print(f"[sitting] packing {self.folder} into {self.target} failed: {exc}", flush=True)

    def stop(self) -> None:
        self.done.set()
        self.pack()


# ------------------------------------------------------------------------------------------------ stages
def _record(out: Path, record: dict) -> None:
    with open(out / "sitting.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _status(r: dict) -> str:
    """A ``sitting.jsonl`` record's status (records written before statuses existed: from run, stopped, exit)."""
    if r.get("status"):
        return r["status"]
    if not r.get("run"):
        return "not run"
    return "stopped" if r.get("stopped") else "done" if r.get("exit") == 0 else "failed"


def done_commands(out: Path) -> set[tuple[str, str]]:
    """(stage, command) of the commands that ran to their end in this run folder (``sitting.jsonl``): done or failed,
    not stopped at their limit, not interrupted, not left unrun."""
    path, done = out / "sitting.jsonl", set()
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if _status(r) in ("done", "failed"):
                done.add((str(r["stage"]), r["command"]))
    return done


def run_stage(name, commands: list[Cmd], out: Path, dry_run: bool, budget: float, failed: dict[str, str] | None = None,
              echo: bool = True, deadline: float | None = None, skip: set[tuple[str, str]] = frozenset(),
              packer: Packer | None = None) -> list[dict]:  # fmt: skip
    """Run a stage's commands in order, each logged to ``out/stage-<name>.log`` with its exit, none stopping the
    others; each gets its own budget plus what earlier ones left, the stage stops at ``budget`` seconds and the
    sitting at ``deadline`` (a ``time.monotonic()``). ``failed``: the smoke checks that failed (commands adapt);
    ``skip``: (stage, command) pairs already done. Returns one record per command (also in ``out/sitting.jsonl``).
    A :class:`Stopped` stops the running command, logs it, and is raised again."""
    failed = failed or {}
    stage_end = time.monotonic() + budget
    end = stage_end if deadline is None else min(stage_end, deadline)
    records = []
    for i, cmd in enumerate(commands):
        argv, notes = cmd.adapted(failed)
        line = " ".join(shlex.quote(c) for c in argv)
        if (str(name), cmd.name) in skip:
            print(f"[stage {name}] {cmd.name}: ran to its end earlier in this run folder: skipped", flush=True)
            continue
        print(f"[stage {name}] {cmd.name}: {line}  (budget {cmd.budget:g} s)", flush=True)
        for note in notes:
            print(f"[stage {name}] {cmd.name}: {note}", flush=True)
        if dry_run:
            continue
        reserve = sum(c.budget for c in commands[i + 1 :] if (str(name), c.name) not in skip)
        left = end - time.monotonic()
        limit = min(left, max(cmd.budget, left - reserve))  # its own budget, and what earlier commands left over
        out.mkdir(parents=True, exist_ok=True)
        record = {"stage": str(name), "command": cmd.name, "argv": line, "budget": cmd.budget, "adapted": notes}
        with open(out / f"stage-{name}.log", "a") as log:
            log.write(f"$ {line}\n" + "".join(f"# {note}\n" for note in notes))
            log.flush()
            if limit < 1:
                whose = "sitting's" if deadline is not None and deadline <= stage_end else f"stage's {budget:g} s"
                log.write(f"# not run: the {whose} time is spent\n")
                record.update(status="not run", exit=None, seconds=0.0, limit=0.0, stopped=False, run=False)
                print(f"[stage {name}] {cmd.name}: not run (the {whose} time is spent)", flush=True)
            else:
                marker = f"{os.environ.get(MARKER, os.getpid())}:{name}:{cmd.name}"
                try:
                    code, seconds, stopped = run_command(argv, limit, log, echo, marker)
                except Stopped as why:
                    log.write(f"# stopped: the sitting got {why} while this ran (command killed)\n")
                    record.update(status="interrupted", exit=None, seconds=None, limit=limit, stopped=True, run=True,
                                  signal=str(why))  # fmt: skip
                    _record(out, record)
                    print(f"[stage {name}] {cmd.name}: stopped by {why}", flush=True)
                    raise
                log.write(f"# exit {code} after {seconds:.0f} s" + (f" (stopped at its limit of {limit:.0f} s)"
                                                                    if stopped else "") + "\n")  # fmt: skip
                status = "stopped" if stopped else "done" if code == 0 else "failed"
                record.update(status=status, exit=code, seconds=seconds, limit=limit, stopped=stopped, run=True)
                print(f"[stage {name}] {cmd.name}: exit {code} after {seconds:.0f} s"
                      + (" (stopped at its limit)" if stopped else ""), flush=True)  # fmt: skip
        _record(out, record)
        records.append(record)
        if packer is not None:
            packer.pack()
    return records


def log_not_run(out: Path, plan: list[tuple[str, Cmd]], why: str) -> None:
    """Every command of ``plan`` logged (stage log and ``sitting.jsonl``) as not run, saying why."""
    for stage, cmd in plan:
        with open(out / f"stage-{stage}.log", "a") as log:
            log.write(f"$ {' '.join(shlex.quote(c) for c in cmd.argv)}\n# not run: {why}\n")
        _record(out, {"stage": str(stage), "command": cmd.name, "status": "not run", "exit": None, "seconds": 0.0,
                      "limit": 0.0, "stopped": False, "run": False, "why": why})  # fmt: skip


# ------------------------------------------------------------------------------------------------ facts, probes
# What ../shared/GPU.md says the machine's image has (both kinds, one image): the first command checks it.
GPU_MD = {"python": "3.12", "torch": "2.11", "triton": "3.6", "torchvision": "0.26", "cuda": "13"}
GPU_MD_ABSENT = ("torchcodec", "xformers", "nvidia-dali-cuda120", "nvidia-dali-cuda130")
_TORCH_FACTS = """
import json, platform, sys, time
t0 = time.perf_counter()
import torch
info = {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
        "cuda": torch.version.cuda, "import_torch_s": round(time.perf_counter() - t0, 1)}
for name in ("triton", "torchvision"):
    try:
        info[name] = __import__(name).__version__
    except Exception as exc:
        info[name] = f"not importable: {type(exc).__name__}: {exc}"[:200]
t0 = time.perf_counter()
info["cuda_available"] = torch.cuda.is_available()
if info["cuda_available"]:
    p = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info(0)
    info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(total / 2**30, 1),
                free_gib=round(free / 2**30, 1), sms=p.multi_processor_count,
                l2_mb=round(getattr(p, "L2_cache_size", 0) / 1e6, 1), gpus=torch.cuda.device_count())
info["cuda_init_s"] = round(time.perf_counter() - t0, 1)
print(json.dumps(info))
"""


def _run_probe(argv: list[str], timeout: float) -> dict:
    """``argv``'s output (stripped) and exit, or why it did not finish, in ``timeout`` seconds at most (its process
    group killed then)."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, process_group=0)
    except OSError as exc:
        return {"error": f"cannot start: {exc}", "seconds": 0.0}
    try:
        text, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        text, _ = proc.communicate()
        return {"error": f"timed out after {timeout:g} s", "output": text.strip()[-500:],
                "seconds": time.perf_counter() - t0}  # fmt: skip
    out = {"exit": proc.returncode, "output": text.strip()[-2000:], "seconds": round(time.perf_counter() - t0, 1)}
    if proc.returncode != 0:
        out["error"] = f"exit {proc.returncode}"
    return out


def facts(path: Path) -> dict:
    """What the machine has, each probe under its own timeout: nvidia-smi, Python, torch (its import time), CUDA,
    triton, torchvision, the GPU (name, capability, memory, multiprocessors), installed packages (no imports); and each
    of ../shared/GPU.md's claims said to hold or not. Written to ``path`` and printed."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(), "cpus": os.cpu_count()}
    smi = _run_probe(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,compute_cap",
                      "--format=csv,noheader"], 20)  # fmt: skip
    out["nvidia_smi"] = smi.get("output") if "error" not in smi else f"{smi['error']}: {smi.get('output', '')}"
    probe = _run_probe([sys.executable, "-c", _TORCH_FACTS], 120)
    try:
        out.update(json.loads(probe["output"].splitlines()[-1]))
    except (KeyError, IndexError, ValueError):
        out["torch_probe"] = probe
    out["packages"] = {}
    for name in ("timm", "transformers", "scikit-image", "pytest", "psutil", *GPU_MD_ABSENT):
        try:
            out["packages"][name] = version(name)
        except PackageNotFoundError:
            out["packages"][name] = None
    claims = []
    for key, want in GPU_MD.items():
        have = str(out.get(key))
        claims.append(f"{key} {want}: {'holds' if have.startswith(want) else 'DIFFERS'} ({have})")
    gpu, memory = str(out.get("gpu")), out.get("memory_gib") or 0
    kind = "H100" if "H100" in gpu else "H200" if "H200" in gpu else None
    want_memory = {"H100": (70, 85), "H200": (130, 145)}.get(kind, (1, 0))  # about 78 and 139 GiB; none else
    claims.append(f"an H100 80GB or an H200: {'holds' if kind else 'DIFFERS'} ({gpu})")
    claims.append(f"memory about 78 (H100) / 139 (H200) GiB: "
                  f"{'holds' if want_memory[0] <= memory <= want_memory[1] else 'DIFFERS'} ({memory} GiB)")  # fmt: skip
    for name in GPU_MD_ABSENT:
        have = out["packages"].get(name)
        claims.append(f"no {name}: {'holds' if have is None else 'DIFFERS'} ({have or 'absent'})")
    out["gpu_md"] = claims
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"[facts] {out.get('gpu', 'no GPU')} ({out.get('memory_gib', '?')} GiB, {out.get('sms', '?')} SMs, "
          f"capability {out.get('capability', '?')}); nvidia-smi: {out['nvidia_smi']}", flush=True)  # fmt: skip
    print(f"[facts] python {out.get('python')} torch {out.get('torch')} (CUDA {out.get('cuda')}, import "
          f"{out.get('import_torch_s')} s, CUDA init {out.get('cuda_init_s')} s) triton {out.get('triton')} "
          f"torchvision {out.get('torchvision')}; {out['cpus']} CPUs", flush=True)  # fmt: skip
    print("[facts] GPU.md: " + "; ".join(claims), flush=True)
    return out


_PROBES = {
    "torchcodec": """
import io, json, torch, torchcodec
from PIL import Image
from torchcodec.decoders import decode_jpeg
buf = io.BytesIO(); Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format="JPEG")
data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
info = {"torchcodec": torchcodec.__version__, "torch": torch.__version__, "cpu_decode": list(decode_jpeg(data).shape)}
if torch.cuda.is_available():
    info["cuda_decode"] = list(decode_jpeg([data], device="cuda")[0].shape)
print(json.dumps(info))
""",
    "xformers": """
import json, logging, xformers
from xformers.ops import fmha
info = {"xformers": xformers.__version__, "extension": bool(getattr(xformers, "_has_cpp_library", False)),
        "ops": [getattr(fmha, p).FwOp.NAME for p in ("flash", "cutlass")]}
print(json.dumps(info))
""",
    "fastmae": """
import json, torch, fastmae
from fastmae.kernels import _common
from fastmae.train.data.resample import backend_label
print(json.dumps({"fastmae": fastmae.__version__, "file": fastmae.__file__, "triton_interpreted": _common.INTERPRETED,
                  "cuda": torch.cuda.is_available(), "resample": backend_label()}))
""",
}


def probe(name: str, out: Path | None = None, timeout: float = 90) -> int:
    """Import one package in a process of its own under ``timeout`` and use it a little (:data:`_PROBES`); one JSON
    line printed (and appended to ``out``); exit 0 when it worked."""
    got = _run_probe([sys.executable, "-c", _PROBES[name]], timeout)
    try:
        record = {"probe": name, "ok": "error" not in got, **json.loads(got["output"].splitlines()[-1])}
    except (KeyError, IndexError, ValueError):
        lines = [line for line in str(got.get("output", "")).splitlines() if line.strip()]
        record = {"probe": name, "ok": False, "error": got.get("error") or "no output",
                  "last_line": (lines or [""])[-1][:300]}  # fmt: skip
    print(f"[probe] {json.dumps(record)}", flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0 if record["ok"] else 1


def stand_in(path: Path, rows: int, every: float = 0.5, stray: bool = False) -> int:
    """A benchmark's stand-in for the CPU rehearsals: ``rows`` rows, one every ``every`` seconds, the whole results
    file rewritten atomically after each (as the benchmarks write theirs). ``stray``: first a child in a session of its
    own that sleeps, a process a careless stop would leave running."""
    if stray:
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    done = []
    for k in range(rows):
        time.sleep(every)
        done.append({"name": "stand_in", "row": k, "time": time.time()})
        part = path.with_name(f".{path.name}.tmp")
        part.write_text(json.dumps({"env": {"gpu": "stand-in"}, "rows": done}))
        os.replace(part, path)
        print(f"{path.name}: row {k}", flush=True)
    return 0


# ------------------------------------------------------------------------------------------------ the table
def table(folder: Path) -> str:
    """One line per pretrain-step row (or what it failed with) and a count of the other rows, from every results
    JSON in ``folder``; then the facts, the probes, the smoke checks by status and every command's end."""
    lines = ["| file | model | dec | config | encoder | compile | variant | img/s | MFU | warm-up s | top kernel |",
             "| --- | --- | ---: | --- | --- | --- | --- | ---: | ---: | ---: | --- |"]  # fmt: skip
    others, band_rates = {}, []
    for path in sorted(folder.glob("*.json")):
        try:
            rows = json.loads(path.read_text()).get("rows", [])
        except (OSError, ValueError, AttributeError):
            continue
        for r in rows:
            if r.get("name") == "loader" and r.get("bands") and "img_per_s" in r:  # bench_bands.py's rows
                vs = "" if r.get("vs_plain") is None else f" ({r['vs_plain']:.2f}x plain)"
                band_rates.append(f"{r['loader']} ({r['bands']} bands) {r['workers']} workers {r['img_per_s']:.0f} "
                                  f"img/s{vs}")  # fmt: skip
            if r.get("name") != "pretrain_step":
                others[r.get("name", "?")] = others.get(r.get("name", "?"), 0) + 1
                continue
            bands = "" if r.get("in_chans", 3) == 3 else f" ({r['in_chans']} bands)"
            head = (f"| {path.name} | {r['model']}{bands} | {r['decoder_depth']} | {r['config']} | "
                    f"{r['encoder_mode']} | {r.get('compile')} | {r.get('variant', 'plain')} |")  # fmt: skip
            if r.get("error") or r.get("oom"):
                lines.append(f"{head} failed: {(r.get('error') or 'out of memory')[:80]} | | | |")
                continue
            top = (r.get("profile") or [{}])[0]
            mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
            warm = "n/a" if r.get("warmup_s") is None else f"{r['warmup_s']:.0f}"
            kernel = f"{top['kernel'][:40]} {100 * top['share']:.0f}%" if top else "-"
            lines.append(f"{head} {r['img_per_s']:.1f} | {mfu} | {warm} | {kernel} |")
    lines.append("other rows: " + (", ".join(f"{k} {v}" for k, v in sorted(others.items())) or "none"))
    if band_rates:
        lines.append("band loaders: " + "; ".join(band_rates))
    facts_file = folder / "facts.json"
    if facts_file.exists():
        f = json.loads(facts_file.read_text())
        differ = ", ".join(c for c in f.get("gpu_md", []) if "DIFFERS" in c)
        lines.append(f"facts: {f.get('gpu', 'no GPU')}, python {f.get('python')}, torch {f.get('torch')}, triton "
                     f"{f.get('triton')}, torchvision {f.get('torchvision')}; GPU.md: "
                     f"{differ or 'every claim holds'}")  # fmt: skip
    probes = folder / "probes.jsonl"
    if probes.exists():
        found = [json.loads(line) for line in probes.read_text().splitlines() if line.strip()]
        lines.append("probes: " + ", ".join(f"{p['probe']} {'ok' if p['ok'] else 'FAIL'}" for p in found))
    smoke = folder / "smoke.jsonl"
    if smoke.exists():
        by = checks_by_status(smoke)
        lines.append("smoke: " + "; ".join(f"{status} {len(names)}" + (f" ({', '.join(names)})" if names and status
                                                                        != "pass" else "")
                                           for status, names in by.items()))  # fmt: skip
    sitting = folder / "sitting.jsonl"
    if sitting.exists():
        records = [json.loads(line) for line in sitting.read_text().splitlines() if line.strip()]

        def end(r: dict) -> str:
            status = _status(r)
            return status if status in ("not run", "interrupted") else f"{status} (exit {r.get('exit')})"

        lines.append("commands: " + ", ".join(f"{r['stage']}/{r['command']} {end(r)}" for r in records))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", default=None, help=f"comma-separated stages (the plan: {PLAN}; also feed2, step2, "
                    "quick, 2, 3, 4, 5)")  # fmt: skip
    ap.add_argument("--out", default="benchmarks/results/sitting", help="the run folder: every JSON and log")
    ap.add_argument("--budget", type=float, default=None, help="seconds per stage (default: each stage's own)")
    ap.add_argument("--deadline", type=float, default=None, help="seconds for the whole sitting (default: none)")
    ap.add_argument("--pack", default=None, metavar="TGZ", help="pack the run folder into this file as it is written")
    ap.add_argument("--resume", action="store_true", help="skip the commands that ran to their end in --out")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--table", default=None, metavar="DIR", help="only print the table of the run folder DIR")
    ap.add_argument("--facts", default=None, metavar="JSON", help="only record what the machine has, into JSON")
    ap.add_argument("--probe", default=None, choices=sorted(_PROBES), help="only probe one package's import")
    ap.add_argument("--probe-out", default=None, metavar="JSONL", help="with --probe: append its line here")
    ap.add_argument("--reap", action="store_true", help="only end every process of this sitting (FASTMAE_SITTING)")
    ap.add_argument("--stand-in", default=None, metavar="JSON", help="only write stand-in rows (the rehearsals)")
    ap.add_argument("--rows", type=int, default=3, help="with --stand-in: how many, one every half second")
    ap.add_argument("--stray", action="store_true", help="with --stand-in: leave a child in a session of its own")
    args = ap.parse_args(argv)
    if args.table:
        print(table(Path(args.table)))
        return 0
    if args.facts:
        facts(Path(args.facts))
        return 0
    if args.probe:
        return probe(args.probe, Path(args.probe_out) if args.probe_out else None)
    if args.stand_in:
        return stand_in(Path(args.stand_in), args.rows, stray=args.stray)
    if args.reap:
        found = reap()
        print(f"[sitting] reaped {len(found)} process(es) of sitting {os.environ.get(MARKER)}: {found}", flush=True)
        return 0
    if not args.stage:
        ap.error("--stage is required (or --table, --facts, --probe, --reap)")
    out = Path(args.out)
    plan = stages(out)
    names = ", ".join(str(k) for k in plan)
    chosen = []
    for part in (p.strip() for p in args.stage.split(",") if p.strip()):
        key = "quick" if part in ("quick", "1") else int(part) if part.isdigit() else part
        if key not in plan:
            ap.error(f"--stage: no stage {part!r}; stages are {names}")
        chosen.append(key)
    if args.dry_run:
        for name in chosen:
            run_stage(name, plan[name], out, True, args.budget or BUDGETS[name], failed_checks(out / "smoke.jsonl"))
        return 0
    global _RUN_ID
    _RUN_ID = os.environ.get(MARKER) or f"{int(time.time())}-{os.getpid()}"  # every command's processes inherit it
    deadline = None if args.deadline is None else time.monotonic() + args.deadline
    out.mkdir(parents=True, exist_ok=True)
    packer = Packer(out, Path(args.pack)).start() if args.pack else None
    skip = done_commands(out) if args.resume else set()
    before = (out / "sitting.jsonl").read_text().count("\n") if (out / "sitting.jsonl").exists() else 0
    handlers = stop_on_signals()
    code = 0
    try:
        for name in chosen:
            failed = failed_checks(out / "smoke.jsonl")  # what the smoke stage of this folder found (none yet: nothing)
            run_stage(name, plan[name], out, False, args.budget or BUDGETS[name], failed, deadline=deadline,
                      skip=skip, packer=packer)  # fmt: skip
    except Stopped as why:
        code = 128 + why.signum
        lines = (out / "sitting.jsonl").read_text().splitlines()[before:] if (out / "sitting.jsonl").exists() else []
        logged = {(r["stage"], r["command"]) for r in map(json.loads, lines)}
        rest = [(str(n), c) for n in chosen for c in plan[n] if (str(n), c.name) not in logged | skip]
        log_not_run(out, rest, f"the sitting was stopped by {why}")
        print(f"[sitting] stopped by {why}: {len(rest)} command(s) not run, each logged", flush=True)
    finally:
        found = reap()  # anything of the sitting still running (a grandchild that escaped its command's kill)
        if found:
            print(f"[sitting] ended {len(found)} process(es) left running: {found}", flush=True)
        if packer is not None:
            packer.stop()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        _RUN_ID = None
    print(table(out), flush=True)
    if packer is not None:
        print(f"[sitting] packed {out} into {packer.target}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
