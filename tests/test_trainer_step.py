"""`sync_once`: our training step against sam3's own `Trainer._run_step`, on the same model, batches and
loss terms: same gradients, same logged values in the same order, same meters, whether a step's values
are read at its end or in the next step; a non-finite loss still stops the run, before any weight could
move or before the next optimizer step. `compile_model`: the first step eager. gc: frozen after the first
step, thawed after `run`."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from sam3.train.trainer import Trainer as Sam3Trainer

from sam3ft.train.trainer import HostFloats, Trainer


@pytest.fixture(autouse=True)
def unfrozen_gc() -> Iterator[None]:
    """Steps here freeze gc (`_freeze_gc`) outside `run`: thawed for the tests after each."""
    gc.unfreeze()
    yield
    gc.unfreeze()


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, int]] = []

    def log(self, name: str, data: Any, step: int) -> None:
        self.calls.append((name, data, step))


def _step(self: Any, batch: Any, model: torch.nn.Module, phase: str) -> Any:
    """The shape of sam3's `Trainer._step`: per-term logs of tensors, then the core loss."""
    x, target = batch
    out = model(x)
    terms = {"loss_a": ((out - target) ** 2).mean(), "loss_b": out.abs().mean() * self.scale}
    terms["count"] = torch.tensor(x.shape[0], dtype=torch.long)  # a non-float term, as sam3 logs
    step = self.steps[phase]
    for name, value in terms.items():
        self.logger.log(f"Step_Losses/{name}", value, step)
    core = terms["loss_a"] * 2 + terms["loss_b"]
    self.logger.log("Step_Losses/core", core, step)
    self.steps[phase] += 1
    return {"Losses/train_all_loss": core}, x.shape[0], {f"Losses/train_all_{k}": v for k, v in terms.items()}


def _trainer(cls: type, sync_once: bool, scale: float = 1.0, accum: int = 1) -> Any:
    """A trainer object with what `_run_step` touches, sam3's own AverageMeters, a real model."""
    torch.manual_seed(0)
    trainer = object.__new__(cls)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    model.no_sync = contextlib.nullcontext
    trainer.model = model
    trainer.sync_once = sync_once
    trainer.compile_model, trainer._eager_step_done, trainer._gc_frozen = False, False, False
    trainer._queued, trainer._steps_left = [], 0  # as Trainer.__init__ sets them
    trainer.scale = scale
    trainer.steps = {"train": 0}
    trainer.logger = Recorder()
    trainer.optim = SimpleNamespace(zero_grad=model.zero_grad)
    trainer.gradient_accumulation_steps = accum
    trainer.optim_conf = SimpleNamespace(amp=SimpleNamespace(enabled=False, amp_dtype="bfloat16"))
    trainer.scaler = torch.amp.GradScaler("cpu", enabled=False)
    trainer.device = torch.device("cpu")
    trainer._step = _step.__get__(trainer)
    return trainer


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(3, 4, generator=gen), torch.randn(3, 2, generator=gen)) for _ in range(n)]


def _meters() -> tuple[dict[str, Any], dict[str, Any]]:
    from sam3.train.utils.train_utils import AverageMeter

    return {"Losses/train_all_loss": AverageMeter("Losses/train_all_loss", "cpu")}, {}


def _as_float(data: Any) -> float:
    return float(data.item()) if isinstance(data, torch.Tensor) else float(data)


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("deferred", [False, True])
def test_one_read_per_step_gives_upstreams_grads_logs_and_meters(accum, deferred):
    """`deferred`: as in train_epoch, each step's values are read in the next step, the last at once."""
    runs = {}
    for name, cls, sync_once in (("upstream", Sam3Trainer, False), ("ours", Trainer, True)):
        trainer = _trainer(cls, sync_once, accum=accum)
        trainer._steps_left = 3 if deferred else 0
        loss_mts, extra_mts = _meters()
        grads = []
        for step in range(3):
            chunks = _batches(accum) if accum > 1 else _batches(1)[0]
            if step:  # different data per step, same for both runs
                chunks = [(x + step, y) for x, y in chunks] if accum > 1 else (chunks[0] + step, chunks[1])
            (Sam3Trainer._run_step if cls is Sam3Trainer else cls._run_step)(
                trainer, chunks, "train", loss_mts, extra_mts
            )
            grads.append([p.grad.clone() for p in trainer.model.parameters()])
            if name == "ours":  # logged so far: all steps but this one when deferred, but the last
                read = step if deferred and step < 2 else step + 1
                assert {s for _, _, s in trainer.logger.calls} == set(range(read * accum))  # per chunk
        runs[name] = (trainer.logger.calls, loss_mts, extra_mts, grads)
    (up_logs, up_loss, up_extra, up_grads), (logs, loss, extra, grads) = runs["upstream"], runs["ours"]
    assert all(not isinstance(data, torch.Tensor) for _, data, _ in logs)  # already read, once
    assert [(n, _as_float(d), s) for n, d, s in up_logs] == [(n, d, s) for n, d, s in logs]
    assert len(logs) == 4 * 3 * accum  # 3 terms + the core loss, 3 steps
    assert up_loss["Losses/train_all_loss"].avg == loss["Losses/train_all_loss"].avg
    assert {k: m.avg for k, m in up_extra.items()} == {k: m.avg for k, m in extra.items()}
    assert set(extra) == {"Losses/train_all_loss_a", "Losses/train_all_loss_b", "Losses/train_all_count"}
    for a, b in zip(up_grads, grads, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_non_finite_loss_read_in_the_next_step_stops_before_its_backward():
    trainer = _trainer(Trainer, sync_once=True, scale=float("nan"))
    trainer._steps_left = 3  # as in train_epoch
    loss_mts, extra_mts = _meters()
    trainer._run_step(_batches(1)[0], "train", loss_mts, extra_mts)
    assert all(p.grad is not None for p in trainer.model.parameters())  # not read yet
    with pytest.raises(FloatingPointError, match="Loss is nan"):
        trainer._run_step(_batches(2)[1], "train", loss_mts, extra_mts)
    # raised after the second step's forward, before its backward: no gradients to step with
    assert all(p.grad is None for p in trainer.model.parameters())
    assert loss_mts["Losses/train_all_loss"].count == 0
    assert [name for name, _, _ in trainer.logger.calls][-1] == "Step_Losses/core"  # step 0's, logged


def test_non_finite_loss_stops_before_any_weight_moves():
    trainer = _trainer(Trainer, sync_once=True, scale=float("nan"))
    loss_mts, extra_mts = _meters()
    with pytest.raises(FloatingPointError, match="Loss is nan"):
        trainer._run_step(_batches(1)[0], "train", loss_mts, extra_mts)
    assert all(p.grad is None for p in trainer.model.parameters())  # an optimizer step would skip all
    assert loss_mts["Losses/train_all_loss"].count == 0
    # raise_on_error=False returns with no gradients, as upstream does
    trainer._run_step(_batches(1)[0], "train", loss_mts, extra_mts, raise_on_error=False)
    assert all(p.grad is None for p in trainer.model.parameters())


@pytest.mark.parametrize("sync_once", [False, True])
def test_compile_model_runs_the_first_step_eager(sync_once):
    """With `compile_model` the process's first training step runs under dynamo's force_eager stance
    (sam3 fills its lazy device caches then, outside any CUDA graph): a forward compiled with a
    backend that records each graph is traced at the second step, not the first, and later steps
    reuse the graph. The weights' gradients equal an eager trainer's at every step."""
    graphs: list[Any] = []

    def record(graph: torch.fx.GraphModule, inputs: Any) -> Any:
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    compiled, eager = _trainer(Trainer, sync_once), _trainer(Trainer, sync_once)
    compiled.compile_model = True
    compiled.model.forward = torch.compile(compiled.model.forward, backend=record)
    traced = []
    for batch in _batches(3):
        for trainer in (compiled, eager):
            trainer._run_step(batch, "train", *_meters())
        traced.append(len(graphs))
        for a, b in zip(compiled.model.parameters(), eager.model.parameters(), strict=True):
            assert torch.equal(a.grad, b.grad)
    torch._dynamo.reset()
    assert traced == [0, 1, 1]


def test_host_floats_are_exact_for_every_dtype():
    values = [
        torch.tensor(0.1, dtype=torch.float32),
        torch.tensor(1 / 3, dtype=torch.bfloat16),
        torch.tensor(2**40 + 1, dtype=torch.long),
        torch.tensor([0.7], dtype=torch.float64),  # one element, not 0-d
        2.5,
        3,
    ]
    assert HostFloats(values).get() == [v.item() if isinstance(v, torch.Tensor) else float(v) for v in values]
    assert HostFloats([1, 2.0]).get() == [1.0, 2.0]


def set_up_with(monkeypatch: Any, optimizer: torch.optim.Optimizer, scaler_enabled: bool) -> Trainer:
    """Our Trainer after `_setup_components` and `_construct_optimizers`, over upstream's versions
    replaced by a CPU GradScaler, a 0.1 gradient clipper and `optimizer`."""
    from sam3ft.train.optim import GradientClipper

    def setup(self: Any) -> None:
        self.device = torch.device("cpu")
        self.scaler = torch.amp.GradScaler("cpu", enabled=scaler_enabled)
        self.gradient_clipper = GradientClipper(max_norm=0.1)

    monkeypatch.setattr(Sam3Trainer, "_setup_components", setup)
    monkeypatch.setattr(Sam3Trainer, "_construct_optimizers", lambda self: setattr(
        self, "optim", SimpleNamespace(optimizer=optimizer)))  # fmt: skip
    trainer = object.__new__(Trainer)
    trainer._setup_components()
    trainer._construct_optimizers()
    return trainer


@pytest.mark.parametrize("enabled", [True, False])
def test_scaler_and_clipper_may_hand_their_passes_to_the_optimizer(monkeypatch, enabled):
    """Our Trainer swaps in DeviceGradScaler (same enabled state) and tells the clipper which optimizer
    may clip in its step (tests/test_adamw_kernel.py: the same weights as torch's passes)."""
    from sam3ft.train.optim import AdamWBf16, DeviceGradScaler

    optimizer = AdamWBf16([torch.nn.Parameter(torch.zeros(3))])
    trainer = set_up_with(monkeypatch, optimizer, scaler_enabled=enabled)
    assert type(trainer.scaler) is DeviceGradScaler and trainer.scaler.is_enabled() == enabled
    assert trainer.gradient_clipper.optimizer is optimizer


def test_a_checkpoint_is_replaced_in_one_step(tmp_path, monkeypatch):
    """The new checkpoint takes the old one's place in one rename: should that rename never happen
    (a kill), the old checkpoint is still there to resume from. Upstream removed it first."""
    path = tmp_path / "checkpoint.pt"
    trainer = object.__new__(Trainer)
    trainer._save_checkpoint({"epoch": 1}, str(path))
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    trainer._save_checkpoint({"epoch": 2}, str(path))
    assert torch.load(path, weights_only=True) == {"epoch": 2}
    assert not (tmp_path / "checkpoint.pt.tmp").exists()

    def killed(src: str, dst: str) -> None:
        raise KeyboardInterrupt  # the process dies before the rename

    monkeypatch.setattr("sam3ft.train.trainer.os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer._save_checkpoint({"epoch": 3}, str(path))
    assert torch.load(path, weights_only=True) == {"epoch": 2}


@pytest.mark.parametrize("compile_model", [False, True])
def test_gc_leaves_what_lives_after_the_first_step_alone(compile_model):
    """The objects alive after the first training step (with `compile_model`: the first compiled
    one, the process's second) go to gc's permanent generation, which its collections skip; once."""
    trainer = _trainer(Trainer, sync_once=True)
    if compile_model:
        torch._dynamo.reset()
        trainer.compile_model = True
        trainer.model.forward = torch.compile(trainer.model.forward, backend="eager")
    frozen = []
    for batch in _batches(3):
        trainer._run_step(batch, "train", *_meters())
        frozen.append(gc.get_freeze_count())
    torch._dynamo.reset()
    first = 1 if compile_model else 0  # the step after which gc froze
    assert frozen[:first] == [0] * first
    assert frozen[first] > 0
    # not frozen again, so later objects stay collectable (frozen ones still go when unreferenced)
    assert all(count <= frozen[first] for count in frozen[first + 1 :])


@pytest.mark.parametrize("fails", [False, True])
def test_run_thaws_gc_at_its_end(monkeypatch, fails):
    """`run` (upstream's epochs) freezes gc after the first step and thaws it when it ends, also by
    an error, so a process that trains twice (tests, notebooks) collects the first run's objects."""

    def run(self: Any) -> None:
        self._run_step(_batches(1)[0], "train", *_meters())
        assert gc.get_freeze_count() > 0
        if fails:
            raise FloatingPointError("Loss is nan")

    monkeypatch.setattr(Sam3Trainer, "run", run)
    trainer = _trainer(Trainer, sync_once=False)
    if fails:
        with pytest.raises(FloatingPointError):
            trainer.run()
    else:
        trainer.run()
    assert gc.get_freeze_count() == 0
    assert trainer._gc_frozen is False
