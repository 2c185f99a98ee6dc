"""The run spec: "can this run here?", answered once, before any data is indexed.

:func:`decide` turns the choices a command asked for (:class:`Asked`: a configuration's flags, or a benchmark's
settings) into a :class:`RunSpec`: the device (``cuda:LOCAL_RANK``), the precision and its one autocast, the compile
variant and mode, whether the step is one CUDA graph, the loader, the attention backend per call site and the
implementation of each fused op. Each check is a small function of the asked choices and the device that returns its
reasons (empty: it can run), listed in :data:`CHECKS`; every reason found is reported at once, in one line (exit 2),
before a data set is indexed or a file written. Adding a check is one entry in that table.

The spec is what every later part asks (the model is built with its resolved attention and kernels, the step with its
autocast and graphs, the loaders with its loader, the benchmarks with all of it), so that none decides again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastmae.config import DEFAULT_VARIANT
from fastmae.errors import FastMAEError

from .job import dist_info

logger = logging.getLogger("fastmae.spec")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``auto`` is CUDA when available, else CPU; an explicit ``cuda``/``cuda:N`` without a GPU is a one-line error.
    ``cuda`` is this process's GPU: ``cuda:LOCAL_RANK`` in a multi-process job (so that every check before joining,
    the decode probe among them, runs on it, not on GPU 0), ``cuda:0``-or-current in one process."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    elif name.startswith("cuda") and not torch.cuda.is_available():
        raise FastMAEError(f"--device {name} was requested but no CUDA device is available")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        local = dist_info()[2] if local_rank is None else local_rank
        device = torch.device("cuda", local if local < torch.cuda.device_count() else torch.cuda.current_device())
    return device


@dataclass(frozen=True)
class Asked:
    """The choices as a command asked for them, before anything is resolved. ``kernels`` and ``attn_backend`` are
    None for a run without the MAE's op layer (finetuning and probing a timm ViT); ``model`` lets the attention check
    use the model's head dims."""

    command: str = "pretrain"
    device: str = "auto"
    precision: str = "auto"
    compile: str | None = None  # None: the device decides
    compile_mode: str = "default"
    graphs: bool = False
    loader: str = "torchvision"
    kernels: str | None = None
    attn_backend: str | None = None
    model: str | None = None
    accum: int = 1
    world_size: int = 1
    parallel: str = "ddp"
    tensorboard: bool | None = False
    bands: tuple[str, ...] = ()  # the band flags given (--bands, --nodata, --norm auto, ...), in words

    @classmethod
    def of(cls, cfg, command: str, world_size: int | None = None) -> Asked:
        """What a training command's configuration asks for (``world_size``: the job's, from its launcher)."""
        from fastmae.bands import band_flags_of

        return cls(command, cfg.device, cfg.precision, cfg.compile, cfg.compile_mode, cfg.get("cuda_graphs", False),
                   cfg.loader, cfg.get("kernels"), cfg.get("attn_backend"), cfg.model, cfg.accum_iter,
                   dist_info()[1] if world_size is None else world_size, cfg.get("parallel", "ddp"),
                   cfg.tensorboard, tuple(band_flags_of(cfg).given))  # fmt: skip


@dataclass
class RunSpec:
    """Where and how a run runs (see the module docstring); :func:`decide` makes it."""

    device: torch.device
    precision: str = "fp32"  # bf16 | fp16 | fp32
    compile: str = "off"  # off | full | regional
    compile_mode: str = "default"
    graphs: bool = False  # the whole step as one CUDA graph
    loader: str = "torchvision"
    attention: dict[str, str] | None = None  # {call site: backend} the MAE is built with ("auto": per measured table)
    kernels: dict[str, str] | None = None  # {op: "triton" | "reference"} on this device
    world_size: int = 1
    strategy: str = "none"  # none (one process) | ddp | fsdp
    batch_choice: tuple[str, ...] = ()  # how the batch per process and the accumulation were chosen (plan_batch)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def act_dtype(self) -> torch.dtype:
        return DTYPES[self.precision]

    def autocast(self):
        """The one autocast of the run (bf16 / fp16; a no-op in fp32), the same for the step, evaluation and
        pictures. Its weight-cast cache is off: inside a CUDA graph cached casts would be graph memory freed after
        capture, and dynamo guards on the setting (``autocast_cache_enabled``), so code run under two settings
        would compile twice (at a graph's capture, where compiling is refused). Off costs nothing here: each weight is
        cast once per forward."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.act_dtype, cache_enabled=False)

    def compiled(self, module: torch.nn.Module) -> torch.nn.Module:
        """What the step calls: ``module`` compiled as ``--compile`` says (:func:`fastmae.compiling.compile_model`)."""
        from fastmae.compiling import compile_model

        return compile_model(module, self.compile, self.compile_mode)

    def synchronize(self) -> None:
        """Wait for the device (CUDA); nothing on a CPU."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def model_options(self) -> dict:
        """The MAE constructor's keyword options this spec resolved (attention per call site, each op's kernel)."""
        return {k: v for k, v in (("attn_backend", self.attention), ("kernels", self.kernels)) if v is not None}

    def info(self) -> dict:
        """Where and how the run ran, for ``config.json``, ``summary.json`` and benchmark rows."""
        return {"device": self.device.type, "precision": self.precision, "compile": self.compile,
                "cuda_graphs": self.graphs, "loader": self.loader, "world_size": self.world_size,
                "parallel": self.strategy}  # fmt: skip


# ------------------------------------------------------------------------------------------------------ the batch
def gpu_memory_gib(device: str, gpu_mem: float | None) -> float | None:
    """GiB of memory per GPU to size the batch for: ``--gpu-mem`` when given, else this process's GPU's (when the run
    is on CUDA), else None (no limit known)."""
    if gpu_mem is not None:
        return gpu_mem
    resolved = resolve_device(device)
    return torch.cuda.get_device_properties(resolved).total_memory / 2**30 if resolved.type == "cuda" else None


def plan_batch(cfg, command: str, world: int) -> tuple[str, ...]:
    """Choose ``cfg``'s batch per process and accumulation for ``world`` processes (:mod:`fastmae.batching`: a recipe
    batch kept, the largest batch that fits the GPU), before :func:`decide` and before any data is indexed; returns
    the reasons. A ``--world-size`` other than the launcher's is a one-line error."""
    if cfg.world_size is not None and cfg.world_size != world:
        raise FastMAEError(f"--world-size {cfg.world_size}, but this run has {world} process(es): --world-size plans a "
                           f"batch for --print-config; drop it, or start {cfg.world_size} processes (fastmae launch "
                           f"--nproc-per-node {cfg.world_size}, or srun)")  # fmt: skip
    from fastmae.batching import choose_batch

    reasons = choose_batch(cfg, world, gpu_memory_gib(cfg.device, cfg.gpu_mem), command)
    cfg.validate()  # the chosen numbers, through the command's checks (an even batch for mixup)
    return tuple(reasons)


# ------------------------------------------------------------------------------------------------------- the checks
# Each takes the asked choices and the spec drafted from them (device, precision, compile variant, loader and process
# layout resolved) and returns why they cannot run here (empty: they can).
def loader_reasons(asked: Asked, spec: RunSpec) -> list[str]:
    from .data import loader_problem

    if asked.loader == "auto":  # auto takes a loader that runs here
        return []
    return [problem] if (problem := loader_problem(asked.loader, spec.device, asked.command)[1]) else []


def bands_reasons(asked: Asked, spec: RunSpec) -> list[str]:
    """Band flags that an explicitly asked loader cannot serve: DALI and the GPU loader read 8-bit RGB with ImageNet's
    statistics only (the torchvision loader reads any bands; ``auto`` takes it for them). The flags themselves were
    checked with the configuration (:func:`fastmae.bands.parse_band_flags`); what depends on the data (a band name
    it lacks, statistics for another count) is checked right after indexing, before any step."""
    flags = [f for f in asked.bands if f != "--norm imagenet"]
    if flags and asked.loader in ("dali", "gpu", "synthetic"):
        what = "makes 3-band images" if asked.loader == "synthetic" else "reads 8-bit RGB with ImageNet's statistics"
        return [f"--loader {asked.loader} {what}: {', '.join(flags)} need --loader torchvision (or auto)"]
    return []


def precision_reasons(asked: Asked, spec: RunSpec) -> list[str]:
    if spec.precision == "fp16" and spec.strategy == "fsdp":
        return ["--precision fp16 is not supported with --parallel fsdp; use bf16"]
    return []


def compile_reasons(asked: Asked, spec: RunSpec) -> list[str]:
    if spec.compile == "regional" and spec.strategy == "fsdp":
        return ["--compile regional with --parallel fsdp: FSDP2 shards the very blocks it compiles; use --compile full"]
    return []


def graphs_unsupported(device: torch.device, world_size: int, accum: int, precision: str, strategy: str) -> list[str]:
    """Why the whole step cannot be one CUDA graph here (empty: it can)."""
    reasons = []
    if device.type != "cuda":
        reasons.append(f"CUDA graphs need a CUDA device (this run is on {device.type})")
    if world_size > 1:
        reasons.append(f"{world_size} processes ({strategy}): the gradient all-reduce is not captured")
    if accum > 1:
        reasons.append(f"--accum-iter {accum}: a graph holds one micro-batch and the update")
    if precision == "fp16":
        reasons.append("fp16: the loss scaler's update is not captured (use bf16)")
    return reasons


def graphs_reasons(asked: Asked, spec: RunSpec) -> list[str]:
    if asked.graphs and (why := graphs_unsupported(spec.device, spec.world_size, asked.accum, spec.precision,
                                                   spec.strategy)):  # fmt: skip
        return [f"--cuda-graphs cannot run here: {'; '.join(why)}"]
    return []


def attention_reasons(asked: Asked, spec: RunSpec) -> list[str]:
    """An attention spec that does not parse, or an explicitly named backend that cannot run on this device in this
    precision at the model's head dims (``auto`` always can: it takes the first backend that runs)."""
    if asked.attn_backend is None:
        return []
    from fastmae import attention

    try:
        sites = attention.parse_sites(asked.attn_backend)
    except FastMAEError as exc:
        return [str(exc)]
    dims = _head_dims(asked)
    reasons = []
    for site, name in sites.items():
        if name == "auto" or site not in dims:
            continue
        q = attention.StandIn((1, 1, 1, dims[site]), spec.act_dtype, spec.device)
        if why := attention.get_backend(name).unsupported(q, q, q):
            reasons.append(f"attention backend {name!r} cannot run: {'; '.join(why)}")
    return list(dict.fromkeys(reasons))  # both call sites alike: once


def _head_dims(asked: Asked) -> dict[str, int]:
    """{call site: head dim} of the asked model (none known: head dim 64 for both)."""
    from fastmae.registry import list_models, model_args

    if asked.model not in list_models():
        return {"encoder": 64, "decoder": 64}
    a = model_args(asked.model)
    return {"encoder": a["embed_dim"] // a["num_heads"], "decoder": a["decoder_embed_dim"] // a["decoder_num_heads"]}


def kernel_reasons(asked: Asked, spec: RunSpec) -> list[str]:
    """A kernels spec that does not parse, or ops forced to Triton that cannot run on this device (one reason per
    distinct cause, naming its ops)."""
    if asked.kernels is None:
        return []
    from fastmae import ops

    try:
        kernels = ops.parse_kernels(asked.kernels)
    except FastMAEError as exc:
        return [str(exc)]
    why: dict[str, list[str]] = {}
    for op, choice in kernels.items():
        if choice == "triton" and (reason := ops.triton_unavailable_reason(op, spec.device)):
            why.setdefault(reason, []).append(op)
    return [f"--kernels triton: {', '.join(names)} cannot run: {reason}" for reason, names in why.items()]


def tensorboard_reasons(asked: Asked, spec: RunSpec) -> list[str]:
    from .output import tensorboard_problem

    return [problem] if (problem := tensorboard_problem(asked.tensorboard)) else []


CHECKS: tuple[Callable[[Asked, RunSpec], list[str]], ...] = (
    loader_reasons,
    bands_reasons,
    precision_reasons,
    compile_reasons,
    graphs_reasons,
    attention_reasons,
    kernel_reasons,
    tensorboard_reasons,
)


def decide(asked: Asked, checks=CHECKS) -> RunSpec:
    """The run spec for ``asked`` on this machine, or one line naming every reason it cannot run here."""
    device = resolve_device(asked.device)  # a GPU asked for and absent: nothing else can be decided
    cuda = device.type == "cuda"
    from .data import loader_problem

    loader = loader_problem("auto", device, asked.command)[0] if asked.loader == "auto" else asked.loader
    draft = RunSpec(
        device=device,
        precision=asked.precision if asked.precision != "auto" else ("bf16" if cuda else "fp32"),
        compile=asked.compile if asked.compile is not None else (DEFAULT_VARIANT if cuda else "off"),
        compile_mode=asked.compile_mode,
        graphs=bool(asked.graphs),
        loader=loader,
        world_size=asked.world_size,
        strategy=asked.parallel if asked.world_size > 1 else "none",
    )
    if problems := [reason for check in checks for reason in check(asked, draft)]:
        raise FastMAEError(problems[0] if len(problems) == 1 else f"{len(problems)} problems: {'; '.join(problems)}")
    return dataclasses.replace(draft, attention=_attention(asked), kernels=_kernels(asked, device))


def _attention(asked: Asked) -> dict[str, str] | None:
    from fastmae import attention

    return attention.parse_sites(asked.attn_backend) if asked.attn_backend is not None else None


def _kernels(asked: Asked, device: torch.device) -> dict[str, str] | None:
    from fastmae import ops

    if asked.kernels is None:
        return None
    return {op: ops.select(op, choice, device) for op, choice in ops.parse_kernels(asked.kernels).items()}


def local_spec(device: torch.device | str = "auto", precision: str = "auto", compile: str = "off",
               compile_mode: str = "default", graphs: bool = False, kernels: str | None = None,
               attn_backend: str | None = None, model: str | None = None) -> RunSpec:  # fmt: skip
    """One process and no output folder, as ``fastmae bench``, the benchmarks and the GPU checks measure the step:
    :func:`decide` on these choices (a graphed step on a CPU is allowed here: the tests stand a CPU replay in)."""
    checks = tuple(c for c in CHECKS if c not in (graphs_reasons, tensorboard_reasons))
    asked = Asked("bench", str(device), precision, compile, compile_mode, graphs, "torchvision", kernels, attn_backend,
                  model)  # fmt: skip
    return decide(asked, checks)


__all__ = ["CHECKS", "Asked", "RunSpec", "decide", "graphs_unsupported", "local_spec", "plan_batch", "resolve_device"]
