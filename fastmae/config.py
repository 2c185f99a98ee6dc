"""Configs: one dataclass per concern, composed per command; named presets. The resolved config is written to
``config.json`` beside the checkpoints.

A command's configuration (:class:`PretrainConfig`, :class:`FinetuneConfig`, :class:`LinprobeConfig`,
:class:`BenchConfig`) is made of sections, one dataclass per concern (torchtitan's ``job_config`` shape): what the
training commands share (:class:`Model`, :class:`Data`, :class:`Optimisation`, :class:`Run`, :class:`Checkpointing`),
then the command's own. A field lives in one section; a command states only where its defaults or help differ
(``DEFAULTS``, ``HELP``, ``CHOICES``), and a preset is a set of values. The CLI's flags are the field names in
kebab-case, in section order; a config reads and writes its fields flat (``cfg.batch_size``) or by section
(``cfg.optimisation.batch_size``).

Every choice list is defined once here (the data layer, the compile helper and the run spec import them), and every
check that spans fields is written once. No torch is imported: ``fastmae --help`` parses flags in a fraction of a
second.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

from .errors import FastMAEError
from .registry import check_mask_ratio, list_models

# ---------------------------------------------------------------------- the choice lists (each defined once)
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
LOADERS = ("auto", "dali", "gpu", "torchvision", "synthetic")
PRETRAIN_ONLY_LOADERS = ("gpu", "synthetic")  # the GPU loader has the pretrain pipeline only; synthetic has no labels
PARALLEL = ("ddp", "fsdp")  # under torchrun: DistributedDataParallel, or FSDP2
INDEX_CHECKS = ("listing", "stat")  # how a start finds changed files in a cached image folder
VARIANTS = ("off", "full", "regional")  # --compile (fastmae.compiling)
# What --compile alone (and "auto" on CUDA) means. Full: the variant the first H200 sitting measured; the next sitting
# times regional beside it (benchmarks/gpu_sitting.py --stage step), and that measurement chooses.
DEFAULT_VARIANT = "full"
MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")  # torch.compile's modes
GRAPH_MODES = ("max-autotune", "reduce-overhead")  # modes that capture CUDA graphs of their own
BENCH_CONFIGS = ("eager", "compiled-reference", "fastmae", "mask-token")


def _f(default, help: str, **kw):
    """A field with its help text (the CLI's) and options: ``choices``, ``positive`` (None allowed when the default
    is None), ``probability``, and the CLI's ``const`` / ``negative`` / ``nargs``."""
    return field(default=default, metadata={"help": help, **kw})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ---------------------------------------------------------------------- the checks that span fields (each once)
def check_graph_mode(graphs: bool, compile: str | None, compile_mode: str, flag: str = "--cuda-graphs") -> None:
    """A whole-step CUDA graph (``flag``) and a compile mode that captures graphs of its own exclude each other."""
    if graphs and compile_mode in GRAPH_MODES and compile != "off":
        raise FastMAEError(f"--compile-mode {compile_mode} captures CUDA graphs of its own inside the step, which "
                           f"{flag} captures whole: use one of them (e.g. --compile-mode max-autotune-no-cudagraphs "
                           f"with {flag})")  # fmt: skip


def check_compile(compile: str | bool | None, compile_mode: str) -> str | None:
    """``compile``: None (the device decides), a variant, or a bool from older code (True: the default variant);
    returns the variant (or None)."""
    if isinstance(compile, bool):
        compile = DEFAULT_VARIANT if compile else "off"
    if compile is not None and compile not in VARIANTS:
        raise FastMAEError(f"--compile must be one of {', '.join(VARIANTS)}, got {compile!r}")
    if compile_mode not in MODES:
        raise FastMAEError(f"--compile-mode must be one of {', '.join(MODES)}, got {compile_mode!r}")
    return compile


# ---------------------------------------------------------------------- sections shared by the training commands
@dataclass
class Model:
    """The model and where it starts from."""

    model: str | None = _f(
        "mae_vit_tiny_patch16",
        "model name (fastmae models lists them); with --pretrained, the checkpoint's unless given",
    )
    pretrained: str | None = _f(
        None, "start from these weights: a fastmae checkpoint, an official MAE .pth (full, or encoder-only: fresh "
        "decoder) or a transformers ViT-MAE folder; model, image size and norm-pix loss come from it unless given "
        "(not set by default)"
    )  # fmt: skip
    img_size: int = _f(224, "input resolution in pixels", positive=True)

    def check(self) -> None:
        if self.model is None and self.pretrained is None:
            raise FastMAEError("--model is needed when there is no --pretrained checkpoint to read the model from")
        if self.model is not None and self.model not in list_models():
            raise FastMAEError(f"unknown model {self.model!r}; known models: {', '.join(list_models())}")


@dataclass
class Data:
    """The images, how a start checks them, and how the loader reads and augments them."""

    data: str | None = _f(
        None,
        "folder of images (searched recursively; ImageFolder sub-folders give labels), a folder of webdataset .tar "
        "shards, a .tar, a brace pattern like shards/train-{0000..0146}.tar, or 'digits' (the training split of "
        "scikit-learn's digits; labels unused) (default: scikit-image's photos)",
    )
    index_check: str = _f(
        "listing", "how a start finds changed files in a cached image folder: listing (one stat per folder; misses a "
        "file rewritten in place under the same name) | stat (also one stat per file)", choices=INDEX_CHECKS
    )  # fmt: skip
    crop_scale: float = _f(0.2, "smallest RandomResizedCrop area (the paper: 0.2)")
    hflip: float = _f(0.5, "horizontal flip probability", probability=True)
    loader: str = _f(
        "auto", "auto (torchvision; on CUDA, dali once its GPU path has run on a GPU: docs/data.md) | dali | gpu "
        "(workers read bytes; nvJPEG + one fused kernel on the GPU; only when asked for until a GPU sitting measures "
        "it faster) | torchvision | synthetic", choices=LOADERS
    )  # fmt: skip
    num_workers: int | None = _f(None, "loader processes (torchvision) or threads (dali); default min(8, CPU count)")
    bands: str | None = _f(
        None, "the data's bands to use, by name or 0-based index, comma-separated (e.g. B02,B03,B04,B08); as many "
        "names as the data has unnamed bands name them (default: every band, as stored)"
    )  # fmt: skip
    nodata: float | None = _f(
        None, "a pixel value that means no data (nan allowed): left out of the statistics and filled with its band's "
        "mean before normalising (not set by default)"
    )  # fmt: skip
    norm: str | None = _f(
        None, "per-band normalisation: auto (each band's mean and std from a seeded sample of the data, cached with "
        "the index) | imagenet (3 8-bit bands) | FILE.json (mean and std lists, or a run's config.json) (default: "
        "imagenet for 3 8-bit bands, else auto)"
    )  # fmt: skip
    mean: str | None = _f(None, "per-band means in the data's units, comma-separated, with --std (instead of --norm)")
    std: str | None = _f(None, "per-band standard deviations in the data's units, comma-separated, with --mean")

    def check(self) -> None:
        if not 0 < self.crop_scale <= 1:
            raise FastMAEError(f"--crop-scale must be in (0, 1], got {self.crop_scale}")
        from .bands import parse_band_flags

        parse_band_flags(self.bands, self.nodata, self.norm, self.mean, self.std)  # each a one-line error, now


@dataclass
class Optimisation:
    """The schedule, the optimizer's shared settings, the seed, and what a non-finite step does."""

    epochs: int = _f(800, "epochs over the data set", positive=True)
    warmup_epochs: float = _f(40, "linear warmup length in epochs (then cosine decay per iteration)")
    batch_size: int | None = _f(
        64, "images per step per process (effective batch = batch x accum-iter x processes); with a --recipe-batch "
        "and no --batch-size, chosen to fit the GPU (docs/pretraining.md); --batch-size alone keeps its meaning and "
        "drops the preset's recipe batch", positive=True
    )  # fmt: skip
    accum_iter: int | None = _f(
        1, "accumulate gradients over N batches per optimizer step (with a --recipe-batch and no --accum-iter, "
        "chosen with the batch)", positive=True
    )  # fmt: skip
    recipe_batch: int | None = _f(
        None, "effective batch to keep at any number of processes (batch x accum-iter x processes): what of "
        "--batch-size and --accum-iter is not given is chosen to make it (unset by default)", positive=True
    )  # fmt: skip
    lr: float | None = _f(None, "absolute learning rate (overrides --blr; unset by default)")
    min_lr: float = _f(0.0, "floor of the cosine schedule")
    weight_decay: float = _f(0.05, "AdamW weight decay (not on biases, norms, tokens)")
    clip_grad: float | None = _f(None, "clip the gradient norm to this value (off by default, as in the paper)")
    seed: int = _f(0, "random seed")
    nan_guard: bool = _f(True, "skip optimizer updates whose loss or gradients are not finite (no host sync)")
    nan_rollback_after: int = _f(3, "after N non-finite steps in a row, reload the last checkpoint and go on",
                                 positive=True)  # fmt: skip
    max_rollbacks: int = _f(2, "stop with an error after this many rollbacks")

    def check(self) -> None:
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            raise FastMAEError(f"--warmup-epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}")


@dataclass
class Run:
    """Where and how it runs: the device, precision and compilation, the process group's waits, an early stop."""

    device: str = _f("auto", "auto | cpu | cuda", choices=DEVICES)
    precision: str = _f(
        "auto", "auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp16 (autocast + dynamic GradScaler) | fp32",
        choices=PRECISIONS,
    )
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
    stop_after_steps: int | None = _f(None, "stop once the global step reaches N (schedule unchanged; off by default)",
                                      positive=True)  # fmt: skip
    world_size: int | None = _f(
        None, "processes the batch is chosen for (default: the launcher's, torchrun's WORLD_SIZE or SLURM_NTASKS, "
        "else 1); a run checks it against the launcher's, --print-config plans with it", positive=True
    )  # fmt: skip
    gpu_mem: float | None = _f(
        None, "GiB of memory per GPU that the batch is chosen to fit (default: the GPU's own; no limit without one)",
        positive=True,
    )

    def check(self) -> None:
        self.compile = check_compile(self.compile, self.compile_mode)
        if self.dist_timeout <= 0:
            raise FastMAEError(f"--dist-timeout must be positive minutes, got {self.dist_timeout}")


@dataclass
class Checkpointing:
    """The output folder: logs, checkpoints and when they are written, resuming."""

    output_dir: str = _f("output/pretrain", "where config, metrics, checkpoints and summary go")
    log_every: int = _f(10, "log metrics every N optimizer steps", positive=True)
    save_every: int | None = _f(
        None, "save checkpoint-last.pth every N steps (off by default; always saved at the end and on SIGTERM)",
        positive=True,
    )
    save_interval: float = _f(
        5.0, "minutes: an epoch end saves checkpoint-last.pth only when this long has passed since the last save "
        "(0: every epoch end), so runs of many short epochs do not fill the disk"
    )  # fmt: skip
    keep_every: int | None = _f(
        None, "also keep checkpoint-<step>.pth when a save falls on a multiple of N steps (off by default)",
        positive=True,
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

    def check(self) -> None:
        if self.save_interval < 0:
            raise FastMAEError(f"--save-interval must be >= 0 minutes (0: every epoch end), got {self.save_interval}")


SHARED = {"modelling": Model, "inputs": Data, "optimisation": Optimisation, "run": Run, "checkpointing": Checkpointing}


# ---------------------------------------------------------------------- a command's configuration
class Flag(NamedTuple):
    """One field as a command shows it: its flag's name, type, this command's default and help, its options."""

    name: str
    type: Any
    default: Any
    help: str
    metadata: dict


class CommandConfig:
    """A command's sections (``SECTIONS``: attribute name -> dataclass, in flag order) and where the command differs
    from them (``DEFAULTS``, ``HELP``, ``CHOICES``). Built from flat values: ``PretrainConfig(batch_size=8)``."""

    SECTIONS: ClassVar[dict[str, type]] = {}
    DEFAULTS: ClassVar[dict[str, Any]] = {}
    HELP: ClassVar[dict[str, str]] = {}
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __init__(self, **values):
        if unknown := sorted(set(values) - set(self.field_names())):
            raise TypeError(f"{type(self).__name__} has no field {', '.join(unknown)}")
        for key, section in self.SECTIONS.items():
            names = [f.name for f in dataclasses.fields(section)]
            given = {n: values[n] if n in values else self.DEFAULTS[n] for n in names
                     if n in values or n in self.DEFAULTS}  # fmt: skip
            object.__setattr__(self, key, section(**given))

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for section in cls.SECTIONS.values() for f in dataclasses.fields(section)]

    @classmethod
    def section_of(cls, name: str) -> str | None:
        """The attribute name of the section that holds field ``name`` (None: no such field)."""
        return _sections_by_field(cls).get(name)

    @classmethod
    def flags(cls) -> list[Flag]:
        """Every field as this command shows it, in flag order."""
        out = []
        for section in cls.SECTIONS.values():
            for f in dataclasses.fields(section):
                meta = dict(f.metadata)
                if f.name in cls.CHOICES:
                    meta["choices"] = cls.CHOICES[f.name]
                out.append(Flag(f.name, f.type, cls.DEFAULTS.get(f.name, f.default), cls.HELP.get(f.name, meta["help"]),
                                meta))  # fmt: skip
        return out

    def __getattr__(self, name: str):  # a field, read flat (only called when normal lookup fails)
        key = type(self).section_of(name) if not name.startswith("_") else None
        if key is None:
            raise AttributeError(f"{type(self).__name__!r} has no field {name!r}")
        return getattr(self.__dict__[key], name)

    def __setattr__(self, name: str, value) -> None:
        key = type(self).section_of(name)
        setattr(self.__dict__[key], name, value) if key is not None else object.__setattr__(self, name, value)

    def get(self, name: str, default=None):
        """Field ``name``, or ``default`` when this command has no such field (``cfg.get("cuda_graphs", False)``)."""
        return getattr(self, name) if type(self).section_of(name) is not None else default

    def to_dict(self) -> dict:
        """Every field, flat, in flag order (``config.json``)."""
        return {n: getattr(self, n) for n in self.field_names()}

    def replace(self, **changes) -> CommandConfig:
        return type(self)(**{**self.to_dict(), **changes})

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.to_dict() == self.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"

    def validate(self):
        """Each field's checks (its choices, positive, a probability), then each section's own, then the command's
        checks across sections; the first problem is a one-line error."""
        for flag in self.flags():
            value, meta = getattr(self, flag.name), flag.metadata
            if "choices" in meta and value is not None and not isinstance(value, bool) and value not in meta["choices"]:
                raise FastMAEError(f"{_flag(flag.name)} must be one of {', '.join(meta['choices'])}, got {value!r}")
            if meta.get("positive") and value is not None and value <= 0:
                raise FastMAEError(f"{_flag(flag.name)} must be positive, got {value}")
            if meta.get("probability") and not 0 <= value <= 1:
                raise FastMAEError(f"{_flag(flag.name)} must be a probability in [0, 1], got {value}")
        for key in self.SECTIONS:
            check = getattr(self.__dict__[key], "check", None)
            if check is not None:
                check()
        self.check()
        return self

    def check(self) -> None:
        """The command's checks across sections."""


@functools.cache
def _sections_by_field(cls: type[CommandConfig]) -> dict[str, str]:
    return {f.name: key for key, section in cls.SECTIONS.items() for f in dataclasses.fields(section)}


class TrainingConfig(CommandConfig):
    """What the three training commands share: the batch arithmetic."""

    SECTIONS = SHARED

    def effective_batch(self, world_size: int = 1) -> int:
        if self.batch_size is None or self.accum_iter is None:
            raise FastMAEError("the batch and accumulation are not chosen yet (fastmae.batching.choose_batch chooses "
                               f"them for --recipe-batch {self.recipe_batch} at the start of a run)")  # fmt: skip
        return self.batch_size * self.accum_iter * world_size

    def batch_lines(self, world_size: int, batch_choice=()) -> list[str]:
        """How the batch was chosen (``batch_choice``: :func:`fastmae.batching.resolve_batch`'s reasons), then the
        effective batch it makes: the first lines of the recipe check."""
        return [*batch_choice, f"effective batch {self.effective_batch(world_size)} = {self.batch_size} per step x "
                f"{self.accum_iter} accumulation x {world_size} {'process' if world_size == 1 else 'processes'}"]

    def recipe_check(self, world_size: int, steps_per_epoch: int, batch_choice=()) -> tuple[list[str], list[str]]:
        """(summary lines, warnings) about the recipe this configuration amounts to, logged at the start of a run:
        the batch, then the schedule's length."""
        return [*self.batch_lines(world_size, batch_choice), self.schedule_line(steps_per_epoch)], []

    def schedule_line(self, steps_per_epoch: int) -> str:
        """The schedule's length, as the recipe check states it."""
        warmup = round(self.warmup_epochs * steps_per_epoch)
        return (f"{steps_per_epoch} steps/epoch, warmup {warmup} steps ({self.warmup_epochs:g} epochs), "
                f"{self.epochs * steps_per_epoch} steps")  # fmt: skip

    def scaled_lr(self, blr: float, world_size: int = 1) -> float:
        """The paper's rule: lr = blr x effective batch / 256."""
        return blr * self.effective_batch(world_size) / 256

    def effective_lr(self, world_size: int = 1) -> float:
        """lr = blr x effective batch / 256 (the paper's scaling rule), unless --lr is given; for a command with a
        ``--blr`` (the linear probe has one per probe: :meth:`LinprobeConfig.probe_lrs`)."""
        return self.lr if self.lr is not None else self.scaled_lr(self.blr, world_size)


# ---------------------------------------------------------------------- pretraining
@dataclass
class Pretraining:
    """Pretraining's own: patches, AdamW, masking, the synthetic data set."""

    patch_size: int | None = _f(None, "patch size in pixels (default: the model's, e.g. 16 for *_patch16)",
                                positive=True)  # fmt: skip
    blr: float = _f(1.5e-4, "base learning rate: lr = blr * effective batch / 256 (batch x accum-iter x processes)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    mask_ratio: float = _f(0.75, "fraction of patches removed, in [0, 1)")
    norm_pix_loss: bool = _f(False, "normalise each target patch by its mean and std")
    encoder_mode: str = _f("visible", "visible (MAE) or mask_token (encoder sees all patches)")
    synthetic_images: int = _f(4096, "images per epoch for --loader synthetic", positive=True)

    def check(self) -> None:
        check_mask_ratio(self.mask_ratio)


@dataclass
class Levers:
    """How pretraining's step runs: fused kernels, attention per call site, DDP or FSDP2, one CUDA graph."""

    kernels: str = _f("auto", "auto | reference | triton, or per op: masking=triton,masked_mse=reference")
    attn_backend: str = _f(
        "auto", "auto (on a GPU: the fastest backend measured per call site, fastmae/attention_table.json; else the "
        "first of xformers, sdpa, math that can run) | xformers | sdpa | flash | cudnn | efficient | math, or per call "
        "site: encoder=flash,decoder=efficient"
    )  # fmt: skip
    parallel: str = _f(
        "ddp", "under torchrun: ddp (DistributedDataParallel) | fsdp (FSDP2 fully_shard per block, for ViT-H and up)",
        choices=PARALLEL,
    )
    cuda_graphs: bool = _f(
        False, "run the whole step (forward, backward, AdamW) as one CUDA graph: one process, --accum-iter 1, bf16 or "
        "fp32 (off by default: no GPU sitting has measured it yet; docs/benchmarks.md)"
    )  # fmt: skip


@dataclass
class Pictures:
    """Reconstruction pictures and the fixed-image eval loss."""

    num_reconstructions: int = _f(8, "fixed images shown in each reconstructions/*.png")
    picture_scale: int | None = _f(
        None, "draw each pixel of the reconstruction pictures as an N x N block (default: the smallest N that draws an "
        "image at least 96 pixels high)", positive=True
    )  # fmt: skip
    picture_every: int | None = _f(1000, "reconstruction picture + eval loss every N steps (0: only at start and end)")

    def check(self) -> None:
        if self.picture_every is not None and self.picture_every < 0:
            raise FastMAEError(f"--picture-every must be >= 0 (0: only at start and end), got {self.picture_every}")


class PretrainConfig(TrainingConfig):
    """Everything a pretraining run depends on (the official recipe's defaults)."""

    SECTIONS = {**SHARED, "pretraining": Pretraining, "levers": Levers, "pictures": Pictures}

    def check(self) -> None:
        check_graph_mode(self.cuda_graphs, self.compile, self.compile_mode)

    def recipe_check(self, world_size: int, steps_per_epoch: int, batch_choice=()) -> tuple[list[str], list[str]]:
        """(summary lines, warnings) about the recipe this configuration amounts to, printed at the start; the lines
        begin with ``batch_choice``, the reasons :func:`fastmae.batching.resolve_batch` gave for the batch."""
        eff = self.effective_batch(world_size)
        total = self.epochs * steps_per_epoch
        warmup = round(self.warmup_epochs * steps_per_epoch)
        lines = [
            *self.batch_lines(world_size, batch_choice),
            f"lr {self.effective_lr(world_size):.3g}"
            + ("" if self.lr is not None else f" = blr {self.blr:g} x {eff} / 256"),
            self.schedule_line(steps_per_epoch),
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
    # unused; one gray band, so in_chans 1 with the digits' own statistics), patch 4, a 6-block ViT. Changed from the
    # ImageNet recipe for 1.4k images and 2 CPU cores (timed in docs): batch 64 (22 steps/epoch) with a larger blr
    # (lr 1e-3), 10 warmup epochs; crops keep most of a digit (scale 0.35: at 0.2 an 8-pixel digit becomes a stroke)
    # and no flips (a mirrored digit is another symbol).
    "digits": PretrainConfig(
        model="mae_vit_mini_patch4", img_size=32, data="digits", epochs=100, warmup_epochs=10, batch_size=64,
        blr=4e-3, norm_pix_loss=True, crop_scale=0.35, hflip=0.0, output_dir="output/digits", log_every=20,
        picture_every=500, picture_scale=4, num_reconstructions=8,
    ),
    # The official MAE recipe (facebookresearch/mae PRETRAIN.md): effective batch 4096, blr 1.5e-4, 40 warmup epochs,
    # norm-pix. 4096 is the effective batch: the batch per process and the accumulation are chosen at the start for
    # the number of processes and the GPU's memory (fastmae/batching.py).
    **{
        name: PretrainConfig(
            model=name, img_size=224, epochs=800, warmup_epochs=40, batch_size=None, accum_iter=None,
            recipe_batch=4096, blr=1.5e-4, norm_pix_loss=True, output_dir=f"output/{name}", log_every=20,
            save_every=1000,
        )
        for name in ("mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14")
    },
}  # fmt: skip


def preset(name: str) -> PretrainConfig:
    if name not in PRESETS:
        raise FastMAEError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name].replace()


# ---------------------------------------------------------------------- downstream: finetune and linear probe
@dataclass
class Labelled:
    """Labelled data without a validation folder: the share held out."""

    val_split: float = _f(0.2, "fraction held out for validation when --data has no train/ and val/ folders")

    def check(self) -> None:
        if not 0 < self.val_split < 1:
            raise FastMAEError(f"--val-split must be in (0, 1), got {self.val_split}")


DOWNSTREAM_LOADERS = tuple(x for x in LOADERS if x not in PRETRAIN_ONLY_LOADERS)
DOWNSTREAM_HELP = {  # where finetuning and linear probing say it otherwise than pretraining
    "model": "encoder of this MAE model (fastmae models lists them); with --pretrained, the checkpoint's architecture "
             "unless given",
    "pretrained": "checkpoint to start from: fastmae pretrain/finetune, official {'model': ...} (full or "
                  "encoder-only), .pth or .safetensors, or a transformers ViT-MAE folder (ViTMAEForPreTraining or "
                  "ViTMAEModel) (default: random init, with a warning)",
    "img_size": "input resolution (the position table is resampled from the checkpoint's)",
    "data": "ImageFolder layout: DIR/train/<class>/* and DIR/val/<class>/*, or DIR/<class>/* split by --val-split "
            "(default, or 'digits': scikit-learn's handwritten digits, 10 classes, no download)",
    "crop_scale": "smallest RandomResizedCrop area (the paper: 0.08)",
    "loader": "auto (torchvision; dali once its GPU path has run on a GPU) | dali | torchvision",
    "epochs": "epochs over the training set",
    "clip_grad": "clip the gradient norm to this value (off by default)",
    "precision": "auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32",
    "save_interval": "minutes: an epoch end saves checkpoint-last.pth only when this long has passed since the last "
                     "save (0: every epoch end; checkpoint-best.pth is written whenever top-1 improves)",
}  # fmt: skip
DOWNSTREAM_CHOICES = {"loader": DOWNSTREAM_LOADERS, "precision": tuple(p for p in PRECISIONS if p != "fp16")}


@dataclass
class Finetuning:
    """Finetuning's own: the paper's recipe (layer decay, drop path, mixup / cutmix, smoothing, EMA, augmentation)."""

    blr: float = _f(1e-3, "base learning rate: lr = blr * effective batch / 256")
    layer_decay: float = _f(0.75, "layer-wise lr decay: block i gets decay^(depth + 1 - (i + 1)) (0.65 for ViT-B)")
    drop_path: float = _f(0.1, "stochastic depth rate (0.1 B, 0.2 L, 0.3 H)")
    mixup: float = _f(0.8, "mixup alpha (0 turns it off)")
    cutmix: float = _f(1.0, "cutmix alpha (0 turns it off)")
    smoothing: float = _f(0.1, "label smoothing")
    ema: bool = _f(False, "keep an exponential moving average of the weights (timm ModelEmaV3) and evaluate it too")
    ema_decay: float = _f(0.9999, "EMA decay per optimizer step")
    rand_augment: str = _f("rand-m9-mstd0.5-inc1", "timm RandAugment policy of the loader ('none': off)")
    reprob: float = _f(0.25, "random erasing probability", probability=True)

    def check(self) -> None:
        if not 0 < self.layer_decay <= 1:
            raise FastMAEError(f"--layer-decay must be in (0, 1], got {self.layer_decay}")


class FinetuneConfig(TrainingConfig):
    """End-to-end finetuning with the paper's recipe (facebookresearch/mae FINETUNE.md)."""

    SECTIONS = {**SHARED, "labelled": Labelled, "finetuning": Finetuning}
    DEFAULTS = {"crop_scale": 0.08, "epochs": 100, "warmup_epochs": 5, "min_lr": 1e-6, "output_dir": "output/finetune"}
    HELP = {**DOWNSTREAM_HELP, "weight_decay": "weight decay (not on biases, norms, tokens)"}
    CHOICES = DOWNSTREAM_CHOICES

    def check(self) -> None:
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size is not None and self.batch_size % 2:
            raise FastMAEError(f"mixup/cutmix need an even --batch-size, got {self.batch_size}")


@dataclass
class Probing:
    """Linear probing's own: the probes' base learning rates, the features, kNN."""

    probe_blrs: str = _f("0.05,0.1,0.2,0.4", "base learning rates of the probes trained side by side on the same "
                         "features, lr = blr * effective batch / 256 (the paper's blr is 0.1)")  # fmt: skip
    global_pool: bool = _f(False, "probe the mean of the patch tokens instead of the cls token")
    knn_k: int = _f(20, "neighbours for the kNN evaluation (0 turns it off)")
    knn_t: float = _f(0.07, "temperature of the kNN vote weights exp(sim / t)")

    def blrs(self) -> list[float]:
        try:
            values = [float(x) for x in self.probe_blrs.split(",") if x.strip()]
        except ValueError as exc:
            raise FastMAEError(f"--probe-blrs must be comma-separated numbers, got {self.probe_blrs!r}") from exc
        if not values or any(v <= 0 for v in values):
            raise FastMAEError(f"--probe-blrs must be positive numbers, got {self.probe_blrs!r}")
        return values

    def check(self) -> None:
        self.blrs()
        if self.knn_k < 0:
            raise FastMAEError(f"--knn-k must be >= 0, got {self.knn_k}")


class LinprobeConfig(TrainingConfig):
    """Linear probing of the frozen encoder (facebookresearch/mae LINPROBE.md), several lrs in one pass, plus kNN."""

    SECTIONS = {**SHARED, "labelled": Labelled, "probing": Probing}
    DEFAULTS = {"crop_scale": 0.08, "epochs": 90, "warmup_epochs": 10, "weight_decay": 0.0,
                "output_dir": "output/linprobe"}  # fmt: skip
    HELP = {**DOWNSTREAM_HELP, "warmup_epochs": "linear warmup length in epochs", "weight_decay": "LARS weight decay",
            "lr": "one probe with this absolute learning rate instead of --probe-blrs (unset by default)"}  # fmt: skip
    CHOICES = DOWNSTREAM_CHOICES

    def blrs(self) -> list[float]:
        return self.probing.blrs()

    def probe_lrs(self, world_size: int = 1) -> list[float]:
        return [self.lr] if self.lr is not None else [self.scaled_lr(b, world_size) for b in self.blrs()]

    def effective_lr(self, world_size: int = 1) -> float:
        """The first probe's lr (the others are multiples of it)."""
        return self.probe_lrs(world_size)[0]


# FINETUNE.md: effective batch 1024 (ViT-B: 32 per GPU x accum 4 x 8 GPUs, or x 32 GPUs without accumulation), 5 warmup
# epochs, wd 0.05, mixup 0.8, cutmix 1.0, reprob 0.25. 1024 is the effective batch: the batch per process and the
# accumulation are chosen at the start for the number of processes and the GPU's memory (fastmae/batching.py).
_OFFICIAL_FT = {
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
        name: FinetuneConfig(model=name, img_size=224, batch_size=None, accum_iter=None, recipe_batch=1024,
                             warmup_epochs=5, output_dir=f"output/ft-{name}", log_every=20, **kw)
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
    # LINPROBE.md: effective batch 16384 (512 per GPU x 32 GPUs), blr 0.1, LARS, wd 0, 90 epochs, 10 warmup; cls token
    # (H: 50 epochs). 16384 is the effective batch, chosen at the start as finetuning's (fastmae/batching.py).
    **{
        name: LinprobeConfig(model=name, img_size=224, batch_size=None, accum_iter=None, recipe_batch=16384,
                             epochs=50 if "huge" in name else 90, output_dir=f"output/lp-{name}", log_every=20)
        for name in _OFFICIAL_FT
    },
}  # fmt: skip


# ---------------------------------------------------------------------- fastmae bench
def _csv(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


@dataclass
class Bench:
    """What ``fastmae bench`` measures, how, and the report it draws."""

    suite: str = _f("pretrain", "what to measure: pretrain (the kernel, loader and finetune benchmarks are scripts of "
                    "their own in benchmarks/)")  # fmt: skip
    models: str = _f(
        "mae_vit_base_patch16,mae_vit_large_patch16,mae_vit_huge_patch14", "models to run, comma-separated"
    )
    decoder_depths: str = _f("8,1", "decoder depths to run for each model")
    configs: str = _f(",".join(BENCH_CONFIGS), f"pretrain configurations to run: {', '.join(BENCH_CONFIGS)}")
    in_chans: str = _f("3", "input bands of the models, comma-separated (3,13: every configuration at each): 3 are "
                       "uint8 RGB batches with ImageNet's statistics, any other count uint16 batches normalised per "
                       "band on the device, as a raster run's")  # fmt: skip
    batch: int | None = _f(None, "images per step (default: B 256, L 128, H 64, fixed per model)", positive=True)
    batches: str | None = _f(
        None, "batch sweep of the fastmae rows beside the fixed batch, e.g. 64,256,512 (img/s, peak memory, knee)"
    )
    steps: int = _f(10, "timed steps per configuration", positive=True)
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


class BenchConfig(CommandConfig):
    """``fastmae bench``: the pretraining step of the official models in several configurations side by side, built
    with the training loop's own run spec and step builder (see ``train/bench.py``)."""

    SECTIONS = {"bench": Bench}

    def check(self) -> None:
        if others := [x for x in _csv(self.suite) if x != "pretrain"]:
            raise FastMAEError(f"--suite {','.join(others)}: fastmae bench measures the pretraining step; run "
                               + ", ".join(f"python benchmarks/bench_{x}.py" for x in others) + " instead")
        if unknown := set(self.config_names) - set(BENCH_CONFIGS):
            raise FastMAEError(f"--configs: unknown {', '.join(sorted(unknown))}; choose from "
                               f"{', '.join(BENCH_CONFIGS)}")  # fmt: skip
        self.batch_sizes  # noqa: B018 (a one-line error when they are not numbers)
        self.channels  # noqa: B018
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
        check_graph_mode(self.graphs, None, self.compile_mode, "--graphs")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise FastMAEError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.attn_backend is not None:  # a spec that does not parse is one line now, not a failed row per model
            from .attention import parse_sites

            parse_sites(self.attn_backend)

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

    @property
    def channels(self) -> tuple[int, ...]:
        """``--in-chans`` as band counts."""
        try:
            counts = tuple(int(c) for c in _csv(self.in_chans))
        except ValueError:
            counts = ()
        if not counts or min(counts) < 1:
            raise FastMAEError(f"--in-chans must be positive whole numbers separated by commas, got {self.in_chans!r}")
        return counts
