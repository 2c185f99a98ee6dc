"""The training step (train/step.py, built by build_step as the loop builds it): eager, and the whole step as one
graph. On a CPU the graph is a stand-in that records the step at capture and runs it at each replay, reading only the
buffers the step was captured with, as a CUDA graph does; the same checks on a real CUDA graph are in
tests/test_gpu.py."""

import copy

import pytest
import torch
from fastmae.train.checkpointer import portable_optimizer_state
from fastmae.train.data import Batch
from fastmae.train.noise import mask_noise
from fastmae.train.pretrain import mae_loss
from fastmae.train.schedule import build_optimizer
from fastmae.train.spec import graphs_unsupported, local_spec
from fastmae.train.step import StepParts, build_step

from fastmae import create_model
from fastmae.cli import main

TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, decoder_embed_dim=32, decoder_depth=1,
            decoder_num_heads=2)  # fmt: skip


class ReplayGraph:
    """A CUDA graph's contract on a CPU: capture records and runs nothing (the outputs are placeholders); each replay
    runs the recorded step and writes its output into the tensor capture returned."""

    captures = 0

    def capture(self, fn):
        ReplayGraph.captures += 1
        self.fn, self.out = fn, torch.full((), float("nan"))
        return self.out

    def replay(self):
        self.out.copy_(self.fn())


class Recorder(torch.nn.Module):
    """The model, recording the noise (so the masks) each forward gets."""

    def __init__(self, model):
        super().__init__()
        self.model, self.noises = model, []

    def forward(self, imgs, mask_ratio, noise):
        self.noises.append(noise.clone())
        return self.model(imgs, mask_ratio=mask_ratio, noise=noise)


def _trainer(graphs: bool, wrap=None, precision="fp32"):
    """The pretraining step as the loop builds it (:func:`build_step` over :func:`mae_loss` in a one-process run
    spec), on a model that records the noise it gets (or on ``wrap(model)``); ``.model`` is the MAE."""
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch16", **TINY, kernels="reference", norm_pix_loss=True)
    opt = build_optimizer(model, 1e-3, 0.05, (0.9, 0.95), fused=True)
    rec = Recorder(model)
    spec = local_spec("cpu", precision, graphs=graphs)
    step_fn = wrap(model) if wrap is not None else rec
    loss = mae_loss(model, step_fn, spec.device, seed=7, mask_ratio=0.75)
    step = build_step(StepParts(loss, opt, model.parameters()), spec, warmup=2, graph_factory=ReplayGraph)
    step.model = model
    return step, rec


def _batches(n: int, batch: int = 4):
    """(batch, lr): new sample ids every step, the epoch every 3 steps, the lr every step."""
    g = torch.Generator().manual_seed(1)
    for b in range(n):
        imgs = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=g)
        ids = torch.arange(b * batch, (b + 1) * batch) * 7 + 3
        yield Batch(imgs, torch.zeros(batch, dtype=torch.long), ids, b // 3, (b // 3, b % 3 + 1)), 1e-3 * (b + 1) / n


def _short(batch: Batch, n: int) -> Batch:
    return Batch(batch.images[:n], batch.labels[:n], batch.ids[:n], batch.epoch, batch.position)


def test_graphed_step_is_the_eager_step_and_masks_change_every_step():
    """8 steps (epoch changes at step 4 and 7, lr every step): the graphed trainer (2 ordinary steps, a capture,
    then replays) gives the eager trainer's losses and weights bit for bit, and each replay's masks are those of
    that step's sample ids and epoch, different from the step before."""
    eager, _ = _trainer(False)
    graphed, rec = _trainer(True)
    before = ReplayGraph.captures
    for k, (batch, lr) in enumerate(_batches(8)):
        a = eager(batch, lr).clone()
        b = graphed(batch, lr).clone()
        assert torch.equal(a, b), k
        assert torch.equal(rec.noises[-1], mask_noise(7, batch.epoch, batch.ids, 64)), k
        if k:
            assert not torch.equal(rec.noises[-1], rec.noises[-2])
    assert graphed.captured and ReplayGraph.captures == before + 1 and len(rec.noises) == 8
    for (name, p), q in zip(eager.model.named_parameters(), graphed.model.parameters(), strict=True):
        assert torch.equal(p, q), name
    state = portable_optimizer_state(graphed.optimizer.state_dict())
    assert all(isinstance(g["lr"], float) and not g["capturable"] for g in state["param_groups"])
    assert state["param_groups"][0]["lr"] == pytest.approx(1e-3)


def test_a_batch_of_another_shape_runs_ordinarily_and_the_graph_stays_valid():
    eager, _ = _trainer(False)
    graphed, _ = _trainer(True)
    batches = list(_batches(6))
    batch, lr = batches[4]
    batches[4] = _short(batch, 3), lr  # a short batch: a skipped file
    for batch, lr in batches:
        assert torch.equal(eager(batch, lr), graphed(batch, lr).clone())
    assert graphed.captured


def test_nan_guard_inside_the_graph_counts_and_skips():
    """A non-finite batch during replays: the update is skipped on the device (weights untouched), the counters the
    loop reads on logging steps count it, and the next finite step resets the run of NaNs."""
    graphed, _ = _trainer(True)
    batches = list(_batches(6))
    for batch, lr in batches[:4]:
        graphed(batch, lr)
    assert graphed.captured
    graphed.model.pos_embed.data[0, 1, 0] = float("nan")  # every loss is NaN from here
    weights = [p.detach().clone() for p in graphed.params]
    graphed(*batches[4])
    assert graphed.nan_skipped.item() == 1 and graphed.nan_in_a_row.item() == 1
    assert all(torch.equal(w, p) for w, p in zip(weights, graphed.params, strict=True))
    graphed.model.pos_embed.data[0, 1, 0] = 0.0
    graphed(*batches[5])
    assert graphed.nan_skipped.item() == 1 and graphed.nan_in_a_row.item() == 0


def test_invalidate_captures_again_after_the_optimizer_state_is_loaded():
    eager, _ = _trainer(False)
    graphed, _ = _trainer(True)
    batches = list(_batches(9))
    for args in batches[:4]:
        eager(*args), graphed(*args)
    saved = portable_optimizer_state(eager.optimizer.state_dict())
    for t in (eager, graphed):  # each its own copy, as each rank reads the checkpoint file
        t.optimizer.load_state_dict(copy.deepcopy(saved))
    graphed.invalidate()
    assert not graphed.captured
    for args in batches[4:]:
        assert torch.equal(eager(*args), graphed(*args).clone())
    assert graphed.captured and isinstance(graphed.optimizer.param_groups[0]["lr"], torch.Tensor)


def test_graphs_unsupported_says_why():
    assert graphs_unsupported(torch.device("cuda"), 1, 1, "bf16", "none") == []
    why = graphs_unsupported(torch.device("cpu"), 2, 4, "fp16", "ddp")
    assert why == ["CUDA graphs need a CUDA device (this run is on cpu)",
                   "2 processes (ddp): the gradient all-reduce is not captured",
                   "--accum-iter 4: a graph holds one micro-batch and the update",
                   "fp16: the loss scaler's update is not captured (use bf16)"]  # fmt: skip


def test_cuda_graphs_where_they_cannot_run_is_one_line(tmp_path, capsys):
    code = main(["pretrain", "--device", "cpu", "--cuda-graphs", "--output-dir", str(tmp_path / "run"), "--data",
                 "digits", "--model", "mae_vit_mini_patch4", "--img-size", "32", "--num-workers", "0"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == ("fastmae: error: --cuda-graphs cannot run here: CUDA graphs need a CUDA device "
                                     "(this run is on cpu)")  # fmt: skip


def test_a_compiled_step_compiles_once_warm_up_capture_and_replays_alike():
    """The compiled model under bf16 autocast (as on a GPU): warm-up steps, the capture and the replays run under one
    autocast setting, so dynamo compiles once, at the first step; a step that compiled again at the capture would
    fail there on a GPU (torch refuses to compile during CUDA graph capture)."""
    graphs = []

    def counting_backend(gm, inputs):  # a dynamo backend that only counts the graphs it is handed
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    torch._dynamo.reset()
    compiled = lambda model: torch.compile(model, backend=counting_backend, dynamic=False)  # noqa: E731
    step, _ = _trainer(True, compiled, precision="bf16")
    batches = list(_batches(6))
    step(*batches[0])
    compiled = len(graphs)
    assert compiled >= 1
    for args in batches[1:]:
        assert torch.isfinite(step(*args))
    assert step.captured and len(graphs) == compiled  # nothing compiled after the first step
