"""Shared fixtures: the repository root and a loaded copy of the shipped params.yaml."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "find-fuse-neutrals-v5"


@pytest.fixture(scope="session", autouse=True)
def sample_dataset() -> Path:
    """The bundled sample, restored from the in-repo DVC store if this checkout lacks it (offline)."""
    from filelock import FileLock  # one pull, also with several pytest-xdist workers

    with FileLock(REPO / ".pytest-sample.lock"):
        if not SAMPLE.is_dir():
            subprocess.run([sys.executable, "-m", "dvc", "pull", "data.dvc"], cwd=REPO, check=True)
    assert SAMPLE.is_dir(), f"{SAMPLE} missing after dvc pull"
    return SAMPLE


@pytest.fixture
def shipped_params() -> dict[str, Any]:
    """params.yaml as committed (a fresh dict per test, safe to mutate)."""
    return yaml.safe_load((REPO / "params.yaml").read_text())


def write_params(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def copy_worktree(dst: Path) -> None:
    """Tracked and untracked-but-not-ignored files: what a fresh clone of this commit would hold."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def checkout_copy(dst: Path, extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """A new git repo at `dst` holding `copy_worktree`, committed; returns the environment to run
    its stages and DVC in: this venv's tools first on PATH, the copy's own `src/` on PYTHONPATH."""
    copy_worktree(dst)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "GIT_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        PYTHONPATH="src",  # the copy's own code, not the editable install's checkout
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t",
        **(extra_env or {}),
    )
    env.pop("OMP_NUM_THREADS", None)  # the stages must pin threads themselves
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        subprocess.run(command, cwd=dst, env=env, check=True)
    return env


def recipe_trainer(recipe: str, preset: str, **changes: Any) -> Any:
    """The shipped params.yaml's trainer section with `recipe`, as on one GPU with autocast (the
    recipes are for GPUs; bf16 weights need the autocast), validated for `preset`."""
    from sam3ft import params

    data = dict(params.read_params(REPO / "params.yaml")["trainer"], recipe=recipe, num_gpus=1, amp=True)
    return params.section_from_dict(params.Trainer, {**data, **changes}, "trainer", preset)


def closed_port() -> int:
    """A loopback port nothing listens on, for a connection that must be refused."""
    from sam3ft.train.run import free_port

    return free_port()


def run_ok(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    """`cmd` in `cwd`; fails the test with the command and the tails of its output unless it exits 0."""
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(map(str, cmd))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    )
    return result


def cpu_type() -> dict[str, object]:
    """What decides which float kernels torch, MKL and oneDNN run: the vendor and the vector
    instruction sets. Two machines that agree here computed the same bits in every run we have
    (bench/results/cpu_repro.jsonl); the model number does not matter (VMs report their own)."""
    fields = cpuinfo()
    isa = sorted(f for f in fields.get("flags", "").split() if f.startswith(("avx", "amx", "fma", "f16c")))
    return {"vendor": fields.get("vendor_id", ""), "isa": isa}


def cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (vendor_id, model name, flags, ...)."""
    first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first.splitlines())}


LOCK_CPU = REPO / "tests" / "lock_cpu.json"  # the CPU type the committed dvc.lock was made on


def write_tiny_export(
    out: Path, *, masks: bool = False, threshold: float | None = 0.4, seed: int = 0, preset: str = "tiny"
) -> Path:
    """A real sam3ft export folder of a seeded random tiny model (bf16, full), as the export stage
    writes it; the box head's last layer is drawn at random (not DETR's zero init) so boxes depend on
    the image. `threshold=None`: an export from before model.json stored the operating threshold.
    `preset`: another preset the same way (bench/serve_load.py serves the sam3 preset on a GPU)."""
    import shutil

    import torch

    from sam3ft.io import write_json
    from sam3ft.model.build import build_model
    from sam3ft.model.export import FORMAT, cast, write_weights
    from sam3ft.model.spec import load_preset
    from sam3ft.stages.fetch import bundled_vocab

    spec = load_preset(preset).with_mask_head(masks)
    torch.manual_seed(seed)
    model = build_model(spec, str(bundled_vocab()), training=False, coord_cache=False)
    torch.nn.init.normal_(model.transformer.decoder.bbox_embed.layers[-1].weight, std=0.05)
    out.mkdir(parents=True, exist_ok=True)
    info = {"format": FORMAT, "spec": spec.to_dict(), "dtype": "bfloat16", "mode": "full"}
    info |= {"vocab": bundled_vocab().name, "prompts": {"1": "fuse neutrals"}, "checkpoint_sha256": "0" * 64}
    info |= write_weights(out, cast(model.state_dict(), torch.bfloat16), "model", torch_file=False)
    if threshold is not None:
        info["threshold"] = threshold
    shutil.copyfile(bundled_vocab(), out / bundled_vocab().name)
    write_json(out / "model.json", info)
    return out
