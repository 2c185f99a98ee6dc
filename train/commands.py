"""The commands ``fastmae`` dispatches to (:func:`run`): pretrain, finetune, linprobe and bench, each with the line it
ends with. Only rank 0 of a multi-process job prints it; the others stay quiet."""

from __future__ import annotations

from .job import dist_info


def run(command: str, cfg) -> int:
    """Run ``command`` with its validated config; returns the exit code (errors are raised as one-line errors)."""
    if command == "bench":
        from .bench import bench

        return bench(cfg)
    if command == "finetune":
        from .finetune import finetune as job
    elif command == "linprobe":
        from .linprobe import linprobe as job
    else:
        from .pretrain import pretrain as job
    summary = job(cfg)
    if dist_info()[0] == 0:
        print(done_line(command, summary, cfg.output_dir))
    return 0


def _num(value, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def done_line(command: str, s: dict, out: str) -> str:
    """What a training command prints at its end (for linprobe: the probes' table)."""
    if s.get("already_finished"):
        return (f"already finished at step {s['steps']}: nothing to do ({out}/summary.json is that run's summary; a "
                "new run needs another --output-dir, or --overwrite)")  # fmt: skip
    if command == "finetune":
        return (f"done: {s['steps']} steps, val top-1 {s['top1']:.2f}% (best {s['best_top1']:.2f}%), top-5 "
                f"{s['top5']:.2f}%; outputs in {out}/ (summary.json)")  # fmt: skip
    if command == "linprobe":
        from .evaluate import probe_table

        return probe_table(s["probes"], s["knn"])
    stopped = f", stopped by {s['stopped_by']}" if s.get("stopped_by") else ""
    loss = f"{_num(s['first_logged_loss'])} -> {_num(s['final_loss'])}"
    return (f"done: {s['steps']} steps{stopped}, {s['images_seen']} images, loss {loss}, "
            f"{_num(s['img_per_s'], '.1f')} img/s; outputs in {out}/ (summary.json)")  # fmt: skip
