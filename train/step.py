"""One optimizer step of any recipe, built by one function: :func:`build_step`. The loop, ``fastmae bench``, the GPU
smoke checks, ``benchmarks/bench_finetune.py`` and the tests all build it here, so what a benchmark times is what the
loop runs.

:class:`StepParts` is what a recipe brings (its loss, a function of a
:class:`~fastmae.train.data.batch.Batch`; the optimizer and the trained parameters; the switches DDP and FSDP need);
the run spec brings the device, the one autocast and whether the step is one CUDA graph; the configuration's
optimisation section brings ``--accum-iter``, the NaN guard and clipping.

``step(batches, lr)`` pulls the micro-batches of one optimizer step from ``batches`` (an accumulation closes on a
batch whose place in its epoch divides by ``--accum-iter``, or on an epoch's last batch), runs each (normalise a uint8
batch on the device, forward under the autocast, backward of loss / accum, the gradient all-reduce only in the last
backward: nanoGPT's ``require_backward_grad_sync = (micro_step == last)``), then the update. Accumulation and none
share this one path. Nothing reads a number back to the host: the loss, the NaN counters and the skip flag stay on the
device, and the loop decides when to look (on logging steps).

The NaN guard skips an update whose loss or gradient norm is not finite, on the device: fused AdamW takes the flag
as its ``found_inf`` and leaves weights and moments untouched; any other optimizer (the probes' LARS) has its
parameters and state put back where the flag is set. Skips are counted, and so are skips in a row (the trainer rolls
back after ``--nan-rollback-after`` of them).

:class:`GraphedStep` wraps a step of one micro-batch (CUDA, one process, no fp16 loss scaler) so that the whole of it
(forward, backward, NaN guard, clipping, optimizer) is one CUDA graph: the batch, the epoch and the learning rate are
copied into device buffers the graph reads, so per-sample masks still differ from step to step. The first ``warmup``
calls are ordinary steps (on a side stream, as capture requires), the next is captured and replayed, later ones only
replay. A batch of another shape (a short batch after skipped files) runs as an ordinary step through the same code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from fastmae.config import Optimisation

from .data import Batch, model_input

logger = logging.getLogger("fastmae.step")


@dataclass
class StepParts:
    """What a recipe brings to its step. ``loss(batch)`` is its forward on a batch whose images are normalised, on the
    device; it returns a loss tensor (one, or one per probe), whose sum is backpropagated. ``params``: the trained
    parameters. ``sync(last)`` turns the gradient all-reduce of the next backward on or off (DDP / FSDP; None in one
    process); ``reduce(loss)`` averages the loss over ranks before the NaN guard, so that every rank skips alike
    (None: every rank computes the same loss); ``after_update()`` runs after each update (an EMA). ``bands``: the
    run's bands (a :class:`~fastmae.train.data.DataBands` or :class:`~fastmae.bands.BandSpec`), whose statistics
    normalise a batch in the data's own dtype on the device (None: 8-bit RGB with ImageNet's, today's)."""

    loss: Callable[[Batch], torch.Tensor]
    optimizer: torch.optim.Optimizer
    params: Iterable[torch.nn.Parameter]
    sync: Callable[[bool], None] | None = None
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    scaler: torch.amp.GradScaler | None = None
    after_update: Callable[[], None] | None = None
    bands: object | None = None


def build_step(parts: StepParts, spec, options: Optimisation | None = None, *, warmup: int = 3,
               graph_factory: Callable[[], CUDAGraph] | None = None) -> TrainStep | GraphedStep:  # fmt: skip
    """The training step of ``parts`` in the run ``spec`` (a :class:`~fastmae.train.spec.RunSpec`: device, autocast,
    graphs) with ``options``' accumulation, NaN guard and clipping (default: one micro-batch, the guard on, no
    clipping); one CUDA graph after ``warmup`` ordinary steps when the spec says so."""
    options = options or Optimisation()
    step = TrainStep(parts, spec.device, spec.autocast, accum=options.accum_iter, nan_guard=options.nan_guard,
                     clip_grad=options.clip_grad)  # fmt: skip
    if not spec.graphs:
        return step
    return GraphedStep(step, warmup, graph_factory or CUDAGraph)


class TrainStep:
    """See the module docstring; :func:`build_step` makes one."""

    def __init__(self, parts: StepParts, device: torch.device, autocast: Callable = contextlib.nullcontext, *,
                 accum: int = 1, nan_guard: bool = True, clip_grad: float | None = None):  # fmt: skip
        self.loss, self.optimizer, self.device, self.autocast = parts.loss, parts.optimizer, device, autocast
        self.params = [p for p in parts.params if p.requires_grad]
        self.sync, self.reduce, self.scaler, self.after_update = parts.sync, parts.reduce, parts.scaler, \
            parts.after_update  # fmt: skip
        self.bands = parts.bands
        self.accum, self.nan_guard, self.clip_grad = accum, nan_guard, clip_grad
        self.fused = bool(self.optimizer.defaults.get("fused"))  # takes found_inf: skips on the device by itself
        self.nan_skipped = torch.zeros((), device=device)  # device-side counters, read on logging steps only
        self.nan_in_a_row = torch.zeros((), device=device)
        self.loss_sum: torch.Tensor | float = 0.0  # of the accumulation so far
        self.images = 0  # images in the step being taken (or the last one taken)
        self.last_batch: Batch | None = None  # the micro-batch that closed the last step (its position, epoch end)

    # --------------------------------------------------------------------------------------------- the step
    def __call__(self, batches: Iterable[Batch] | Batch, lr: float) -> torch.Tensor | None:
        """The micro-batches of one step, pulled from ``batches`` (a single :class:`Batch` is one micro-batch), and
        the update at ``lr``: returns the step's loss (averaged over micro-batches and ranks; a device tensor,
        overwritten by the next graphed step: read or copy it before the next call), or None when ``batches`` ran out
        before the accumulation closed (the next call goes on with it)."""
        for batch in (batches,) if isinstance(batches, Batch) else batches:
            last = batch.epoch_end or batch.position[1] % self.accum == 0
            if self.sync is not None:
                self.sync(last)  # the gradient all-reduce only in the backward of the last micro-batch
            if isinstance(self.loss_sum, float):  # the first micro-batch of a step
                self.images = 0
            self.loss_sum = self.loss_sum + self.forward_backward(batch)
            self.images += len(batch)
            if last:
                self.last_batch = batch
                loss_sum, self.loss_sum = self.loss_sum, 0.0
                return self.update(loss_sum / self.accum, lr)
        return None

    def forward_backward(self, batch: Batch) -> torch.Tensor:
        """One micro-batch: forward under autocast, backward of loss / accum; returns the (detached, float32) loss."""
        batch = dataclasses.replace(batch, images=model_input(batch.images, self.bands))
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

    # ------------------------------------------------------------------------------------------- the counters
    def nan_counters(self) -> torch.Tensor:
        """[skipped so far, skipped in a row], on the device (the loop reads them with the loss on logging steps)."""
        return torch.stack([self.nan_skipped, self.nan_in_a_row])

    def restart(self) -> None:
        """After the optimizer's state was loaded again (a rollback): the run of non-finite steps starts anew."""
        self.nan_in_a_row.zero_()

    captured = False  # a TrainStep runs eagerly (GraphedStep: whether its graph was captured)
    captures_next = False


class CUDAGraph:
    """torch.cuda.CUDAGraph behind the two calls :class:`GraphedStep` makes (tests stand a CPU replay in here)."""

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


class GraphedStep:
    """A :class:`TrainStep` of one micro-batch as one CUDA graph (see the module docstring); the same calls and
    counters as the step it wraps. :meth:`restart` drops the graph (a rollback replaced the optimizer's state)."""

    def __init__(self, step: TrainStep, warmup: int = 3, graph_factory: Callable[[], CUDAGraph] = CUDAGraph):
        self.step, self.warmup, self.graph_factory = step, warmup, graph_factory
        self.graph: CUDAGraph | None = None
        self.static: Batch | None = None  # the buffers the graph reads
        self.calls = 0  # ordinary steps since the graph was (in)validated
        self.stream: torch.cuda.Stream | None = None  # the warm-up steps' side stream
        self.told_shape = False
        self.use_device_lr()

    # what the loop and the benchmarks read, as on the step itself
    optimizer = property(lambda self: self.step.optimizer)
    params = property(lambda self: self.step.params)
    device = property(lambda self: self.step.device)
    nan_skipped = property(lambda self: self.step.nan_skipped)
    nan_in_a_row = property(lambda self: self.step.nan_in_a_row)
    images = property(lambda self: self.step.images)
    last_batch = property(lambda self: self.step.last_batch)

    def nan_counters(self) -> torch.Tensor:
        return self.step.nan_counters()

    def __call__(self, batches: Iterable[Batch] | Batch, lr: float) -> torch.Tensor | None:
        batch = batches if isinstance(batches, Batch) else next(iter(batches), None)
        if batch is None:
            return None
        self.step.images, self.step.last_batch = len(batch), batch
        if not self.fill(batch, lr):
            if self.graph is not None and not self.told_shape:
                logger.info("a batch of shape %s does not fit the CUDA graph's %s: it runs as an ordinary step",
                            tuple(batch.images.shape), tuple(self.static.images.shape))  # fmt: skip
                self.told_shape = True
            self.lr.fill_(lr)
            return self.step.update(self.step.forward_backward(batch), None)
        if self.graph is not None:
            self.graph.replay()
            return self.loss
        if self.calls < self.warmup:  # ordinary steps first: compilation, autotuning, optimizer state, workspaces
            self.calls += 1
            with self.side_stream():
                return self.body()
        self.step.optimizer.zero_grad(set_to_none=True)
        graph = self.graph_factory()
        self.loss = graph.capture(self.body)  # recorded, not run
        self.graph = graph
        graph.replay()  # this step, for real
        logger.info("the training step is one CUDA graph from here on (captured after %d ordinary steps)",
                    self.warmup)  # fmt: skip
        return self.loss

    def body(self) -> torch.Tensor:
        return self.step.update(self.step.forward_backward(self.static), None)

    def use_device_lr(self) -> None:
        """The learning rate as a device tensor the graph reads (fused AdamW takes a tensor lr), capture allowed. On a
        GPU it is float32, which the fused kernel reads: updates then differ in the last bit from steps with a Python
        lr (a double); elsewhere float64, the same updates bit for bit."""
        device = self.step.device
        self.lr = torch.zeros((), dtype=torch.float32 if device.type == "cuda" else torch.float64, device=device)
        for group in self.step.optimizer.param_groups:
            group["lr"], group["capturable"] = self.lr, True
        self.step.optimizer._warned_capturable_if_run_uncaptured = True  # the ordinary warm-up steps are meant

    def fill(self, batch: Batch, lr: float) -> bool:
        """Copy the step's inputs into the graph's buffers; False when the batch does not fit them."""
        device = self.step.device
        if self.static is None:
            buffers = (torch.empty(t.shape, dtype=t.dtype, device=device) for t in
                       (batch.images, batch.labels, batch.ids))  # fmt: skip
            epoch = torch.zeros((), dtype=torch.int64, device=device)
            self.static = Batch(*buffers, epoch=epoch, position=(0, 0))
        s = self.static
        pairs = ((s.images, batch.images), (s.labels, batch.labels), (s.ids, batch.ids))
        if any(a.shape != b.shape or a.dtype != b.dtype for a, b in pairs):
            return False
        for dst, src in pairs:
            dst.copy_(src, non_blocking=True)
        s.epoch.fill_(batch.epoch)
        self.lr.fill_(lr)
        return True

    @contextlib.contextmanager
    def side_stream(self):
        """Warm-up steps run on a side stream, as CUDA graph capture requires (on a CPU: nothing to do)."""
        device = self.step.device
        if device.type != "cuda":
            yield
            return
        if self.stream is None:  # one stream for every warm-up step: the allocator keeps a pool per stream
            self.stream = torch.cuda.Stream(device)
        self.stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self.stream):
            yield
        torch.cuda.current_stream(device).wait_stream(self.stream)

    def restart(self) -> None:
        """After the optimizer's state was loaded again (a rollback: new state tensors, a number for lr): the run of
        non-finite steps starts anew, and the next calls warm up and capture again."""
        self.step.restart()
        self.invalidate()

    def invalidate(self) -> None:
        """Forget the graph: the next calls warm up and capture again (on the optimizer's state as it is now)."""
        self.graph, self.calls = None, 0
        self.use_device_lr()

    @property
    def captured(self) -> bool:
        return self.graph is not None

    @property
    def captures_next(self) -> bool:
        """Whether the next call of a batch that fits captures the graph (a benchmark resets the memory peak then:
        the capture allocates the step's activations in the graph's pool; replays allocate nothing)."""
        return self.graph is None and self.calls >= self.warmup
