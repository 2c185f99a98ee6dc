"""Linear probing of a frozen encoder (the paper's protocol), several learning rates in one pass, and kNN.

Each probe is ``BatchNorm1d(affine=False)`` + ``Linear`` on the encoder's cls token (or the token mean), trained with
LARS (timm's ``Lars``: trust ratio on the weight matrices, none on the biases, momentum 0.9) and warmup + cosine. The
encoder runs once per batch and every probe trains on the same features, so K learning rates cost about one run. At
the end a weighted kNN vote (cosine similarity, weights exp(sim / t)) over the training features is reported beside
the probes. Output folder: ``config.json``, ``metrics.jsonl``, ``checkpoint-last.pth`` (the probes, resumable),
``summary.json``.

Under ``torchrun`` each rank runs the frozen encoder on its shard of the batch (the costly part); the features are
gathered so that every rank trains identical probes on the whole global batch (the batch-norm statistics are those of
the global batch, as with one process). Validation features are gathered likewise; the kNN search runs on each rank's
shard of the training features and merges the ranks' candidates.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from fastmae.config import LinprobeConfig
from fastmae.errors import FastMAEError
from fastmae.interop import create_vit, encoder_arch, load_pretrained

from .checkpoint import LAST, load_checkpoint, resume_position, save_checkpoint
from .data import labelled_data, make_loader, to_device
from .distributed import DistContext, params_in_sync
from .run import (
    Run,
    RunLog,
    SaveClock,
    StopSignal,
    already_finished,
    fault,
    micro_batches,
    optimizer_steps,
    processes,
    seed_all,
    start_run,
    versions,
)
from .schedule import lr_at

logger = logging.getLogger("fastmae.linprobe")


def make_probe(dim: int, classes: int) -> nn.Sequential:
    """BatchNorm without affine (a parameter-free feature normaliser) + a linear classifier (init std 0.01)."""
    probe = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, classes))
    nn.init.trunc_normal_(probe[1].weight, std=0.01)
    nn.init.zeros_(probe[1].bias)
    return probe


def lars_groups(probes: nn.ModuleList, lrs: list[float], weight_decay: float) -> list[dict]:
    """Per probe: its weight matrix with weight decay and the LARS trust ratio, its bias with neither."""
    groups = []
    for probe, lr in zip(probes, lrs, strict=True):
        linear = probe[1]
        groups.append({"params": [linear.weight], "lr": lr, "base_lr": lr, "weight_decay": weight_decay,
                       "always_adapt": True})  # fmt: skip
        groups.append({"params": [linear.bias], "lr": lr, "base_lr": lr, "weight_decay": 0.0, "always_adapt": False})
    return groups


def _with_labels(feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[N, D + 1]: the labels as a last column (exact in float32 below 2**24 classes), to gather both at once."""
    return torch.cat([feats, labels.to(feats.device, torch.float32)[:, None]], dim=1)


def _split_labels(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rows[:, :-1], rows[:, -1].long()


@torch.no_grad()
def extract(encoder: nn.Module, loader, device: torch.device, autocast, dim: int,
            ctx: DistContext | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Features [N, D] (float32) and labels [N] of this rank's shard of an eval loader; with ``ctx``, every rank's
    shard gathered (the whole set, each image once)."""
    feats, labels = [torch.empty(0, dim, device=device)], [torch.empty(0, dtype=torch.long, device=device)]
    for imgs, y in loader.epoch(0):
        with autocast:
            feats.append(encoder(to_device(imgs, device)).float())
        labels.append(y.to(device))
    feats, labels = torch.cat(feats), torch.cat(labels)
    if ctx is not None and ctx.enabled:
        feats, labels = _split_labels(ctx.gather_rows(_with_labels(feats, labels)))
    return feats, labels


@torch.no_grad()
def knn_classify(train_f, train_y, test_f, test_y, classes: int, k: int, t: float, chunk: int = 1024,
                 ctx: DistContext | None = None) -> dict:  # fmt: skip
    """Weighted kNN top-1/top-5 (%): each test feature votes with its k most cosine-similar training features,
    weighted exp(similarity / t). With ``ctx`` the training features are this rank's shard and the test features the
    same on every rank: each rank finds its shard's k nearest, and the ranks' candidates are merged."""
    distributed = ctx is not None and ctx.enabled
    train_f = nn.functional.normalize(train_f, dim=1)
    test_f = nn.functional.normalize(test_f, dim=1)
    total = train_f.shape[0]
    if distributed:
        total = int(ctx.sum(torch.tensor([float(total)], device=train_f.device)).item())
    k = min(k, total)
    top = min(5, classes)
    hits1 = hits5 = 0
    for start in range(0, test_f.shape[0], chunk):
        sim = test_f[start : start + chunk] @ train_f.T  # [B, Ntrain of this rank]
        s, idx = sim.topk(min(k, train_f.shape[0]), dim=1)
        lab = train_y[idx]
        if distributed:  # pad to k candidates (-inf: weight 0, never chosen), gather [world * k, B], keep the best k
            pad = k - s.shape[1]
            s = nn.functional.pad(s, (0, pad), value=float("-inf"))
            lab = nn.functional.pad(lab, (0, pad))
            s, lab = ctx.gather_rows(s.T.contiguous()).T, ctx.gather_rows(lab.T.contiguous()).T
            s, best = s.topk(k, dim=1)
            lab = lab.gather(1, best)
        votes = torch.zeros(sim.shape[0], classes, device=sim.device)
        votes.scatter_add_(1, lab, (s / t).exp())
        pred = votes.topk(top, dim=1).indices
        y = test_y[start : start + chunk]
        hits1 += int((pred[:, 0] == y).sum())
        hits5 += int((pred == y[:, None]).any(dim=1).sum())
    n = max(test_f.shape[0], 1)
    return {"k": k, "t": t, "top1": 100 * hits1 / n, "top5": 100 * hits5 / n}


@torch.no_grad()
def score_probes(probes: nn.ModuleList, feats: torch.Tensor, labels: torch.Tensor, classes: int) -> list[dict]:
    probes.eval()
    top = min(5, classes)
    rows = []
    for probe in probes:
        logits = probe(feats)
        pred = logits.topk(top, dim=1).indices
        rows.append({
            "val_loss": nn.functional.cross_entropy(logits, labels).item(),
            "top1": 100 * (pred[:, 0] == labels).float().mean().item(),
            "top5": 100 * (pred == labels[:, None]).any(dim=1).float().mean().item(),
        })  # fmt: skip
    probes.train()
    return rows


def linprobe(cfg: LinprobeConfig) -> dict:
    """Train the probes as ``cfg`` says, then kNN; returns the summary (also written to ``summary.json``)."""
    with start_run(cfg, "ddp") as run:
        job = LinearProbing(cfg, run)
        return already_finished(run, job.step) if job.finished else job.train()


class LinearProbing:
    """One probing run: the frozen encoder, the probes trained side by side, LARS, loaders and counters."""

    def __init__(self, cfg: LinprobeConfig, run: Run):
        from timm.optim import Lars

        self.cfg, self.run, self.device, world = cfg, run, run.device, run.ctx.world_size
        seed_all(cfg.seed + run.ctx.rank)
        self.train_idx, self.val_idx, self.classes = labelled_data(cfg, run.ctx)
        arch = encoder_arch(cfg.model, cfg.pretrained)
        self.encoder = create_vit(arch, 0, cfg.img_size, "avg" if cfg.global_pool else "token")
        self.loaded = load_pretrained(self.encoder, cfg.pretrained, cfg.model)
        self.encoder.to(self.device).eval().requires_grad_(False)
        self.dim = self.encoder.num_features
        self.lrs, self.blr_list = cfg.probe_lrs(world), ([None] if cfg.lr is not None else cfg.blrs())
        with torch.random.fork_rng(devices=[]):  # the same initial probes on every rank (they are not broadcast)
            torch.manual_seed(cfg.seed)
            self.probes = nn.ModuleList([make_probe(self.dim, self.classes) for _ in self.lrs]).to(self.device)
        self.optimizer = Lars(lars_groups(self.probes, self.lrs, cfg.weight_decay), lr=self.lrs[0], momentum=0.9)
        self.train_loader = make_loader(run.loader_name, self.train_idx, "linprobe", cfg, self.device,
                                        fallback=cfg.loader == "auto")  # crop + flip
        self.val_loader = make_loader(run.loader_name, self.val_idx, "eval", cfg, self.device,
                                        fallback=cfg.loader == "auto")
        self.accum = cfg.accum_iter
        self.steps_per_epoch = optimizer_steps(self.train_loader.steps_per_epoch, self.accum)
        total_steps = cfg.epochs * self.steps_per_epoch
        self.last_step = min(total_steps, cfg.stop_after_steps or total_steps)
        self.resolved = {**cfg.to_dict(), "lrs": self.lrs, "num_classes": self.classes, **run.run_info(),
                         "effective_batch": cfg.effective_batch(world), "steps_per_epoch": self.steps_per_epoch,
                         "total_steps": total_steps, "feature_dim": self.dim, **self.loaded}  # fmt: skip
        self.step, self.epoch, self.start_batch, self.start_scores = 0, 0, 0, None
        if run.resume_path is not None:
            self._resume()
        self.finished = run.resume_path is not None and self.step >= self.last_step
        if self.finished:  # a requeued or repeated job whose run is done: nothing more is built, nothing touched
            return
        self.log = RunLog(run.out, run.main, resumed_at=self.step if run.resume_path is not None else None)
        self.log.config(self.resolved)
        logger.info("linear probes on %s features of %s (%d classes), lrs %s, loader %s, %s, effective "
                    "batch %d, %d steps/epoch", "mean-token" if cfg.global_pool else "cls-token", cfg.model,
                    self.classes, ", ".join(f"{lr:.3g}" for lr in self.lrs), run.loader_name,
                    processes(world, run.ctx.strategy),
                    cfg.effective_batch(world), self.steps_per_epoch)  # fmt: skip
        self.features = run.compiled(self.encoder)
        self.images = 0
        self.first_losses = self.last_losses = None
        self.save_clock = SaveClock(cfg.save_interval)

    def _resume(self) -> None:
        path = self.run.resume_path
        ckpt = load_checkpoint(path)
        try:
            self.probes.load_state_dict(ckpt["model"], strict=True)
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise FastMAEError(f"checkpoint {path} does not hold {len(self.lrs)} probe(s) of {self.dim} features x "
                               f"{self.classes} classes: {str(exc).splitlines()[0]}") from exc  # fmt: skip
        self.step, self.start_scores = int(ckpt["step"]), ckpt.get("start_scores")
        self.epoch, self.start_batch = resume_position(ckpt, self.step, self.steps_per_epoch, self.accum,
                                                       self.run.ctx.world_size)  # fmt: skip
        logger.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------------------------------------- the loop
    def train(self) -> dict:
        cfg, run, accum, micro_per_epoch = self.cfg, self.run, self.accum, self.steps_per_epoch * self.accum
        # the whole validation set, on every rank
        self.val_f, self.val_y = extract(self.features, self.val_loader, self.device, run.autocast(), self.dim,
                                         run.ctx)  # fmt: skip
        self.bar = self.log.progress(self.last_step, self.step, cfg.progress)
        t_start, stopping = time.perf_counter(), False
        self.start_scores = self.start_scores or score_probes(self.probes, self.val_f, self.val_y, self.classes)
        with StopSignal() as stop:
            try:
                while self.step < self.last_step and not stopping:
                    micro, loss_sum = self.start_batch, 0.0
                    for imgs, labels, _, micro in micro_batches(self.train_loader, self.epoch, self.start_batch,
                                                                accum, self.steps_per_epoch):  # fmt: skip
                        loss_sum = loss_sum + self.forward_backward(imgs, labels)
                        if micro % accum:
                            continue
                        self.update()
                        stopping, log_now = run.log_and_stop(self.step, cfg.log_every, self.last_step, stop)
                        if log_now:
                            self.log_step(loss_sum / accum)
                        loss_sum = 0.0
                        if self.step >= self.last_step or stopping:
                            break
                        if cfg.save_every and self.step % cfg.save_every == 0:
                            self.save()
                    if micro < micro_per_epoch:  # stopped inside the epoch (last step, or a signal)
                        break
                    self.end_epoch()
            except Exception as exc:  # a lost peer or a dying loader: one line
                raise fault(exc, run, self.step)  # noqa: B904 (fault sets the cause)
            finally:
                self.log.end_progress()
            wall = time.perf_counter() - t_start
            self.save()
        return self.finish(wall, stop.stopped_by(stopping))

    def forward_backward(self, imgs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One micro-batch: features of the frozen encoder (every rank's, under torchrun), every probe's loss, one
        backward for all (they share no parameters); returns the probes' losses [K]."""
        with torch.no_grad(), self.run.autocast():
            feats = self.features(to_device(imgs, self.device))
        feats, labels = feats.float(), labels.to(self.device, non_blocking=True)
        if self.run.ctx.enabled:  # every rank: the whole global batch (a host sync for the row counts)
            feats, labels = _split_labels(self.run.ctx.gather_rows(_with_labels(feats, labels)))
        losses = torch.stack([nn.functional.cross_entropy(p(feats), labels) for p in self.probes])
        (losses.sum() / self.accum).backward()
        self.images += imgs.shape[0]
        return losses.detach()

    def update(self) -> None:
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step / self.steps_per_epoch, group["base_lr"], cfg.min_lr, cfg.warmup_epochs,
                                cfg.epochs)  # fmt: skip
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.bar.update(1)

    # ------------------------------------------------------------------------------------------ periodic work
    def log_step(self, losses: torch.Tensor) -> None:
        values = losses.tolist()  # host sync on logging steps only
        self.first_losses = values if self.first_losses is None else self.first_losses
        self.last_losses = values
        lrs_now = [g["lr"] for g in self.optimizer.param_groups[::2]]
        self.log.row({"step": self.step, "epoch": self.step / self.steps_per_epoch, "losses": values, "lrs": lrs_now})
        self.bar.set_postfix(loss=f"{min(values):.4f}")

    def end_epoch(self) -> None:
        self.epoch, self.start_batch = self.epoch + 1, 0
        scores = score_probes(self.probes, self.val_f, self.val_y, self.classes)
        self.log.row({"step": self.step, "epoch": self.epoch, "probes": scores})
        if self.save_clock.due(self.run.ctx, self.device):
            self.save()

    def save(self) -> None:
        if self.run.main:
            save_checkpoint({"model": self.probes.state_dict(), "optimizer": self.optimizer.state_dict(),
                             "step": self.step, "epoch": self.epoch, "config": self.resolved,
                             "data_position": list(self.train_loader.position), "start_scores": self.start_scores},
                            self.run.out / LAST)  # fmt: skip
        self.save_clock.saved()
        self.run.ctx.barrier()

    def finish(self, wall: float, stopped_by: str | None) -> dict:
        cfg, run, world = self.cfg, self.run, self.run.ctx.world_size
        scores = score_probes(self.probes, self.val_f, self.val_y, self.classes)
        knn = None
        if cfg.knn_k > 0:  # training features without augmentation, each rank its shard
            train_eval = make_loader(run.loader_name, self.train_idx, "eval", cfg, self.device,
                                        fallback=cfg.loader == "auto")
            train_f, train_y = extract(self.features, train_eval, self.device, run.autocast(), self.dim)
            knn = knn_classify(train_f, train_y, self.val_f, self.val_y, self.classes, cfg.knn_k, cfg.knn_t,
                               ctx=run.ctx)  # fmt: skip
        in_sync = params_in_sync(self.probes, run.ctx, self.device)  # logs an error when they differ
        rows = zip(self.blr_list, self.lrs, scores, self.start_scores, strict=True)
        probes_out = [{"blr": b, "lr": lr, **s, "top1_start": s0["top1"], "val_loss_start": s0["val_loss"]}
                      for b, lr, s, s0 in rows]  # fmt: skip
        best = max(range(len(probes_out)), key=lambda i: probes_out[i]["top1"])
        summary = {
            "steps": self.step, "stopped_by": stopped_by, "images_seen": self.images * world,
            "img_per_s": self.images * world / max(wall, 1e-9), "probes": probes_out, "best_probe": best,
            "top1": probes_out[best]["top1"], "knn": knn, "first_logged_losses": self.first_losses,
            "final_losses": self.last_losses, "features": "mean-token" if cfg.global_pool else "cls-token",
            "num_classes": self.classes, "val_images": self.val_f.shape[0],
            "skipped_files": len(self.train_loader.skipped | self.val_loader.skipped),
            "decoders": {"train": self.train_loader.decoders, "val": self.val_loader.decoders},
            **run.run_info(), "ranks_in_sync": in_sync, **self.loaded, **versions(),
        }  # fmt: skip
        self.log.summary(summary)
        self.log.close()
        summary["table"] = probe_table(probes_out, knn)
        return summary


def probe_table(probes: list[dict], knn: dict | None) -> str:
    """The probes and kNN as a Markdown table (what ``fastmae linprobe`` prints)."""
    lines = ["| probe | lr | top-1 | top-5 |", "| --- | --- | --- | --- |"]
    for p in probes:
        name = f"linear, blr {p['blr']:g}" if p["blr"] is not None else "linear"
        lines.append(f"| {name} | {p['lr']:.3g} | {p['top1']:.2f} | {p['top5']:.2f} |")
    if knn is not None:
        lines.append(f"| kNN, k={knn['k']}, t={knn['t']:g} | - | {knn['top1']:.2f} | {knn['top5']:.2f} |")
    return "\n".join(lines)
