"""One optimizer step of any recipe, as the loop and the benchmark run it, optionally as one CUDA graph.

:class:`TrainStep` holds what a step needs beside the batch: the recipe's loss (a function of a
:class:`~fastmae.train.data.batch.Batch`), the optimizer, the run's one autocast, gradient synchronisation under
DDP / FSDP, the NaN guard and clipping. ``step(batch, lr, last)`` runs one micro-batch (normalise a uint8 batch on the
device, forward, backward of loss / accum) and, on the last micro-batch of an accumulation (``last``), the update;
accumulation and none share this one path. Nothing reads a number back to the host: the loss, the NaN counters and
the skip flag stay on the device, so the loop decides when to look (on logging steps).

The NaN guard skips an update whose loss or gradient norm is not finite, on the device: fused AdamW takes the flag
as its ``found_inf`` and leaves weights and moments untouched; any other optimizer (the probes' LARS) has its
parameters and state put back where the flag is set. Skips are counted, and so are skips in a row (the trainer rolls
back after ``--nan-rollback-after`` of them).

With ``graphs=True`` (CUDA, one process, one micro-batch a step, no fp16 loss scaler) the whole step (forward,
backward, NaN guard, clipping, optimizer) is one CUDA graph: the batch, the epoch and the learning rate are copied
into device buffers the graph reads, so per-sample masks still differ from step to step. The first ``warmup`` calls
are ordinary steps (on a side stream, as capture requires), the next is captured and replayed, later ones only
replay. A batch of another shape (a short batch after skipped files) runs as an ordinary step through the same code.
:meth:`invalidate` drops the graph (a rollback replaced the optimizer's state).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable

import torch

from .data import Batch, model_input

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
    """See the module docstring. ``loss(batch)`` is the recipe's forward (the batch's images normalised, on the
    device); it returns a loss tensor (one, or one per probe), whose sum is backpropagated. ``params`` are the
    trained parameters; ``sync(last)`` turns the gradient all-reduce of the next backward on or off;
    ``after_update()`` runs after each update (an EMA)."""

    def __init__(self, loss: Callable[[Batch], torch.Tensor], optimizer: torch.optim.Optimizer,
                 params: list[torch.nn.Parameter], *, device: torch.device, autocast: Callable = contextlib.nullcontext,
                 accum: int = 1, sync: Callable[[bool], None] | None = None, nan_guard: bool = True,
                 clip_grad: float | None = None, scaler: torch.amp.GradScaler | None = None,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 after_update: Callable[[], None] | None = None, graphs: bool = False, warmup: int = 3,
                 graph_factory: Callable[[], CUDAGraph] = CUDAGraph):  # fmt: skip
        self.loss, self.optimizer, self.device, self.autocast = loss, optimizer, device, autocast
        self.params = [p for p in params if p.requires_grad]
        self.accum, self.sync, self.after_update = accum, sync, after_update
        self.reduce = reduce  # the loss averaged over ranks before the NaN guard, so that every rank skips alike
        self.nan_guard, self.clip_grad, self.scaler = nan_guard, clip_grad, scaler
        self.fused = bool(optimizer.defaults.get("fused"))  # takes found_inf: skips on the device by itself
        self.nan_skipped = torch.zeros((), device=device)  # device-side counters, read on logging steps only
        self.nan_in_a_row = torch.zeros((), device=device)
        self.loss_sum: torch.Tensor | float = 0.0  # of the accumulation so far
        self.graphs, self.warmup, self._graph_factory = graphs, warmup, graph_factory
        self._graph: CUDAGraph | None = None
        self._static: Batch | None = None
        self._calls = 0  # ordinary steps since the graph was (in)validated
        self._stream: torch.cuda.Stream | None = None  # the warm-up steps' side stream
        if graphs:
            self._use_device_lr()

    # --------------------------------------------------------------------------------------------- the step
    def __call__(self, batch: Batch, lr: float, last: bool = True) -> torch.Tensor | None:
        """One micro-batch; after the ``last`` of an accumulation also the update at ``lr``: returns the step's loss
        (averaged over micro-batches and ranks; a device tensor, overwritten by the next graphed step: read or copy it
        before the next call), or None after the other micro-batches."""
        if self.graphs:
            return self._graphed(batch, lr)
        if self.sync is not None:
            self.sync(last)  # the gradient all-reduce only in the backward of the last micro-batch
        self.loss_sum = self.loss_sum + self.forward_backward(batch)
        if not last:
            return None
        loss_sum, self.loss_sum = self.loss_sum, 0.0
        return self.update(loss_sum / self.accum, lr)

    def forward_backward(self, batch: Batch) -> torch.Tensor:
        """One micro-batch: forward under autocast, backward of loss / accum; returns the (detached, float32) loss."""
        batch = dataclasses.replace(batch, images=model_input(batch.images))
        with self.autocast():
            loss = self.loss(batch)
        scaled = loss.sum() / self.accum
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return loss.detach().float()

    def update(self, loss: torch.Tensor, lr: float | None) -> torch.Tensor:
        """One optimizer update from the accumulated gradients, each group at ``lr`` x its ``lr_scale`` (layer decay;
        None: the groups' device-side lr), skipped on the device when the loss or the gradient norm is not finite
        (NaN guard); gradients cleared after. Returns the loss averaged over ranks."""
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
        if self.reduce is not None:
            loss = self.reduce(loss)  # queued on the stream: no host sync
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # true-scale gradients for the norm; records the overflow flag
        bad = None
        if self.nan_guard or self.clip_grad:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
            if self.clip_grad:
                torch.nn.utils.clip_grads_with_norm_(self.params, self.clip_grad, norm)
            if self.nan_guard:
                norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
                # fp16: gradient overflow is the scaler's business (skip + lower the scale); a non-finite loss is ours.
                total = loss.sum() if self.scaler is not None else norm + loss.sum()
                bad = (~torch.isfinite(total)).float()
                self.nan_skipped.add_(bad)  # in place: a CUDA graph writes these same tensors at every replay
                self.nan_in_a_row.add_(bad).mul_(bad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif bad is not None and self.fused:
            self.optimizer.found_inf = bad  # fused AdamW leaves weights and moments untouched where this is 1
            self.optimizer.step()
        elif bad is not None:
            self._guarded_step(bad)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.after_update is not None:
            self.after_update()
        return loss

    def _guarded_step(self, bad: torch.Tensor) -> None:
        """An optimizer that cannot skip by itself: its parameters and state are put back on the device where ``bad``
        is set (state it creates at its first step is zeroed, as a skipped first step leaves none)."""
        keep = bad.bool()
        tensors = [p for p in self.params] + [t for p in self.params for t in self.optimizer.state[p].values()
                                              if isinstance(t, torch.Tensor)]  # fmt: skip
        before = {id(t): t.detach().clone() for t in tensors}
        self.optimizer.step()
        for p in self.params:
            for t in (p, *(v for v in self.optimizer.state[p].values() if isinstance(v, torch.Tensor))):
                old = before.get(id(t))
                t.data.copy_(torch.where(keep, old if old is not None else torch.zeros_like(t), t.data))

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

    def _fill(self, batch: Batch, lr: float) -> bool:
        """Copy the step's inputs into the graph's buffers; False when the batch does not fit them."""
        if self._static is None:
            buffers = (torch.empty(t.shape, dtype=t.dtype, device=self.device) for t in
                       (batch.images, batch.labels, batch.ids))  # fmt: skip
            epoch = torch.zeros((), dtype=torch.int64, device=self.device)
            self._static = Batch(*buffers, epoch=epoch, position=(0, 0))
        s = self._static
        pairs = ((s.images, batch.images), (s.labels, batch.labels), (s.ids, batch.ids))
        if any(a.shape != b.shape or a.dtype != b.dtype for a, b in pairs):
            return False
        for dst, src in pairs:
            dst.copy_(src, non_blocking=True)
        s.epoch.fill_(batch.epoch)
        self.lr.fill_(lr)
        return True

    def _body(self) -> torch.Tensor:
        return self.update(self.forward_backward(self._static), None)

    def _graphed(self, batch: Batch, lr: float) -> torch.Tensor:
        if not self._fill(batch, lr):
            if self._graph is not None and not getattr(self, "_told_shape", False):
                logger.info("a batch of shape %s does not fit the CUDA graph's %s: it runs as an ordinary step",
                            tuple(batch.images.shape), tuple(self._static.images.shape))  # fmt: skip
                self._told_shape = True
            self.lr.fill_(lr)
            return self.update(self.forward_backward(batch), None)
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
