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
from tqdm import tqdm

import fastmae
from fastmae.config import LinprobeConfig
from fastmae.errors import FastMAEError
from fastmae.interop import create_vit

from .checkpoint import LAST, load_checkpoint, resume_position, save_checkpoint
from .distributed import DistContext, params_in_sync
from .finetune import Setup, load_pretrained, setup
from .pretrain import MetricsLog, StopSignal, make_loader, optimizer_steps, write_json
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
            feats.append(encoder(imgs.to(device, non_blocking=True)).float())
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
    with setup(cfg) as env:
        return _linprobe(cfg, env)


def _linprobe(cfg: LinprobeConfig, env: Setup) -> dict:
    from timm.optim import Lars

    ctx, device, autocast, train_idx, val_idx = env.ctx, env.device, env.autocast, env.train_idx, env.val_idx
    main, world, out, resume_path, classes = ctx.is_main, ctx.world_size, env.out, env.resume_path, env.classes
    encoder = create_vit(cfg.model, 0, cfg.img_size, "avg" if cfg.global_pool else "token")
    loaded = load_pretrained(encoder, cfg)
    encoder.to(device).eval().requires_grad_(False)
    dim = encoder.num_features
    lrs, blrs = cfg.probe_lrs(world), ([None] if cfg.lr is not None else cfg.blrs())
    with torch.random.fork_rng(devices=[]):  # the same initial probes on every rank (they are not broadcast)
        torch.manual_seed(cfg.seed)
        probes = nn.ModuleList([make_probe(dim, classes) for _ in lrs]).to(device)
    optimizer = Lars(lars_groups(probes, lrs, cfg.weight_decay), lr=lrs[0], momentum=0.9)
    train_loader = make_loader(env.loader_name, train_idx, "linprobe", cfg, device)  # RandomResizedCrop + flip
    val_loader = make_loader(env.loader_name, val_idx, "eval", cfg, device)
    accum = cfg.accum_iter
    steps_per_epoch = optimizer_steps(train_loader.steps_per_epoch, accum)
    total_steps = cfg.epochs * steps_per_epoch
    last_step = min(total_steps, cfg.stop_after_steps or total_steps)
    resolved = {**cfg.to_dict(), "lrs": lrs, "num_classes": classes, **env.run_info(),
                "effective_batch": cfg.effective_batch(world), "steps_per_epoch": steps_per_epoch,
                "total_steps": total_steps, "feature_dim": dim, **loaded}  # fmt: skip

    step, epoch, start_batch, start_scores = 0, 0, 0, None
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path)
        try:
            probes.load_state_dict(ckpt["model"], strict=True)
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise FastMAEError(f"checkpoint {resume_path} does not hold {len(lrs)} probe(s) of {dim} features x "
                               f"{classes} classes: {str(exc).splitlines()[0]}") from exc  # fmt: skip
        step, start_scores = int(ckpt["step"]), ckpt.get("start_scores")
        epoch, start_batch = resume_position(ckpt, step, steps_per_epoch, accum, world)
        logger.info("resumed from %s at step %d", resume_path, step)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", resolved)
    logger.info("linear probes on %s features of %s (%d classes), lrs %s, loader %s, %d process(es), effective batch "
                "%d, %d steps/epoch", "mean-token" if cfg.global_pool else "cls-token", cfg.model, classes,
                ", ".join(f"{lr:.3g}" for lr in lrs), env.loader_name, world, cfg.effective_batch(world),
                steps_per_epoch)  # fmt: skip
    features = torch.compile(encoder) if env.use_compile else encoder
    val_f, val_y = extract(features, val_loader, device, autocast, dim, ctx)  # the whole validation set, every rank

    def save() -> None:
        if main:
            save_checkpoint({"model": probes.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                             "epoch": epoch, "config": resolved, "data_position": list(train_loader.position),
                             "start_scores": start_scores}, out / LAST)  # fmt: skip
        ctx.barrier()

    metrics = MetricsLog(out / "metrics.jsonl", main)
    bar = tqdm(total=last_step, initial=step, disable=not (cfg.progress and main), unit="step", dynamic_ncols=True)
    images, t_start, stopping = 0, time.perf_counter(), False
    first_losses = last_losses = None
    start_scores = start_scores or score_probes(probes, val_f, val_y, classes)
    with StopSignal() as stop:
        try:
            while step < last_step and not stopping:
                micro, loss_sum = start_batch, 0.0
                for imgs, labels in train_loader.epoch(epoch, start_batch):
                    with torch.no_grad(), autocast:
                        feats = features(imgs.to(device, non_blocking=True))
                    feats, labels = feats.float(), labels.to(device, non_blocking=True)
                    if ctx.enabled:  # every rank: the whole global batch (a host sync for the row counts)
                        feats, labels = _split_labels(ctx.gather_rows(_with_labels(feats, labels)))
                    losses = torch.stack([nn.functional.cross_entropy(p(feats), labels) for p in probes])
                    (losses.sum() / accum).backward()  # the probes share no parameters: one backward trains all
                    loss_sum = loss_sum + losses.detach()
                    micro += 1
                    images += imgs.shape[0]
                    if micro % accum:
                        continue
                    for group in optimizer.param_groups:
                        group["lr"] = lr_at(step / steps_per_epoch, group["base_lr"], cfg.min_lr, cfg.warmup_epochs,
                                            cfg.epochs)  # fmt: skip
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    bar.update(1)
                    log_now = step % cfg.log_every == 0 or step == 1 or step == last_step
                    stopping, log_now = ctx.agree_stop(stop.received is not None, log_now, device)
                    if log_now:
                        values = (loss_sum / accum).tolist()  # host sync on logging steps only
                        first_losses = values if first_losses is None else first_losses
                        last_losses = values
                        lrs_now = [g["lr"] for g in optimizer.param_groups[::2]]
                        metrics.write({"step": step, "epoch": step / steps_per_epoch, "losses": values, "lrs": lrs_now})
                        bar.set_postfix(loss=f"{min(values):.4f}")
                    loss_sum = 0.0
                    if step >= last_step or stopping:
                        break
                    if cfg.save_every and step % cfg.save_every == 0:
                        save()
                    if micro >= steps_per_epoch * accum:
                        break
                if micro < steps_per_epoch * accum:  # stopped inside the epoch (last step, or a signal)
                    break
                epoch, start_batch = epoch + 1, 0
                metrics.write({"step": step, "epoch": epoch, "probes": score_probes(probes, val_f, val_y, classes)})
                save()
        finally:
            bar.close()
            metrics.close()
        wall = time.perf_counter() - t_start
        save()
    scores = score_probes(probes, val_f, val_y, classes)
    knn = None
    if cfg.knn_k > 0:  # training features without augmentation, each rank its shard
        train_eval = make_loader(env.loader_name, train_idx, "eval", cfg, device)
        train_f, train_y = extract(features, train_eval, device, autocast, dim)
        knn = knn_classify(train_f, train_y, val_f, val_y, classes, cfg.knn_k, cfg.knn_t, ctx=ctx)
    in_sync = params_in_sync(probes, ctx, device)  # logs an error when they differ
    probes_out = [{"blr": b, "lr": lr, **s, "top1_start": s0["top1"], "val_loss_start": s0["val_loss"]}
                  for b, lr, s, s0 in zip(blrs, lrs, scores, start_scores, strict=True)]  # fmt: skip
    best = max(range(len(probes_out)), key=lambda i: probes_out[i]["top1"])
    lines = ["| probe | lr | top-1 | top-5 |", "| --- | --- | --- | --- |"]
    for p in probes_out:
        name = f"linear, blr {p['blr']:g}" if p["blr"] is not None else "linear"
        lines.append(f"| {name} | {p['lr']:.3g} | {p['top1']:.2f} | {p['top5']:.2f} |")
    if knn is not None:
        lines.append(f"| kNN, k={knn['k']}, t={knn['t']:g} | - | {knn['top1']:.2f} | {knn['top5']:.2f} |")
    summary = {
        "steps": step,
        "stopped_by": (stop.received or "peer") if stopping else None,
        "images_seen": images * world,
        "img_per_s": images * world / max(wall, 1e-9),
        "probes": probes_out,
        "best_probe": best,
        "top1": probes_out[best]["top1"],
        "knn": knn,
        "first_logged_losses": first_losses,
        "final_losses": last_losses,
        "features": "mean-token" if cfg.global_pool else "cls-token",
        "num_classes": classes,
        "val_images": val_f.shape[0],
        "skipped_files": len(train_loader.skipped | val_loader.skipped),
        **env.run_info(),
        "ranks_in_sync": in_sync,
        **loaded,
        "fastmae": fastmae.__version__,
        "torch": torch.__version__,
    }
    if main:
        write_json(out / "summary.json", summary)
    summary["table"] = "\n".join(lines)
    return summary
