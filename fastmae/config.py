"""Dataclass configs with named presets. The resolved config is written to ``config.json`` beside the checkpoints."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from .compiling import DEFAULT_VARIANT, GRAPH_MODES, MODES, VARIANTS
from .errors import FastMAEError
from .registry import check_mask_ratio, list_models

LOADERS = ("auto", "dali", "gpu", "torchvision", "synthetic")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
PARALLEL = ("ddp", "fsdp")
INDEX_CHECKS = ("listing", "stat")
COMPILE_MODES = MODES  # torch.compile's


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


def _check_compile(cfg) -> None:
    """``compile``: None (the device decides), a variant, or a bool from older code (True: the default variant)."""
    if isinstance(cfg.compile, bool):
        cfg.compile = DEFAULT_VARIANT if cfg.compile else "off"
    if cfg.compile is not None and cfg.compile not in VARIANTS:
        raise FastMAEError(f"--compile must be one of {', '.join(VARIANTS)}, got {cfg.compile!r}")
    if cfg.compile_mode not in MODES:
        raise FastMAEError(f"--compile-mode must be one of {', '.join(MODES)}, got {cfg.compile_mode!r}")
    if getattr(cfg, "cuda_graphs", False) and cfg.compile_mode in GRAPH_MODES and cfg.compile != "off":
        raise FastMAEError(f"--compile-mode {cfg.compile_mode} captures CUDA graphs of its own inside the step, which "
                           "--cuda-graphs captures whole: use one of them (e.g. --compile-mode "
                           "max-autotune-no-cudagraphs with --cuda-graphs)")  # fmt: skip


def _check_augment(cfg) -> None:
    if not 0 < cfg.crop_scale <= 1:
        raise FastMAEError(f"--crop-scale must be in (0, 1], got {cfg.crop_scale}")
    for name in ("hflip", "reprob"):
        value = getattr(cfg, name, 0.0)
        if not 0 <= value <= 1:
            raise FastMAEError(f"--{name} must be a probability in [0, 1], got {value}")
    if getattr(cfg, "patch_size", None) is not None and cfg.patch_size <= 0:
        raise FastMAEError(f"--patch-size must be positive, got {cfg.patch_size}")


@dataclass
class RunConfig:
    """What every training command (pretrain, finetune, linprobe) is configured by, one section per concern. CLI flags
    are these field names in kebab-case; a command's class may give a field another default or help."""

    # --- the model and where it starts from
    model: str | None = _f(
        "mae_vit_tiny_patch16",
        "model name (fastmae models lists them); with --pretrained, the checkpoint's unless given",
    )
    pretrained: str | None = _f(None, "weights to start from (not set by default)")
    img_size: int = _f(224, "input resolution in pixels")
    # --- data
    data: str | None = _f(None, "the images (default: a built-in data set)")
    index_check: str = _f(
        "listing", "how a start finds changed files in a cached image folder: listing (one stat per folder; misses a "
        "file rewritten in place under the same name) | stat (also one stat per file)"
    )  # fmt: skip
    crop_scale: float = _f(0.2, "smallest RandomResizedCrop area")
    hflip: float = _f(0.5, "horizontal flip probability")
    loader: str = _f("auto", "auto | dali | torchvision")
    num_workers: int | None = _f(None, "loader processes (torchvision) or threads (dali); default min(8, CPU count)")
    # --- schedule and optimizer
    epochs: int = _f(800, "epochs over the data set")
    warmup_epochs: float = _f(40, "linear warmup length in epochs (then cosine decay per iteration)")
    batch_size: int = _f(64, "images per step per process (effective batch = batch x accum-iter x world size)")
    accum_iter: int = _f(1, "accumulate gradients over N batches per optimizer step")
    lr: float | None = _f(None, "absolute learning rate (overrides --blr; unset by default)")
    min_lr: float = _f(0.0, "floor of the cosine schedule")
    weight_decay: float = _f(0.05, "weight decay (not on biases, norms, tokens)")
    clip_grad: float | None = _f(None, "clip the gradient norm to this value (off by default, as in the paper)")
    seed: int = _f(0, "random seed")
    # --- non-finite steps
    nan_guard: bool = _f(True, "skip optimizer updates whose loss or gradients are not finite (no host sync)")
    nan_rollback_after: int = _f(3, "after N non-finite steps in a row, reload the last checkpoint and go on")
    max_rollbacks: int = _f(2, "stop with an error after this many rollbacks")
    # --- where and how it runs
    device: str = _f("auto", "auto | cpu | cuda")
    precision: str = _f("auto", "auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32")
    compile: str | None = _f(
        None, f"torch.compile: off | full (the whole model) | regional (each transformer block once, reused: a "
        f"fraction of full's compile time); --compile alone: {DEFAULT_VARIANT}, --no-compile: off (default: "
        f"{DEFAULT_VARIANT} on CUDA, off on CPU)", const=DEFAULT_VARIANT, choices=VARIANTS, negative="off"
    )  # fmt: skip
    compile_mode: str = _f(
        "default", "torch.compile mode: default | max-autotune-no-cudagraphs (inductor's GEMM autotuning) | "
        "max-autotune | reduce-overhead (these two capture CUDA graphs of their own)"
    )  # fmt: skip
    dist_timeout: float = _f(
        10.0, "minutes a multi-process run waits to join its process group, and in any collective, before it ends "
        "with one line (a lost or missing peer) instead of hanging"
    )  # fmt: skip
    stop_after_steps: int | None = _f(None, "stop once the global step reaches N (schedule unchanged; off by default)")
    # --- the output folder: logs and checkpoints
    output_dir: str = _f("output/pretrain", "where config, metrics, checkpoints and summary go")
    log_every: int = _f(10, "log metrics every N optimizer steps")
    save_every: int | None = _f(
        None, "save checkpoint-last.pth every N steps (off by default; always saved at the end and on SIGTERM)"
    )
    save_interval: float = _f(
        5.0, "minutes: an epoch end saves checkpoint-last.pth only when this long has passed since the last save "
        "(0: every epoch end), so runs of many short epochs do not fill the disk"
    )  # fmt: skip
    keep_every: int | None = _f(
        None, "also keep checkpoint-<step>.pth when a save falls on a multiple of N steps (off by default)"
    )
    resume: str | None = _f(
        None, "checkpoint path (or a run's output folder), or 'auto' for the output folder's checkpoint-last.pth; "
        "needed to write into an --output-dir that holds a run (default: start fresh)"
    )  # fmt: skip
    overwrite: bool = _f(
        False, "start anew in an --output-dir that holds a run: its files are first moved to <dir>/replaced-<time>/ "
        "(nothing is deleted)"
    )  # fmt: skip
    tensorboard: bool | None = _f(None, "TensorBoard event files in <output>/tensorboard (default: when installed)")
    progress: bool = _f(True, "show a progress bar")

    LOADERS: ClassVar[tuple[str, ...]] = ("auto", "dali", "torchvision")
    PRECISIONS: ClassVar[tuple[str, ...]] = ("auto", "bf16", "fp32")

    def validate(self):
        if self.model is None and self.pretrained is None:
            raise FastMAEError("--model is needed when there is no --pretrained checkpoint to read the model from")
        if self.model is not None and self.model not in list_models():
            raise FastMAEError(f"unknown model {self.model!r}; known models: {', '.join(list_models())}")
        for name, choices in (("loader", self.LOADERS), ("device", DEVICES), ("precision", self.PRECISIONS),
                              ("index_check", INDEX_CHECKS)):  # fmt: skip
            if getattr(self, name) not in choices:
                raise FastMAEError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, "
                                   f"got {getattr(self, name)!r}")  # fmt: skip
        for name in ("epochs", "batch_size", "accum_iter", "img_size", "log_every", "nan_rollback_after"):
            if getattr(self, name) <= 0:
                raise FastMAEError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("stop_after_steps", "save_every", "keep_every"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise FastMAEError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.save_interval < 0:
            raise FastMAEError(f"--save-interval must be >= 0 minutes (0: every epoch end), got {self.save_interval}")
        if self.dist_timeout <= 0:
            raise FastMAEError(f"--dist-timeout must be positive minutes, got {self.dist_timeout}")
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            raise FastMAEError(f"--warmup-epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}")
        _check_augment(self)
        _check_compile(self)
        return self

    def effective_batch(self, world_size: int = 1) -> int:
        return self.batch_size * self.accum_iter * world_size

    def scaled_lr(self, blr: float, world_size: int = 1) -> float:
        """The paper's rule: lr = blr x effective batch / 256."""
        return blr * self.effective_batch(world_size) / 256

    def effective_lr(self, world_size: int = 1) -> float:
        """lr = blr x effective batch / 256 (the paper's scaling rule), unless --lr is given."""
        return self.lr if self.lr is not None else self.scaled_lr(self.blr, world_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class PretrainConfig(RunConfig):
    """Everything a pretraining run depends on (the official recipe's defaults)."""

    pretrained: str | None = _f(
        None, "start from these weights: a fastmae checkpoint, an official MAE .pth (full, or encoder-only: fresh "
        "decoder) or a transformers ViT-MAE folder; model, image size and norm-pix loss come from it unless given "
        "(not set by default)"
    )  # fmt: skip
    data: str | None = _f(
        None,
        "folder of images (searched recursively; ImageFolder sub-folders give labels), a folder of webdataset .tar "
        "shards, a .tar, a brace pattern like shards/train-{0000..0146}.tar, or 'digits' (the training split of "
        "scikit-learn's digits; labels unused) (default: scikit-image's photos)",
    )
    crop_scale: float = _f(0.2, "smallest RandomResizedCrop area (the paper: 0.2)")
    loader: str = _f(
        "auto", "auto (torchvision; on CUDA, dali once its GPU path has run on a GPU: docs/data.md) | dali | gpu "
        "(workers read bytes; nvJPEG + one fused kernel on the GPU; only when asked for until a GPU sitting measures "
        "it faster) | torchvision | synthetic"
    )  # fmt: skip
    weight_decay: float = _f(0.05, "AdamW weight decay (not on biases, norms, tokens)")
    precision: str = _f(
        "auto", "auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp16 (autocast + dynamic GradScaler) | fp32"
    )
    # --- pretraining's own
    patch_size: int | None = _f(None, "patch size in pixels (default: the model's, e.g. 16 for *_patch16)")
    blr: float = _f(1.5e-4, "base learning rate: lr = blr * effective batch / 256 (batch x accum-iter x processes)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    mask_ratio: float = _f(0.75, "fraction of patches removed, in [0, 1)")
    norm_pix_loss: bool = _f(False, "normalise each target patch by its mean and std")
    encoder_mode: str = _f("visible", "visible (MAE) or mask_token (encoder sees all patches)")
    synthetic_images: int = _f(4096, "images per epoch for --loader synthetic")
    kernels: str = _f("auto", "auto | reference | triton, or per op: masking=triton,masked_mse=reference")
    attn_backend: str = _f(
        "auto", "auto (on a GPU: the fastest backend measured per call site, fastmae/attention_table.json; else the "
        "first of xformers, sdpa, math that can run) | xformers | sdpa | flash | cudnn | efficient | math, or per call "
        "site: encoder=flash,decoder=efficient"
    )  # fmt: skip
    parallel: str = _f(
        "ddp", "under torchrun: ddp (DistributedDataParallel) | fsdp (FSDP2 fully_shard per block, for ViT-H and up)"
    )
    cuda_graphs: bool = _f(
        False, "run the whole step (forward, backward, AdamW) as one CUDA graph: one process, --accum-iter 1, bf16 or "
        "fp32 (off by default: no GPU sitting has measured it yet; docs/benchmarks.md)"
    )  # fmt: skip
    num_reconstructions: int = _f(8, "fixed images shown in each reconstructions/*.png")
    picture_scale: int | None = _f(
        None, "draw each pixel of the reconstruction pictures as an N x N block (default: the smallest N that draws an "
        "image at least 96 pixels high)"
    )  # fmt: skip
    picture_every: int | None = _f(1000, "reconstruction picture + eval loss every N steps (0: only at start and end)")

    LOADERS: ClassVar[tuple[str, ...]] = ("auto", "dali", "gpu", "torchvision", "synthetic")
    PRECISIONS: ClassVar[tuple[str, ...]] = ("auto", "bf16", "fp16", "fp32")

    def validate(self) -> PretrainConfig:
        super().validate()
        check_mask_ratio(self.mask_ratio)
        if self.parallel not in PARALLEL:
            raise FastMAEError(f"--parallel must be one of {', '.join(PARALLEL)}, got {self.parallel!r}")
        for name in ("synthetic_images", "patch_size", "picture_scale"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise FastMAEError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.picture_every is not None and self.picture_every < 0:
            raise FastMAEError(f"--picture-every must be >= 0 (0: only at start and end), got {self.picture_every}")
        if self.cuda_graphs and self.compile_mode in GRAPH_MODES and self.compile != "off":
            raise FastMAEError(f"--compile-mode {self.compile_mode} captures CUDA graphs of its own inside the step, "
                               "which --cuda-graphs captures whole: use one of them (e.g. --compile-mode "
                               "max-autotune-no-cudagraphs with --cuda-graphs)")  # fmt: skip
        return self

    def recipe_check(self, world_size: int, steps_per_epoch: int) -> tuple[list[str], list[str]]:
        """(summary lines, warnings) about the recipe this configuration amounts to, printed at the start."""
        eff = self.effective_batch(world_size)
        total = self.epochs * steps_per_epoch
        warmup = round(self.warmup_epochs * steps_per_epoch)
        lines = [
            f"effective batch {eff} = {self.batch_size} per step x {self.accum_iter} accumulation x {world_size} "
            + ("process" if world_size == 1 else "processes"),
            f"lr {self.effective_lr(world_size):.3g}"
            + ("" if self.lr is not None else f" = blr {self.blr:g} x {eff} / 256"),
            f"{steps_per_epoch} steps/epoch, warmup {warmup} steps ({self.warmup_epochs:g} epochs), {total} steps",
        ]
        warns = []
        if self.stop_after_steps is None and warmup >= total:
            warns.append(f"warmup ({warmup} steps) is as long as the whole run ({total}): the lr never decays")
        elif self.warmup_epochs > 0.5 * self.epochs:
            warns.append(
                f"warmup is {self.warmup_epochs:g} of {self.epochs} epochs: unusually long (the paper: 40/800)"
            )
        if self.model in ("mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"):
            if not 1024 <= eff <= 16384:
                warns.append(f"effective batch {eff} is far from the recipe's 4096; raise --accum-iter or check blr")
        if not 0.6 <= self.mask_ratio <= 0.9:
            warns.append(f"mask ratio {self.mask_ratio:g} is unusual (the paper finds 0.75 best; 0.6-0.9 work)")
        return lines, warns


PRESETS: dict[str, PretrainConfig] = {
    # The default: a tiny MAE on the bundled photos that visibly learns in a few minutes on a 2-core CPU.
    "demo": PretrainConfig(
        model="mae_vit_tiny_patch16", img_size=96, epochs=150, warmup_epochs=5, batch_size=8, blr=0.05,
        output_dir="output/demo", log_every=5, picture_every=250,
    ),
    # MAE on small images: the training split of scikit-learn's digits (1438 images, 8x8 upscaled to 32 px, labels
    # unused), patch 4, a 6-block ViT. Changed from the ImageNet recipe for 1.4k images and 2 CPU cores (timed in docs):
    # batch 64 (22 steps/epoch) with a larger blr (lr 1e-3), 10 warmup epochs; crops keep most of a digit (scale 0.35:
    # at 0.2 an 8-pixel digit becomes a stroke) and no flips (a mirrored digit is another symbol).
    "digits": PretrainConfig(
        model="mae_vit_mini_patch4", img_size=32, data="digits", epochs=100, warmup_epochs=10, batch_size=64,
        blr=4e-3, norm_pix_loss=True, crop_scale=0.35, hflip=0.0, output_dir="output/digits", log_every=20,
        picture_every=500, picture_scale=4, num_reconstructions=8,
    ),
    # The official MAE recipe (facebookresearch/mae PRETRAIN.md): batch 4096, blr 1.5e-4, 40 warmup epochs, norm-pix.
    **{
        name: PretrainConfig(
            model=name, img_size=224, epochs=800, warmup_epochs=40, batch_size=4096, blr=1.5e-4, norm_pix_loss=True,
            output_dir=f"output/{name}", log_every=20, save_every=1000,
        )
        for name in ("mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14")
    },
}  # fmt: skip


def preset(name: str) -> PretrainConfig:
    if name not in PRESETS:
        raise FastMAEError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


# ---------------------------------------------------------------------- downstream: finetune and linear probe
@dataclass
class _DownstreamConfig(RunConfig):
    """What finetuning and linear probing share beyond :class:`RunConfig`: labelled data and a pretrained encoder."""

    model: str | None = _f(
        "mae_vit_tiny_patch16", "encoder of this MAE model (fastmae models lists them); with --pretrained, the "
        "checkpoint's architecture unless given"
    )  # fmt: skip
    pretrained: str | None = _f(
        None, "checkpoint to start from: fastmae pretrain/finetune, official {'model': ...} (full or encoder-only), "
        ".pth or .safetensors, or a transformers ViT-MAE folder (ViTMAEForPreTraining or ViTMAEModel) (default: "
        "random init, with a warning)"
    )  # fmt: skip
    img_size: int = _f(224, "input resolution (the position table is resampled from the checkpoint's)")
    data: str | None = _f(
        None, "ImageFolder layout: DIR/train/<class>/* and DIR/val/<class>/*, or DIR/<class>/* split by --val-split "
        "(default, or 'digits': scikit-learn's handwritten digits, 10 classes, no download)"
    )  # fmt: skip
    crop_scale: float = _f(0.08, "smallest RandomResizedCrop area (the paper: 0.08)")
    loader: str = _f("auto", "auto (torchvision; dali once its GPU path has run on a GPU) | dali | torchvision")
    output_dir: str = _f("output/finetune", "where config, metrics, checkpoints and summary go")
    epochs: int = _f(100, "epochs over the training set")
    warmup_epochs: float = _f(5, "linear warmup length in epochs (then cosine decay per iteration)")
    min_lr: float = _f(1e-6, "floor of the cosine schedule")
    clip_grad: float | None = _f(None, "clip the gradient norm to this value (off by default)")
    save_interval: float = _f(
        5.0, "minutes: an epoch end saves checkpoint-last.pth only when this long has passed since the last save "
        "(0: every epoch end; checkpoint-best.pth is written whenever top-1 improves)"
    )  # fmt: skip
    val_split: float = _f(0.2, "fraction held out for validation when --data has no train/ and val/ folders")

    def validate(self):
        super().validate()
        if not 0 < self.val_split < 1:
            raise FastMAEError(f"--val-split must be in (0, 1), got {self.val_split}")
        return self


@dataclass
class FinetuneConfig(_DownstreamConfig):
    """End-to-end finetuning with the paper's recipe (facebookresearch/mae FINETUNE.md)."""

    blr: float = _f(1e-3, "base learning rate: lr = blr * effective batch / 256")
    layer_decay: float = _f(0.75, "layer-wise lr decay: block i gets decay^(depth + 1 - (i + 1)) (0.65 for ViT-B)")
    drop_path: float = _f(0.1, "stochastic depth rate (0.1 B, 0.2 L, 0.3 H)")
    mixup: float = _f(0.8, "mixup alpha (0 turns it off)")
    cutmix: float = _f(1.0, "cutmix alpha (0 turns it off)")
    smoothing: float = _f(0.1, "label smoothing")
    ema: bool = _f(False, "keep an exponential moving average of the weights (timm ModelEmaV3) and evaluate it too")
    ema_decay: float = _f(0.9999, "EMA decay per optimizer step")
    rand_augment: str = _f("rand-m9-mstd0.5-inc1", "timm RandAugment policy of the loader ('none': off)")
    reprob: float = _f(0.25, "random erasing probability")

    def validate(self):
        super().validate()
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            raise FastMAEError(f"mixup/cutmix need an even --batch-size, got {self.batch_size}")
        if not 0 < self.layer_decay <= 1:
            raise FastMAEError(f"--layer-decay must be in (0, 1], got {self.layer_decay}")
        return self


@dataclass
class LinprobeConfig(_DownstreamConfig):
    """Linear probing of the frozen encoder (facebookresearch/mae LINPROBE.md), several lrs in one pass, plus kNN."""

    output_dir: str = _f("output/linprobe", "where config, metrics, checkpoints and summary go")
    epochs: int = _f(90, "epochs over the training set")
    warmup_epochs: float = _f(10, "linear warmup length in epochs")
    lr: float | None = _f(None, "one probe with this absolute learning rate instead of --probe-blrs (unset by default)")
    weight_decay: float = _f(0.0, "LARS weight decay")
    min_lr: float = _f(0.0, "floor of the cosine schedule")
    probe_blrs: str = _f("0.05,0.1,0.2,0.4", "base learning rates of the probes trained side by side on the same "
                         "features, lr = blr * effective batch / 256 (the paper's blr is 0.1)")  # fmt: skip
    global_pool: bool = _f(False, "probe the mean of the patch tokens instead of the cls token")
    knn_k: int = _f(20, "neighbours for the kNN evaluation (0 turns it off)")
    knn_t: float = _f(0.07, "temperature of the kNN vote weights exp(sim / t)")

    def probe_lrs(self, world_size: int = 1) -> list[float]:
        return [self.lr] if self.lr is not None else [self.scaled_lr(b, world_size) for b in self.blrs()]

    def blrs(self) -> list[float]:
        try:
            values = [float(x) for x in self.probe_blrs.split(",") if x.strip()]
        except ValueError as exc:
            raise FastMAEError(f"--probe-blrs must be comma-separated numbers, got {self.probe_blrs!r}") from exc
        if not values or any(v <= 0 for v in values):
            raise FastMAEError(f"--probe-blrs must be positive numbers, got {self.probe_blrs!r}")
        return values

    def validate(self):
        super().validate()
        self.blrs()
        if self.knn_k < 0:
            raise FastMAEError(f"--knn-k must be >= 0, got {self.knn_k}")
        return self


_OFFICIAL_FT = {  # FINETUNE.md: effective batch 1024, 5 warmup epochs, wd 0.05, mixup 0.8, cutmix 1.0, reprob 0.25
    "mae_vit_base_patch16": dict(blr=5e-4, layer_decay=0.65, drop_path=0.1, epochs=100),
    "mae_vit_large_patch16": dict(blr=1e-3, layer_decay=0.75, drop_path=0.2, epochs=50),
    "mae_vit_huge_patch14": dict(blr=1e-3, layer_decay=0.75, drop_path=0.3, epochs=50),
}
DIGITS_CHECKPOINT = "output/digits/checkpoint-last.pth"  # what fastmae pretrain --preset digits writes
FINETUNE_PRESETS: dict[str, FinetuneConfig] = {
    # A tiny ViT on scikit-learn's digits (upscaled to 32 px): minutes on a 2-core CPU.
    "demo": FinetuneConfig(img_size=32, epochs=10, warmup_epochs=1, batch_size=32, blr=2e-3, layer_decay=0.75,
                           drop_path=0.0, output_dir="output/finetune-demo", log_every=10),
    # From the digits pretraining (fastmae pretrain --preset digits); --pretrained none for the same recipe from
    # scratch. Changed for 1.4k images of 8x8 pixels: no RandAugment, random erasing, mixup or cutmix (they wipe out
    # most of a digit; with this little data they only add noise), crops keep most of the digit and no flips, as in
    # the digits pretraining; batch 64 with lr 1e-3. Kept: AdamW, layer decay 0.75, drop path 0.1, label smoothing
    # 0.1, warmup + cosine, global pool + fc_norm.
    "digits": FinetuneConfig(model="mae_vit_mini_patch4", pretrained=DIGITS_CHECKPOINT, img_size=32, epochs=15,
                             warmup_epochs=2, batch_size=64, blr=4e-3, layer_decay=0.75, drop_path=0.1, mixup=0.0,
                             cutmix=0.0, smoothing=0.1, rand_augment="none", reprob=0.0, crop_scale=0.35, hflip=0.0,
                             output_dir="output/finetune-digits", log_every=20),
    **{
        name: FinetuneConfig(model=name, img_size=224, batch_size=1024, warmup_epochs=5, output_dir=f"output/ft-{name}",
                             log_every=20, **kw)
        for name, kw in _OFFICIAL_FT.items()
    },
}  # fmt: skip
LINPROBE_PRESETS: dict[str, LinprobeConfig] = {
    # LARS moves small probes slowly (trust ratio 0.001): a 220-step demo needs far larger blrs than the 90-epoch
    # recipe.
    "demo": LinprobeConfig(img_size=32, epochs=10, warmup_epochs=1, batch_size=64, probe_blrs="100,400,1600",
                           output_dir="output/linprobe-demo"),
    "digits": LinprobeConfig(model="mae_vit_mini_patch4", pretrained=DIGITS_CHECKPOINT, img_size=32, epochs=10,
                             warmup_epochs=1, batch_size=64, probe_blrs="100,400,1600", crop_scale=0.35, hflip=0.0,
                             output_dir="output/linprobe-digits"),
    # LINPROBE.md: batch 16384, blr 0.1, LARS, wd 0, 90 epochs, 10 warmup; cls token (H: 50 epochs)
    **{
        name: LinprobeConfig(model=name, img_size=224, batch_size=16384, epochs=50 if "huge" in name else 90,
                             output_dir=f"output/lp-{name}", log_every=20)
        for name in _OFFICIAL_FT
    },
}  # fmt: skip


# ---------------------------------------------------------------------- fastmae bench
BENCH_CONFIGS = ("eager", "compiled-reference", "fastmae", "mask-token")


def _csv(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


@dataclass
class BenchConfig:
    """``fastmae bench``: the pretraining step of the official models in several configurations side by side, built
    through the training loop's own run context and step (see ``train/bench.py``)."""

    suite: str = _f("pretrain", "what to measure: pretrain (the kernel, loader and finetune benchmarks are scripts of "
                    "their own in benchmarks/)")  # fmt: skip
    models: str = _f(
        "mae_vit_base_patch16,mae_vit_large_patch16,mae_vit_huge_patch14", "models to run, comma-separated"
    )
    decoder_depths: str = _f("8,1", "decoder depths to run for each model")
    configs: str = _f(",".join(BENCH_CONFIGS), f"pretrain configurations to run: {', '.join(BENCH_CONFIGS)}")
    batch: int | None = _f(None, "images per step (default: B 256, L 128, H 64, fixed per model)")
    batches: str | None = _f(
        None, "batch sweep of the fastmae rows beside the fixed batch, e.g. 64,256,512 (img/s, peak memory, knee)"
    )
    steps: int = _f(10, "timed steps per configuration")
    warmup: int = _f(3, "untimed steps first (compilation, autotuning)")
    device: str = _f("auto", "auto (cuda if available, else cpu) | cpu | cuda")
    quick: bool = _f(False, "tiny shapes on any device: checks the suite, not a number")
    out: str | None = _f(None, "results JSON path (default: ./fastmae-bench-<gpu>-<date>.json in the current folder)")
    profile: bool = _f(
        False, "after timing each configuration, profile 2 steps: time by category and idle, top kernels (CPU ops on "
        "a CPU)"
    )  # fmt: skip
    graphs: bool = _f(False, "also time each compiled configuration with the whole step as one CUDA graph (CUDA only)")
    attn_backend: str | None = _f(
        None, "attention of the fastmae rows: a backend, or per call site encoder=flash,decoder=efficient (default: "
        "auto, from the measured table)"
    )  # fmt: skip
    attn_table: str | None = _f(None, "the measured attention table auto reads (default: fastmae/attention_table.json)")
    compile: str = _f(
        DEFAULT_VARIANT, f"how the compiled configurations compile (on CUDA): full, regional, or both side by side as "
        f"full,regional; --compile alone: {DEFAULT_VARIANT}; --no-compile: none compiles", const=DEFAULT_VARIANT,
        negative="off"
    )  # fmt: skip
    compile_mode: str = _f("default", f"torch.compile mode of the compiled configurations: {' | '.join(MODES)}")
    optimizer_bench: bool = _f(False, "also time one AdamW update per model: fused (the loop's) vs compiled foreach")
    report: list[str] | None = _f(
        None, "draw the chart and table from these results JSONs instead of measuring (several: merged, as one "
        "sitting's)", nargs="+"
    )  # fmt: skip
    png: str | None = _f(None, "chart path for --report (default: the first JSON's path with .png)")
    readme: str | None = _f(None, "the page to update between the markers (--report): docs/benchmarks.md")
    marker: str = _f("fastmae-bench", "which markers hold the table (--report): fastmae-bench-gpu for a GPU sitting")

    def validate(self) -> BenchConfig:
        if others := [x for x in _csv(self.suite) if x != "pretrain"]:
            raise FastMAEError(f"--suite {','.join(others)}: fastmae bench measures the pretraining step; run "
                               + ", ".join(f"python benchmarks/bench_{x}.py" for x in others) + " instead")
        if unknown := set(self.config_names) - set(BENCH_CONFIGS):
            raise FastMAEError(f"--configs: unknown {', '.join(sorted(unknown))}; choose from "
                               f"{', '.join(BENCH_CONFIGS)}")  # fmt: skip
        self.batch_sizes  # noqa: B018 (a one-line error when they are not numbers)
        try:
            self.depths  # noqa: B018
        except ValueError:
            raise FastMAEError(f"--decoder-depths must be whole numbers separated by commas, got "
                               f"{self.decoder_depths!r}") from None  # fmt: skip
        if not self.variants or set(self.variants) - set(VARIANTS):
            raise FastMAEError(f"--compile: {self.compile!r}; give one or more of {', '.join(VARIANTS)}, "
                               "comma-separated")  # fmt: skip
        if self.compile_mode not in MODES:
            raise FastMAEError(f"--compile-mode must be one of {', '.join(MODES)}, got {self.compile_mode!r}")
        if self.graphs and self.compile_mode in GRAPH_MODES:
            raise FastMAEError(f"--compile-mode {self.compile_mode} captures CUDA graphs of its own, which --graphs "
                               "captures whole: use one of them (max-autotune-no-cudagraphs goes with --graphs)")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise FastMAEError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        for name in ("steps", "batch"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise FastMAEError(f"--{name} must be positive, got {value}")
        if self.attn_backend is not None:
            from .attention import parse_sites

            parse_sites(self.attn_backend)  # a bad spec is one line now, not after the first model compiled
        return self

    @property
    def model_names(self) -> list[str]:
        return _csv(self.models)

    @property
    def depths(self) -> list[int]:
        return [int(d) for d in _csv(self.decoder_depths)]

    @property
    def config_names(self) -> list[str]:
        return _csv(self.configs)

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        try:
            return tuple(int(b) for b in _csv(self.batches))
        except ValueError:
            raise FastMAEError(f"--batches must be whole numbers separated by commas, got {self.batches!r}") from None

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(_csv(self.compile))
