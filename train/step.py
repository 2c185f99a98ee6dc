"""One MAE optimizer step, as the pretraining loop and the benchmarks run it, optionally as one CUDA graph.

:class:`TrainStep` holds what a step needs beside the batch: the model (compiled or not, wrapped or not), AdamW, the
autocast, the NaN guard and clipping. :meth:`TrainStep.forward_backward` is one micro-batch (normalise a uint8 batch,
per-sample mask noise from ``(seed, epoch, sample id)`` on the device, forward, backward), :meth:`TrainStep.update`
the optimizer update after the last micro-batch; :meth:`TrainStep.__call__` is both, for one micro-batch a step.
None of them reads a number back to the host: the loss, the NaN counters and the skip flag stay on the device, so
the loop decides when to look (on logging steps).

With ``graphs=True`` (CUDA, one process, one micro-batch a step, no fp16 loss scaler) ``__call__`` runs the whole
step (forward, backward, NaN guard, clipping, AdamW) as one CUDA graph: the batch, the sample ids, the epoch and the
learning rate are copied into device buffers the graph reads, so the masks differ from step to step as they do
eagerly. The first ``warmup`` calls are ordinary steps (on a side stream, as capture requires), the next is captured
and replayed, later ones only replay. A batch of another shape (a short batch after skipped files) runs as an
ordinary step through the same code. :meth:`invalidate` drops the graph (a rollback replaced the optimizer's state).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch

from .data import to_device
from .noise import mask_noise

logger = logging.getLogger("fastmae.step")


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


class CUDAGraph:
    """torch.cuda.CUDAGraph behind the two calls :class:`TrainStep` makes (tests stand in a CPU replay here)."""

    def __init__(self):
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        # thread_local, as inductor captures its own graphs: the default ("global") mode makes any CUDA call of another
        # thread an error during the capture, and the pin-memory thread and the GPU loader's producer keep making them
        # (entering capture also empties the caching allocator, so their next allocation is such a call). Only this
        # thread's unsafe calls fail the capture now; the other threads' work is on their own streams, not recorded.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            return fn()

    def replay(self) -> None:
        self.graph.replay()


class TrainStep:
    """See the module docstring. ``step_fn`` is what the forward calls (the model, compiled and/or DDP-wrapped);
    ``model`` the bare model (its parameters and patch count)."""

    def __init__(self, model: torch.nn.Module, step_fn: Callable, optimizer: torch.optim.Optimizer, *, seed: int,
                 mask_ratio: float, device: torch.device, dtype: torch.dtype | None = None, nan_guard: bool = True,
                 clip_grad: float | None = None, scaler: torch.amp.GradScaler | None = None,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, graphs: bool = False, warmup: int = 3,
                 graph_factory: Callable[[], CUDAGraph] = CUDAGraph):  # fmt: skip
        self.model, self.step_fn, self.optimizer, self.device = model, step_fn, optimizer, device
        self.reduce = reduce  # the loss averaged over ranks before the NaN guard, so that every rank skips alike
        self.seed, self.mask_ratio, self.dtype = seed, mask_ratio, dtype
        self.nan_guard, self.clip_grad, self.scaler = nan_guard, clip_grad, scaler
        self.num_patches = model.patch_embed.num_patches
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.nan_skipped = torch.zeros((), device=device)  # device-side counters, read on logging steps only
        self.nan_in_a_row = torch.zeros((), device=device)
        self.graphs, self.warmup, self._graph_factory = graphs, warmup, graph_factory
        self._graph: CUDAGraph | None = None
        self._static: dict[str, torch.Tensor] = {}
        self._calls = 0  # ordinary steps since the graph was (in)validated
        self._stream: torch.cuda.Stream | None = None  # the warm-up steps' side stream
        if graphs:
            self._use_device_lr()

    # --------------------------------------------------------------------------------------------- the step
    def autocast(self):
        """The one autocast of every step, warm-up, capture and replay alike. Its weight-cast cache is off: inside a
        CUDA graph cached casts would be graph memory freed after capture, and dynamo guards on the setting
        (``autocast_cache_enabled`` in its global state), so steps that differed in it would compile the model again
        at the capture, where compiling is refused. Off costs nothing here: each weight is cast once per forward."""
        if self.dtype is None or self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype, cache_enabled=False)

    def forward_backward(self, imgs: torch.Tensor, ids: torch.Tensor, epoch: int | torch.Tensor,
                         accum: int = 1) -> torch.Tensor:  # fmt: skip
        """One micro-batch: per-sample masks, forward under autocast, backward of loss / accum; returns the loss
        (a detached float32 device tensor)."""
        imgs = to_device(imgs, self.device)  # uint8 batches are normalised here, on the device
        if self.device.type == "cuda" and ids.device.type == "cpu":
            ids = ids.pin_memory().to(self.device, non_blocking=True)  # a pageable copy would sync the host
        noise = mask_noise(self.seed, epoch, ids, self.num_patches, self.device)
        with self.autocast():
            loss, _, _ = self.step_fn(imgs, mask_ratio=self.mask_ratio, noise=noise)
        scaled = loss / accum
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return loss.detach().float()

    def update(self, loss_sum: torch.Tensor, lr: float | None) -> torch.Tensor:
        """One AdamW update from the accumulated gradients at ``lr`` (None: the groups' device-side lr), skipped on
        the device when the loss or the gradient norm is not finite (NaN guard); gradients cleared after."""
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        if self.reduce is not None:
            loss_sum = self.reduce(loss_sum)  # queued on the stream: no host sync
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # true-scale gradients for the norm; records the overflow flag
        if self.nan_guard or self.clip_grad:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
            if self.clip_grad:
                torch.nn.utils.clip_grads_with_norm_(self.params, self.clip_grad, norm)
            if self.nan_guard:
                norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
                # fp16: gradient overflow is the scaler's business (skip + lower the scale); a non-finite loss is ours.
                bad = (~torch.isfinite(loss_sum if self.scaler is not None else norm + loss_sum)).float()
                if self.scaler is None:
                    self.optimizer.found_inf = bad  # fused AdamW leaves weights and moments untouched where this is 1
                self.nan_skipped.add_(bad)  # in place: a CUDA graph writes these same tensors at every replay
                self.nan_in_a_row.add_(bad).mul_(bad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum

    def __call__(self, imgs: torch.Tensor, ids: torch.Tensor, epoch: int, lr: float) -> torch.Tensor:
        """A whole step on one micro-batch; returns its loss (a device tensor, overwritten by the next graphed step:
        read it, or copy it, before the next call)."""
        if not self.graphs:
            return self.update(self.forward_backward(imgs, ids, epoch), lr)
        return self._graphed(imgs, ids, epoch, lr)

    # ------------------------------------------------------------------------------------------- CUDA graph
    def _use_device_lr(self) -> None:
        """The learning rate as a device tensor the graph reads (fused AdamW takes a tensor lr), capture allowed. On a
        GPU it is float32, which the fused kernel reads: updates then differ in the last bit from steps with a Python
        lr (a double); elsewhere float64, the same updates bit for bit."""
        dtype = torch.float32 if self.device.type == "cuda" else torch.float64
        self.lr = torch.zeros((), dtype=dtype, device=self.device)
        for group in self.optimizer.param_groups:
            group["lr"], group["capturable"] = self.lr, True
        self.optimizer._warned_capturable_if_run_uncaptured = True  # the ordinary warm-up steps are meant

    def _fill(self, imgs: torch.Tensor, ids: torch.Tensor, epoch: int, lr: float) -> bool:
        """Copy the step's inputs into the graph's buffers; False when the batch does not fit them."""
        if not self._static:
            self._static = {"imgs": torch.empty(imgs.shape, dtype=imgs.dtype, device=self.device),
                            "ids": torch.empty(ids.shape, dtype=torch.int64, device=self.device),
                            "epoch": torch.zeros((), dtype=torch.int64, device=self.device)}  # fmt: skip
        s = self._static
        if imgs.shape != s["imgs"].shape or imgs.dtype != s["imgs"].dtype or ids.shape != s["ids"].shape:
            return False
        if ids.device.type == "cpu" and self.device.type == "cuda":
            ids = ids.pin_memory()
        s["imgs"].copy_(imgs, non_blocking=True)
        s["ids"].copy_(ids, non_blocking=True)
        s["epoch"].fill_(epoch)
        self.lr.fill_(lr)
        return True

    def _body(self) -> torch.Tensor:
        s = self._static
        return self.update(self.forward_backward(s["imgs"], s["ids"], s["epoch"]), None)

    def _graphed(self, imgs, ids, epoch, lr) -> torch.Tensor:
        if not self._fill(imgs, ids, epoch, lr):
            if self._graph is not None and not getattr(self, "_told_shape", False):
                logger.info("a batch of shape %s does not fit the CUDA graph's %s: it runs as an ordinary step",
                            tuple(imgs.shape), tuple(self._static["imgs"].shape))  # fmt: skip
                self._told_shape = True
            self.lr.fill_(lr)
            return self.update(self.forward_backward(imgs, ids, epoch), None)
        if self._graph is not None:
            self._graph.replay()
            return self._loss
        if self._calls < self.warmup:  # ordinary steps first: compilation, autotuning, optimizer state, workspaces
            self._calls += 1
            with self._side_stream():
                return self._body()
        self.optimizer.zero_grad(set_to_none=True)
        graph = self._graph_factory()
        self._loss = graph.capture(self._body)  # recorded, not run
        self._graph = graph
        graph.replay()  # this step, for real
        logger.info("the training step is one CUDA graph from here on (captured after %d ordinary steps)",
                    self.warmup)  # fmt: skip
        return self._loss

    @contextlib.contextmanager
    def _side_stream(self):
        """Warm-up steps run on a side stream, as CUDA graph capture requires (on a CPU: nothing to do)."""
        if self.device.type != "cuda":
            yield
            return
        if self._stream is None:  # one stream for every warm-up step: the allocator keeps a pool per stream
            self._stream = torch.cuda.Stream(self.device)
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            yield
        torch.cuda.current_stream(self.device).wait_stream(stream)

    def invalidate(self) -> None:
        """Forget the graph (after the optimizer's state was loaded again, e.g. by a rollback: new state tensors, a
        number for lr): the next calls warm up and capture again."""
        self._graph, self._calls = None, 0
        if self.graphs:
            self._use_device_lr()

    @property
    def captured(self) -> bool:
        return self._graph is not None

    @property
    def captures_next(self) -> bool:
        """Whether the next call of a batch that fits captures the graph (a benchmark resets the memory peak then:
        the capture allocates the step's activations in the graph's pool; replays allocate nothing)."""
        return self.graphs and self._graph is None and self._calls >= self.warmup


def portable_optimizer_state(state: dict) -> dict:
    """An optimizer state dict as an ungraphed run writes it: a device-side lr as a number, capturable off (so a
    checkpoint resumes the same with or without CUDA graphs)."""
    groups = []
    for group in state["param_groups"]:
        lr = group["lr"]
        groups.append({**group, "lr": float(lr) if isinstance(lr, torch.Tensor) else lr, "capturable": False})
    return {**state, "param_groups": groups}
