"""A GPU sitting in stages, each stage a list of commands with their own time budgets, every JSON and log under one
folder, a short table last. ../shared/GPU.md says how a session uses it. Device time is 15 minutes a session, start
included, and one call of the device tool is at most 8-9 minutes, so a sitting is one call of
``--stage smoke,step`` (90 + 380 s); the other stages are for later calls or sessions.

    python3 -m pip install -q --no-deps --no-build-isolation -e .   # on the machine, no network needed
    python benchmarks/gpu_sitting.py --stage smoke,step --out $OUT    # the sitting: 470 s
    python benchmarks/gpu_sitting.py --stage smoke,codec --out $OUT   # issue 33 (TorchCodec, xformers): 470 s
    python benchmarks/gpu_sitting.py --stage smoke,feed --out $OUT    # the loaders and the real loop: 470 s
    python benchmarks/gpu_sitting.py --stage step2 --out $OUT         # compiled-reference, AdamW, autotune, dec 1
    python benchmarks/gpu_sitting.py --stage smoke,step --dry-run     # the commands only
    python benchmarks/gpu_sitting.py --table DIR                      # the table of every JSON in DIR

What a sitting brings back even when half of it fails:

- **Every command runs.** A command that fails is logged with its exit code and the stage goes on; only the stage's
  time budget stops it. Each command runs in its own process group (session); at its limit the whole group, and any
  descendant that left it, is killed: no child (a ``fastmae pretrain`` of ``bench_e2e.py``, DataLoader workers, an
  inductor compile pool) trains on into the next command's measurement.
- **Budgets.** Each command has its own budget; a stage's add up to at most the stage's. A command may also use
  what the commands before it left unused: its limit is the time left minus the budgets of the commands after it.
- **Results row by row.** ``fastmae bench`` and the scripts rewrite their JSON (atomically) after every row; a
  command killed at its limit leaves what it had measured, and a configuration that fails is a row with its error.
- **The smoke stage first** (``benchmarks/gpu_smoke.py``): every GPU-only path once at tiny shapes, each in its own
  process, one JSON line each in ``smoke.jsonl``. Later commands adapt to what failed there: a failed CUDA-graph
  check drops ``--graphs``, a failed GPU-loader check drops the ``gpu`` loader (logged).
- ``sitting.jsonl``: one line per command (stage, name, exit, seconds, limit, whether it was stopped, adaptations).

Every command that needs a GPU says ``--device cuda``, so on a machine without one each fails at once (the tests
rehearse a whole sitting that way).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from gpu_smoke import failed_checks  # noqa: E402

PY = sys.executable
BENCH = [PY, "-m", "fastmae.cli", "bench"]


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


# seconds per stage (one device call holds smoke + one other)
BUDGETS = {"smoke": 90, "step": 380, "codec": 380, "feed": 380, "feed2": 380, "step2": 435, "quick": 450, 2: 480,
           3: 480, 4: 480, 5: 480}  # fmt: skip
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
    jpegs = "/tmp/fastmae-feed-jpegs"  # on the machine's disk, not under $OUT (nothing to bring back)
    smi = Cmd("nvidia-smi", 5, ["nvidia-smi"])
    # Issue 33's rows. Batched decode of 256 ImageNet-like JPEGs: TorchCodec (hardware JPEG engine) vs torchvision's
    # CUDA decode vs the CPU decoders, one call each, pixels checked first.
    decode = Cmd("decode", 45, [PY, str(HERE / "bench_decode.py"), *cuda, "--images", "256", "--out",
                                str(out / "decode.json")])
    # ViT-B with the GPU loader decoding and augmenting beside the step, against the synthetic loader (no feed): what
    # the feed takes from the step. Eager (--compile off): the ratio is the question, and three compiles do not fit.
    feed_vs_synthetic = Cmd("e2e-feed", 150, [PY, str(HERE / "bench_e2e.py"), *cuda, "--data", jpegs, "--images",
                                              "20480", "--models", "mae_vit_base_patch16", "--loaders",
                                              "gpu,synthetic", "--workers", "16", "--compile", "off", "--steps",
                                              "100", "--skip", "30", "--out", str(out / "e2e-feed.json")])
    # The ViT-B step with xformers at both call sites (fastmae names the operators in its log), beside b8's auto.
    b8_xformers = Cmd("b8-xformers", 55, [*pretrain, *base, *dec8, "--configs", "fastmae", "--compile", "regional",
                                          "--attn-backend", "xformers", *fast, "--out", str(out / "b8-xformers.json")])
    b8_auto = Cmd("b8-auto", 55, [*pretrain, *base, *dec8, "--configs", "fastmae", "--compile", "regional", *fast,
                                  "--out", str(out / "b8-auto.json")])
    attn = Cmd("attention", 35, [PY, str(HERE / "bench_attention.py"), *cuda, "--out", str(out / "attention.json"),
                                 "--write-table", str(out / "attention_table.json")])
    return {
        # 8 checks at a time (16 cores): 22 checks, the two graph checks taking most of the 82 s.
        "smoke": [Cmd("smoke", 90, [PY, str(HERE / "gpu_smoke.py"), "--out", str(out / "smoke.jsonl"),
                                    "--deadline", "82", "--jobs", "8"])],
        # The step at its limit (issues 26, 31). The attention table per call site first (it feeds auto in the rest);
        # ViT-L dec 8 compiled whole: eager, visible, mask-token, plain and as one CUDA graph, profiled (the headline
        # and where the time goes); the same compiled per block (regional: its compile time and step rate beside
        # full's, which chooses the default); ViT-B dec 8 (its MFU target); the ViT-L batch sweep. Compiling one
        # ViT-L configuration whole took 45-80 s on the H200.
        "step": [smi,
                 attn,
                 Cmd("l8", 150, [*pretrain, *large, *dec8, "--configs", "eager,fastmae,mask-token", "--compile", "full",
                                 "--graphs", "--profile", *timing, "--out", str(out / "l8.json")], NO_GRAPHS),
                 Cmd("l8-regional", 70, [*pretrain, *large, *dec8, "--configs", "fastmae,mask-token", "--compile",
                                         "regional", "--graphs", *timing, "--out", str(out / "l8-regional.json")],
                     NO_REGIONAL_GRAPHS),
                 Cmd("b8", 65, [*pretrain, *base, *dec8, "--configs", "fastmae,mask-token", "--compile", "regional",
                                "--graphs", *fast, "--out", str(out / "b8.json")], NO_REGIONAL_GRAPHS),
                 b8_xformers],
        # What the step stage leaves out: the compiled reference, the optimizer alone, inductor's GEMM autotuning,
        # decoder depth 1.
        "step2": [smi,
                  Cmd("l8-reference", 110, [*pretrain, *large, *dec8, "--configs", "compiled-reference", *fast,
                                            "--out", str(out / "l8-reference.json")]),
                  Cmd("l8-optimizer", 45, [*pretrain, *large, *dec8, "--configs", "", "--optimizer-bench",
                                           "--out", str(out / "l8-optimizer.json")]),
                  Cmd("b8-autotune", 130, [*pretrain, *base, *dec8, "--configs", "fastmae", "--compile-mode",
                                           "max-autotune-no-cudagraphs", *fast, "--out",
                                           str(out / "b8-autotune.json")]),
                  Cmd("l1", 90, [*pretrain, *large, "--decoder-depths", "1", "--configs", "fastmae,mask-token",
                                 "--compile", "regional", *fast, "--out", str(out / "l1.json")]),
                  Cmd("l8-batches", 55, [*pretrain, *large, *dec8, "--configs", "fastmae", "--compile", "regional",
                                         "--batches", "256,512", *fast, "--out", str(out / "l8-batches.json")])],
        # Feeding the step (issues 27, 33): batched decode per decoder; ViT-B with the GPU loader against the
        # synthetic one; the loaders at 4, 8, 16 workers on 20480 ImageNet-like JPEGs (written first when missing,
        # 16 processes), batch 256. The real loop against the bare step at ViT-B and ViT-L: feed2.
        "feed": [smi, decode, feed_vs_synthetic,
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
        # Issue 33 in one call after smoke (TorchCodec, xformers): the rows it adds to step and feed, with the
        # attention table (xformers' operators beside SDPA's kernels) and the ViT-B step under auto beside xformers.
        "codec": [smi, decode, attn, b8_xformers, b8_auto, feed_vs_synthetic],
        # The first sitting's headline (ran 2026-11-30), and the older stages.
        "quick": [smi,
                  Cmd("gpu-tests", 60, [PY, "-m", "pytest", "-m", "gpu and not slow", "-q", "-p", "no:cacheprovider"]),
                  Cmd("l8", 160, [*pretrain, *fast, *large, *dec8, "--out", str(out / "l8.json")]),
                  Cmd("b8", 130, [*pretrain, *fast, *base, *dec8, "--out", str(out / "b8.json")]),
                  Cmd("loader", 95, [PY, str(HERE / "bench_loader.py"), *cuda, "--workers", "16", "--images", "10240",
                                     "--loaders", "official,fastmae,decode", "--rounds", "2",
                                     "--out", str(out / "loader.json")])],
        2: [Cmd("gpu-tests-slow", 300, [PY, "-m", "pytest", "-m", "gpu and slow", "-q", "-p", "no:cacheprovider"]),
            Cmd("kernels", 180, [PY, str(HERE / "bench_kernels.py"), *cuda, "--out", str(out / "kernels.json")])],
        3: [Cmd("b1", 200, [*pretrain, *base, "--decoder-depths", "1", "--out", str(out / "b1.json")]),
            Cmd("l1", 280, [*pretrain, *large, "--decoder-depths", "1", "--out", str(out / "l1.json")])],
        4: [Cmd("h8", 480, [*pretrain, "--models", "mae_vit_huge_patch14", *dec8, "--out", str(out / "h8.json")])],
        5: [Cmd("finetune", 200, [PY, str(HERE / "bench_finetune.py"), *cuda, "--out", str(out / "finetune.json")]),
            Cmd("l8-profile", 280, [*pretrain, "--profile", *large, *dec8, "--out", str(out / "l8-profile.json")])],
    }  # fmt: skip


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


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the command's process group and every descendant, also those that started a session of their own."""
    victims = _descendants(proc.pid)  # first: once the parent is dead, its children are no longer below it
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def run_command(argv: list[str], limit: float, log, echo=True) -> tuple[int | None, float, bool]:
    """(exit code, seconds, stopped at the limit) of ``argv`` in its own session, its output into ``log``; 127 when it
    cannot start."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # fmt: skip
    except OSError as exc:
        log.write(f"cannot start: {exc}\n")
        return 127, time.perf_counter() - t0, False

    def pump():
        for text in proc.stdout:
            if echo:
                sys.stdout.write(text)
            log.write(text)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    stopped = False
    try:
        code = proc.wait(timeout=max(limit, 0.1))
    except subprocess.TimeoutExpired:
        stopped = True
        kill_tree(proc)
        code = proc.wait()
    reader.join(timeout=10)
    return code, time.perf_counter() - t0, stopped


def run_stage(name, commands: list[Cmd], out: Path, dry_run: bool, budget: float, failed: dict[str, str] | None = None,
              echo: bool = True) -> list[dict]:  # fmt: skip
    """Run a stage's commands in order, each logged to ``out/stage-<name>.log`` with its exit, none stopping the
    others; each gets its own budget plus what earlier ones left, and the stage stops at ``budget``. ``failed``: the
    smoke checks that failed (commands adapt). Returns one record per command (also in ``out/sitting.jsonl``)."""
    failed = failed or {}
    deadline = time.monotonic() + budget
    records = []
    for i, cmd in enumerate(commands):
        argv, notes = cmd.adapted(failed)
        line = " ".join(shlex.quote(c) for c in argv)
        print(f"[stage {name}] {cmd.name}: {line}  (budget {cmd.budget:g} s)", flush=True)
        for note in notes:
            print(f"[stage {name}] {cmd.name}: {note}", flush=True)
        if dry_run:
            continue
        reserve = sum(c.budget for c in commands[i + 1 :])
        left = deadline - time.monotonic()
        limit = min(left, max(cmd.budget, left - reserve))  # its own budget, and what earlier commands left over
        out.mkdir(parents=True, exist_ok=True)
        record = {"stage": str(name), "command": cmd.name, "argv": line, "budget": cmd.budget, "adapted": notes}
        with open(out / f"stage-{name}.log", "a") as log:
            log.write(f"$ {line}\n" + "".join(f"# {note}\n" for note in notes))
            log.flush()
            if limit < 1:
                log.write(f"# not run: the stage's {budget:g} s are spent\n")
                record.update(exit=None, seconds=0.0, limit=0.0, stopped=False, run=False)
                print(f"[stage {name}] {cmd.name}: not run (the stage's time is spent)", flush=True)
            else:
                code, seconds, stopped = run_command(argv, limit, log, echo)
                log.write(f"# exit {code} after {seconds:.0f} s" + (f" (stopped at its limit of {limit:.0f} s)"
                                                                    if stopped else "") + "\n")  # fmt: skip
                record.update(exit=code, seconds=seconds, limit=limit, stopped=stopped, run=True)
                print(f"[stage {name}] {cmd.name}: exit {code} after {seconds:.0f} s"
                      + (" (stopped at its limit)" if stopped else ""), flush=True)  # fmt: skip
        with open(out / "sitting.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        records.append(record)
    return records


def table(folder: Path) -> str:
    """One line per pretrain-step row (or what it failed with) and a count of the other rows, from every results
    JSON in ``folder``; then the smoke checks and the commands' exits when the folder has them."""
    lines = ["| file | model | dec | config | encoder | compile | variant | img/s | MFU | peak GB/img | top kernel |",
             "| --- | --- | ---: | --- | --- | --- | --- | ---: | ---: | ---: | --- |"]  # fmt: skip
    others = {}
    for path in sorted(folder.glob("*.json")):
        try:
            rows = json.loads(path.read_text()).get("rows", [])
        except (OSError, ValueError):
            continue
        for r in rows:
            if r.get("name") != "pretrain_step":
                others[r.get("name", "?")] = others.get(r.get("name", "?"), 0) + 1
                continue
            head = (f"| {path.name} | {r['model']} | {r['decoder_depth']} | {r['config']} | {r['encoder_mode']} | "
                    f"{r.get('compile')} | {r.get('variant', 'plain')} |")  # fmt: skip
            if r.get("error") or r.get("oom"):
                lines.append(f"{head} failed: {(r.get('error') or 'out of memory')[:80]} | | | |")
                continue
            top = (r.get("profile") or [{}])[0]
            mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
            mem = "n/a" if r.get("peak_mem_gb_per_image") is None else f"{r['peak_mem_gb_per_image']:.3f}"
            kernel = f"{top['kernel'][:40]} {100 * top['share']:.0f}%" if top else "-"
            lines.append(f"{head} {r['img_per_s']:.1f} | {mfu} | {mem} | {kernel} |")
    lines.append("other rows: " + (", ".join(f"{k} {v}" for k, v in sorted(others.items())) or "none"))
    smoke = folder / "smoke.jsonl"
    if smoke.exists():
        records = [json.loads(line) for line in smoke.read_text().splitlines() if line.strip()]
        lines.append("smoke: " + ", ".join(f"{r['check']} {'pass' if r['ok'] else 'FAIL'}" for r in records))
    sitting = folder / "sitting.jsonl"
    if sitting.exists():
        records = [json.loads(line) for line in sitting.read_text().splitlines() if line.strip()]
        lines.append("commands: " + ", ".join(
            f"{r['stage']}/{r['command']} " + ("not run" if not r.get("run") else f"exit {r['exit']}"
                                               + (" (stopped)" if r.get("stopped") else "")) for r in records))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", default=None, help="comma-separated stages: smoke, step, step2, feed, quick, 2, 3, 4, 5")
    ap.add_argument("--out", default="benchmarks/results/sitting", help="folder for every JSON and log")
    ap.add_argument("--budget", type=float, default=None, help="seconds per stage (default: each stage's own)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--table", default=None, metavar="DIR", help="only print the table of the JSONs in DIR")
    args = ap.parse_args(argv)
    if args.table:
        print(table(Path(args.table)))
        return 0
    if not args.stage:
        ap.error("--stage is required (or --table DIR)")
    out = Path(args.out)
    plan = stages(out)
    names = ", ".join(str(k) for k in plan)
    chosen = []
    for part in (p.strip() for p in args.stage.split(",") if p.strip()):
        key = "quick" if part in ("quick", "1") else int(part) if part.isdigit() else part
        if key not in plan:
            ap.error(f"--stage: no stage {part!r}; stages are {names}")
        chosen.append(key)
    for name in chosen:
        failed = failed_checks(out / "smoke.jsonl")  # what the smoke stage of this folder found (none yet: nothing)
        run_stage(name, plan[name], out, args.dry_run, args.budget or BUDGETS[name], failed)
    if not args.dry_run:
        print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
