"""The lean recipe under DDP on the CPU (gloo, 2 processes, tiny preset): the training forward
compiled (`compile_model`) trains what the eager forward trains, and validation evaluates each
item in exactly one process. The train stage runs in this process; its launch spawns the 2 ranks
here as launch_local spawns one per GPU (the CPU has no GPU count to spawn by)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from sam3ft import params
from sam3ft.stages import train as stage
from sam3ft.train.run import free_port, run_trainer
from test_recipes import _losses
from test_train import workspace

pytestmark = pytest.mark.slow

WORLD = 2


def _rank(rank: int, cfg_yaml: str, port: int, record: str) -> None:
    """One training process. torch.compile gets a backend that counts the graphs it is given and
    runs them through AOT autograd with eager kernels ("aot_eager": the path inductor takes,
    without its code generation, as in tests/test_recipes.py's single-process compiled test).
    Each rank writes to `record` the validation items it evaluated and the graphs compiled."""
    from torch._dynamo.backends.registry import lookup_backend

    from sam3ft.train.trainer import Trainer

    graphs: list[int] = []  # nodes per graph
    aot_eager = lookup_backend("aot_eager")

    def backend(graph: torch.fx.GraphModule, inputs: list) -> object:
        graphs.append(len(graph.graph.nodes))
        return aot_eager(graph, inputs)

    compile_fn = torch.compile
    torch.compile = lambda fn, mode=None: compile_fn(fn, backend=backend)  # type: ignore[assignment]
    val_epoch = Trainer.val_epoch

    def recording_val_epoch(self, val_loader, phase):
        items = [int(i) for i in val_loader.sampler]
        with open(Path(record) / f"val-rank{rank}-epoch{self.epoch}.json", "w") as f:
            json.dump({"items": items, "size": len(val_loader.dataset)}, f)
        return val_epoch(self, val_loader, phase)

    Trainer.val_epoch = recording_val_epoch  # type: ignore[method-assign]
    cfg = OmegaConf.create(cfg_yaml)
    run_trainer(cfg, rank, rank, WORLD, ("127.0.0.1", port))
    (Path(record) / f"graphs-rank{rank}.json").write_text(json.dumps(graphs))


def _train_ddp(root: Path, shipped: dict, monkeypatch, compile_model: bool) -> Path:
    path = workspace(root, shipped, max_epochs=1, batch_size=2, recipe="lean", compile_model=compile_model)
    record = root / "ranks"
    record.mkdir()

    def launch(cfg, trainer, launcher, scratch) -> None:
        args = (OmegaConf.to_yaml(cfg), free_port(), str(record))
        mp.start_processes(_rank, args=args, nprocs=WORLD, start_method="spawn")

    with monkeypatch.context() as m:
        m.setattr(stage, "launch", launch)
        # what the stage sets for its process, put back for the tests after this one
        m.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", ""))
        threads = torch.get_num_threads()
        try:
            stage.run(params.load(stage.SECTIONS, path))
        finally:
            torch.set_num_threads(threads)
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory, request) -> dict[str, Path]:
    shipped = params.read_params(Path(request.config.rootpath) / "params.yaml")
    with pytest.MonkeyPatch.context() as monkeypatch:
        return {
            name: _train_ddp(
                tmp_path_factory.mktemp(name), json.loads(json.dumps(shipped)), monkeypatch, compiled
            )
            for name, compiled in (("eager", False), ("compiled", True))
        }


def test_compiled_ddp_trains_what_eager_ddp_trains(runs):
    """Same losses at every step (rank 0's, as logged) within the compiled single-process test's
    tolerance, and the same weights after them up to float rounding. Every rank of the compiled
    run trained through dynamo's graphs: the forward's between its breaks (the matching and the
    geometry encoder stay eager) and the batched loss's terms; the eager run compiled none."""
    config = (runs["compiled"] / "train/run/trainer_config.yaml").read_text()
    assert config.count("compile_model: true") == 3  # the knob, the trainer, the model's builder
    for rank in range(WORLD):
        graphs = json.loads((runs["compiled"] / f"ranks/graphs-rank{rank}.json").read_text())
        assert len(graphs) >= 5 and sum(graphs) > 500, graphs
        assert json.loads((runs["eager"] / f"ranks/graphs-rank{rank}.json").read_text()) == []
    eager, compiled = _losses(runs["eager"]), _losses(runs["compiled"])
    assert len(eager) == 24 // (WORLD * 2)  # 24 training images, 2 per process and step
    assert compiled == pytest.approx(eager, rel=1e-6)
    first, last = (torch.load(r / "train/checkpoint.pt", weights_only=True)["model"] for r in runs.values())
    assert first.keys() == last.keys()
    assert all(torch.allclose(first[k], last[k], rtol=1e-4, atol=1e-5) for k in first)


@pytest.mark.parametrize("name", ["eager", "compiled"])
def test_each_validation_item_is_evaluated_once(runs, name):
    """The ranks' validation shares are disjoint and together every item of the split, once
    (upstream's sampler pads the last round with repeated items)."""
    shares = [json.loads(p.read_text()) for p in sorted((runs[name] / "ranks").glob("val-rank*-epoch0.json"))]
    assert len(shares) == WORLD
    size = shares[0]["size"]
    assert size % WORLD == 1  # the bundled sample's validation items do not split evenly
    items = [i for share in shares for i in share["items"]]
    assert sorted(items) == list(range(size))
    assert [len(share["items"]) for share in shares] == [size // WORLD + 1, size // WORLD]
