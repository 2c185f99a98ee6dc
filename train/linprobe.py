"""Linear probing of a frozen encoder (the paper's protocol), several learning rates in one pass, and kNN.

Each probe is ``BatchNorm1d(affine=False)`` + ``Linear`` on the encoder's cls token (or the token mean), trained with
LARS (timm's ``Lars``: trust ratio on the weight matrices, none on the biases, momentum 0.9) and warmup + cosine. The
encoder runs once per batch and every probe trains on the same features, so K learning rates cost about one run. At
the end a weighted kNN vote (cosine similarity, weights exp(sim / t)) over the training features is reported beside
the probes. Output folder: ``config.json``, ``metrics.jsonl``, ``checkpoint-last.pth`` (the probes), ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import fastmae
from fastmae.config import LinprobeConfig
from fastmae.interop import create_vit

from .checkpoint import LAST, save_checkpoint
from .finetune import load_pretrained, setup
from .labelled import num_classes
from .pretrain import StopSignal, make_loader, write_json
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


@torch.no_grad()
def extract(encoder: nn.Module, loader, device: torch.device, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N, D] (float32) and labels [N] of a whole eval loader."""
    feats, labels = [], []
    for imgs, y in loader.epoch(0):
        with autocast:
            feats.append(encoder(imgs.to(device, non_blocking=True)).float())
        labels.append(y.to(device))
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_classify(train_f, train_y, test_f, test_y, classes: int, k: int, t: float, chunk: int = 1024) -> dict:
    """Weighted kNN top-1/top-5 (%): each test feature votes with its k most cosine-similar training features,
    weighted exp(similarity / t)."""
    train_f = nn.functional.normalize(train_f, dim=1)
    test_f = nn.functional.normalize(test_f, dim=1)
    k = min(k, train_f.shape[0])
    top = min(5, classes)
    hits1 = hits5 = 0
    for start in range(0, test_f.shape[0], chunk):
        sim = test_f[start : start + chunk] @ train_f.T  # [B, Ntrain]
        s, idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], classes, device=sim.device)
        votes.scatter_add_(1, train_y[idx], (s / t).exp())
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
    from timm.optim import Lars

    device, precision, use_compile, loader_name, train_idx, val_idx, autocast = setup(cfg, "linprobe")
    out = Path(cfg.output_dir)
    classes = num_classes(train_idx)
    encoder = create_vit(cfg.model, 0, cfg.img_size, "avg" if cfg.global_pool else "token")
    loaded = load_pretrained(encoder, cfg)
    encoder.to(device).eval().requires_grad_(False)
    dim = encoder.num_features
    lrs, blrs = cfg.probe_lrs(), ([None] if cfg.lr is not None else cfg.blrs())
    probes = nn.ModuleList([make_probe(dim, classes) for _ in lrs]).to(device)
    optimizer = Lars(lars_groups(probes, lrs, cfg.weight_decay), lr=lrs[0], momentum=0.9)
    train_loader = make_loader(loader_name, train_idx, "pretrain", cfg, device)  # RandomResizedCrop + flip
    val_loader = make_loader(loader_name, val_idx, "eval", cfg, device)
    steps_per_epoch = train_loader.steps_per_epoch
    total_steps = cfg.epochs * steps_per_epoch
    last_step = min(total_steps, cfg.stop_after_steps or total_steps)
    out.mkdir(parents=True, exist_ok=True)
    resolved = {**cfg.to_dict(), "lrs": lrs, "num_classes": classes, "device": device.type, "precision": precision,
                "compile": use_compile, "loader": loader_name, "steps_per_epoch": steps_per_epoch,
                "total_steps": total_steps, "feature_dim": dim, **loaded}  # fmt: skip
    write_json(out / "config.json", resolved)
    logger.info("linear probes on %s features of %s (%d classes), lrs %s, loader %s, %d steps/epoch",
                "mean-token" if cfg.global_pool else "cls-token", cfg.model, classes,
                ", ".join(f"{lr:.3g}" for lr in lrs), loader_name, steps_per_epoch)  # fmt: skip
    features = torch.compile(encoder) if use_compile else encoder
    val_f, val_y = extract(features, val_loader, device, autocast)

    metrics = open(out / "metrics.jsonl", "a")
    bar = tqdm(total=last_step, disable=not cfg.progress, unit="step", dynamic_ncols=True)
    step, epoch, images, t_start = 0, 0, 0, time.perf_counter()
    first_losses = last_losses = None
    scores = score_probes(probes, val_f, val_y, classes)
    start_scores = scores
    with StopSignal() as stop:
        try:
            while step < last_step and not stop.received:
                for imgs, labels in train_loader.epoch(epoch):
                    with torch.no_grad(), autocast:
                        feats = features(imgs.to(device, non_blocking=True))
                    feats, labels = feats.float(), labels.to(device, non_blocking=True)
                    losses = torch.stack([nn.functional.cross_entropy(p(feats), labels) for p in probes])
                    losses.sum().backward()  # the probes share no parameters: one backward trains them all
                    for group in optimizer.param_groups:
                        group["lr"] = lr_at(step / steps_per_epoch, group["base_lr"], cfg.min_lr, cfg.warmup_epochs,
                                            cfg.epochs)  # fmt: skip
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    images += imgs.shape[0]
                    bar.update(1)
                    if step % cfg.log_every == 0 or step == 1 or step == last_step:
                        values = losses.detach().tolist()  # host sync on logging steps only
                        first_losses = values if first_losses is None else first_losses
                        last_losses = values
                        lrs_now = [g["lr"] for g in optimizer.param_groups[::2]]
                        row = {"step": step, "epoch": step / steps_per_epoch, "losses": values, "lrs": lrs_now}
                        metrics.write(json.dumps(row) + "\n")
                        metrics.flush()
                        bar.set_postfix(loss=f"{min(values):.4f}")
                    if step >= last_step or stop.received:
                        break
                epoch += 1
                scores = score_probes(probes, val_f, val_y, classes)
                metrics.write(json.dumps({"step": step, "epoch": epoch, "probes": scores}) + "\n")
                metrics.flush()
                save_checkpoint({"model": probes.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                                 "epoch": epoch, "config": resolved}, out / LAST)  # fmt: skip
        finally:
            bar.close()
            metrics.close()
    wall = time.perf_counter() - t_start
    scores = score_probes(probes, val_f, val_y, classes)
    knn = None
    if cfg.knn_k > 0:  # training features without augmentation
        train_f, train_y = extract(features, make_loader(loader_name, train_idx, "eval", cfg, device), device,
                                   autocast)  # fmt: skip
        knn = knn_classify(train_f, train_y, val_f, val_y, classes, cfg.knn_k, cfg.knn_t)
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
        "stopped_by": stop.received,
        "images_seen": images,
        "img_per_s": images / max(wall, 1e-9),
        "probes": probes_out,
        "best_probe": best,
        "top1": probes_out[best]["top1"],
        "knn": knn,
        "first_logged_losses": first_losses,
        "final_losses": last_losses,
        "features": "mean-token" if cfg.global_pool else "cls-token",
        "num_classes": classes,
        "skipped_files": len(train_loader.skipped | val_loader.skipped),
        "loader": loader_name,
        "device": device.type,
        "precision": precision,
        **loaded,
        "fastmae": fastmae.__version__,
        "torch": torch.__version__,
    }
    write_json(out / "summary.json", summary)
    summary["table"] = "\n".join(lines)
    return summary
