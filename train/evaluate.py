"""Evaluation and the probes' parts, for finetuning and linear probing: classification top-1 / top-5 over a whole
validation set (every rank its shard, the sums reduced), the features of a frozen encoder, the linear probes (BatchNorm
without affine + linear, LARS groups) and their scores, a weighted kNN vote, and timm's layer-decay groups. ``autocast``
arguments are the run context's :meth:`~fastmae.train.context.RunContext.autocast`."""

from __future__ import annotations

import torch
from torch import nn

from .data import model_input, on_device
from .distributed import DistContext


def layer_decay_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """timm's layer-decay groups, which follow the official rule (BEiT / MAE ``param_groups_lrd``): block i has
    ``lr_scale = decay ** (depth + 1 - (i + 1))``; cls token, position table and patch embedding are layer 0; the
    final norms and the head are layer depth + 1 (scale 1). No weight decay on 1-D parameters and tokens."""
    from timm.optim import param_groups_layer_decay

    return param_groups_layer_decay(model, weight_decay, no_weight_decay_list=model.no_weight_decay(),
                                    layer_decay=layer_decay)  # fmt: skip


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, autocast, classes: int,
             ctx: DistContext | None = None, bands=None) -> dict:  # fmt: skip
    """Cross-entropy, top-1 and top-5 (%) over the whole validation set. Sums stay on the device (one host sync at
    the end) and, under torchrun, are added up over the ranks' disjoint shards. ``bands``: the run's, whose
    statistics normalise the batches (None: 8-bit RGB, ImageNet's)."""
    was_training = model.training
    model.eval()
    k = min(5, classes)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, images
    for batch in on_device(loader.epoch(0), device):
        labels = batch.labels
        with autocast():
            logits = model(model_input(batch.images, bands))
        logits = logits.float()
        hit = logits.topk(k, dim=1).indices == labels[:, None]  # [B, k]
        sums += torch.stack([
            torch.nn.functional.cross_entropy(logits, labels, reduction="sum").double(),
            hit[:, 0].sum().double(),
            hit.any(dim=1).sum().double(),
            torch.tensor(labels.numel(), dtype=torch.float64, device=device),
        ])  # fmt: skip
    if ctx is not None:
        sums = ctx.sum(sums)
    loss_sum, hits1, hits5, n = sums.tolist()
    model.train(was_training)
    n = max(n, 1)
    return {"val_loss": loss_sum / n, "top1": 100 * hits1 / n, "top5": 100 * hits5 / n}


def make_probe(dim: int, classes: int) -> nn.Sequential:
    """BatchNorm without affine (a parameter-free feature normaliser) + a linear classifier (init std 0.01)."""
    probe = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, classes))
    nn.init.trunc_normal_(probe[1].weight, std=0.01)
    nn.init.zeros_(probe[1].bias)
    return probe


def lars_groups(probes: nn.ModuleList, lrs: list[float], weight_decay: float) -> list[dict]:
    """Per probe: its weight matrix with weight decay and the LARS trust ratio, its bias with neither. Each group's
    ``lr_scale`` is its probe's lr over the first's (the schedule scales ``lrs[0]``)."""
    groups = []
    for probe, lr in zip(probes, lrs, strict=True):
        linear, scale = probe[1], lr / lrs[0]
        groups.append({"params": [linear.weight], "lr": lr, "lr_scale": scale, "weight_decay": weight_decay,
                       "always_adapt": True})  # fmt: skip
        groups.append({"params": [linear.bias], "lr": lr, "lr_scale": scale, "weight_decay": 0.0,
                       "always_adapt": False})  # fmt: skip
    return groups


def gather_features(feats: torch.Tensor, labels: torch.Tensor, ctx: DistContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's features [n_rank, D] and labels [n_rank], in rank order, on every rank (row counts may differ:
    a host sync). The labels travel as a last column (exact in float32 below 2**24 classes), so both go at once."""
    if not ctx.enabled:
        return feats, labels
    rows = ctx.gather_rows(torch.cat([feats, labels.to(feats.device, torch.float32)[:, None]], dim=1))
    return rows[:, :-1], rows[:, -1].long()


@torch.no_grad()
def extract(encoder: nn.Module, loader, device: torch.device, autocast, dim: int,
            ctx: DistContext | None = None, bands=None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Features [N, D] (float32) and labels [N] of this rank's shard of an eval loader; with ``ctx``, every rank's
    shard gathered (the whole set, each image once). ``bands``: as for :func:`evaluate`."""
    feats, labels = [torch.empty(0, dim, device=device)], [torch.empty(0, dtype=torch.long, device=device)]
    for batch in on_device(loader.epoch(0), device):
        with autocast():
            feats.append(encoder(model_input(batch.images, bands)).float())
        labels.append(batch.labels)
    feats, labels = torch.cat(feats), torch.cat(labels)
    if ctx is not None:
        feats, labels = gather_features(feats, labels, ctx)
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


def probe_table(probes: list[dict], knn: dict | None) -> str:
    """The probes and kNN as a Markdown table (what ``fastmae linprobe`` prints)."""
    lines = ["| probe | lr | top-1 | top-5 |", "| --- | --- | --- | --- |"]
    for p in probes:
        name = f"linear, blr {p['blr']:g}" if p["blr"] is not None else "linear"
        lines.append(f"| {name} | {p['lr']:.3g} | {p['top1']:.2f} | {p['top5']:.2f} |")
    if knn is not None:
        lines.append(f"| kNN, k={knn['k']}, t={knn['t']:g} | - | {knn['top1']:.2f} | {knn['top5']:.2f} |")
    return "\n".join(lines)
