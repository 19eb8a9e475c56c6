"""`sam3ft doctor`: each check on temporary copies of params.yaml and .dvc/config; loopback network only."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO, SAMPLE, closed_port, write_params
from sam3ft import doctor, params, preflight
from sam3ft.__main__ import main as cli
from sam3ft.data.doctor import dataset_checks
from sam3ft.model.build import bundled_vocab
from sam3ft.model.spec import load_preset
from sam3ft.preflight import Check
from sam3ft.train import memory
from sam3ft.train.model import trained_groups

FAKE_SECRETS = {  # planted values that must never reach doctor's output
    "AWS_ACCESS_KEY_ID": "AKIAFAKEENVKEYID0001",
    "AWS_SECRET_ACCESS_KEY": "fake-env-secret-9f3c1e",
    "AWS_SESSION_TOKEN": "fake-env-session-77aa",
    "HF_TOKEN": "hf_fake_token_5d2b8a",
}
LOCAL_SECRET = "fake-config-local-secret-4e61"
URL_PASSWORD = "fake-url-password-0c9d"


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """A throwaway repo root: the shipped params.yaml and .dvc/config, a bundled store, no credentials."""
    (tmp_path / ".dvc").mkdir()
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copy(REPO / ".dvc" / "config", tmp_path / ".dvc" / "config")
    (tmp_path / "bundled-store").mkdir()
    shutil.copytree(SAMPLE, tmp_path / "data" / SAMPLE.name)  # the dataset checks read it
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.aws/credentials of this machine
    for name in (*FAKE_SECRETS, "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # same answers on a GPU machine
    monkeypatch.chdir(tmp_path)
    return tmp_path


def s3_remote(repo: Path, endpoint: str, local_extra: str = "") -> None:
    """Point the default `storage` remote at a real-looking bucket; endpoint and keys in config.local."""
    config = repo / ".dvc" / "config"
    config.write_text(config.read_text().replace("s3://CHANGE-ME-bucket/sam3ft", "s3://team-bucket/sam3ft"))
    (repo / ".dvc" / "config.local").write_text(
        f"['remote \"storage\"']\n    endpointurl = {endpoint}\n{local_extra}"
    )


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = cli(["doctor", *args])
    out, err = capsys.readouterr()
    return code, out + err


def test_shipped_params_all_ok_except_placeholder_remote(repo, capsys):
    checks = doctor.run_checks(repo / "params.yaml", repo) + dataset_checks(repo / "params.yaml", repo)
    names = [c.name for c in checks]
    for expected in ("python", "torch", "sam3", "dvc", "dvclive", "hydra-core", "params", "model"):
        assert expected in names
    for expected in ("accelerator", "vram", "disk", "secrets", "threads", "remote bundled", "dataset"):
        assert expected in names
    problems = [c for c in checks if c.status != "OK"]
    assert [(c.status, c.name) for c in problems] == [("WARN", "remote storage (default)")]
    assert "not configured" in problems[0].detail and problems[0].fix
    code, out = run_cli(capsys, "--params", "params.yaml")
    assert code == 0
    assert out.count("\n") == len(checks) + 1  # one line per check, then the summary
    assert "WARN  remote storage (default): s3://CHANGE-ME-bucket/sam3ft: not configured" in out
    assert "-> fix: dvc remote modify storage url" in out


def test_runs_from_a_subfolder_as_from_the_checkout_root(repo, capsys, monkeypatch):
    """As dvc does: the default params.yaml and every path in it are the root's; `--params` stays
    relative to where the command runs."""
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")  # with params.yaml: what marks a checkout's root
    code, at_root = run_cli(capsys)
    monkeypatch.chdir(repo / "data" / SAMPLE.name)
    assert run_cli(capsys) == (code, at_root) and code == 0
    assert Path.cwd() == repo
    monkeypatch.chdir(repo / "data")
    code, out = run_cli(capsys, "--params", "params.yaml")
    assert code == 1 and "params.yaml not found" in out and Path.cwd() == repo / "data"


def test_cuda_without_cuda_fails_with_fix(repo, shipped_params, capsys):
    shipped_params["trainer"]["num_gpus"] = 1
    write_params(repo / "params.yaml", shipped_params)
    code, out = run_cli(capsys, "--params", "params.yaml")
    assert code == 1
    line = next(x for x in out.splitlines() if x.startswith("FAIL  accelerator"))
    assert "trainer.num_gpus >= 1" in line and "sees no CUDA device" in line
    assert "fix: set trainer.num_gpus: 0 (CPU)" in line


def test_vram_estimate_against_a_faked_gpu(repo, shipped_params, monkeypatch):
    shipped_params["model"]["preset"] = "sam3"
    shipped_params["trainer"].update(num_gpus=1, resolution=1008, amp=True, batch_size=8)
    write_params(repo / "params.yaml", shipped_params)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (20e9, 80e9))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda path: SimpleNamespace(free=1e12))
    checks = by_name(doctor.run_checks(repo / "params.yaml", repo))
    assert checks["accelerator"].status == "OK"
    assert "Fake GPU, 20.0 of 80.0 GB free" in checks["accelerator"].detail
    assert checks["vram"].status == "WARN"  # stock recipe, batch 8: ~29.3 GB needed, 20 GB free, 80 GB total
    assert "~29.3" in checks["vram"].detail and "20.0 of 80.0 GB free" in checks["vram"].detail
    assert preflight.check_vram(24.2, "x", 16.0, 16.0).status == "FAIL"
    assert preflight.check_vram(24.2, "x", 30.0, 80.0).status == "OK"


def test_disk_formula():
    trainer = SimpleNamespace(max_epochs=12, checkpoint_freq=0, select="last")
    f32 = SimpleNamespace(dtype="float32")
    # sam3: checkpoint 12 B x 840 M = 10.08 GB, in scratch + paths.train + cache, and 2 x 3.36 GB export
    assert preflight.disk_needed_gb(840e6, trainer, f32) == pytest.approx(3 * 10.08 + 2 * 3.36)
    bf16 = SimpleNamespace(dtype="bfloat16")
    assert preflight.disk_needed_gb(840e6, trainer, bf16) == pytest.approx(3 * 10.08 + 2 * 1.68)
    trainer.checkpoint_freq = 4  # checkpoint_4, _8, _12 kept besides checkpoint.pt
    assert preflight.disk_needed_gb(840e6, trainer, f32) == pytest.approx(6 * 10.08 + 2 * 3.36)
    trainer.select = "AP50"  # best.pt besides
    assert preflight.disk_needed_gb(840e6, trainer, f32) == pytest.approx(7 * 10.08 + 2 * 3.36)
    lean = SimpleNamespace(max_epochs=12, checkpoint_freq=0, select="last", optimizer="adamw_bf16")
    assert preflight.disk_needed_gb(840e6, lean, f32) == pytest.approx(3 * 6.72 + 2 * 3.36)  # bf16 moments
    lean.weight_dtype = "bfloat16"  # and bf16 weights; 32 M trainable (frozen trunk): moments of those only
    assert preflight.disk_needed_gb(840e6, lean, f32, 32e6) == pytest.approx(3 * (1.68 + 0.128) + 2 * 3.36)


def test_too_little_disk_fails_with_the_numbers(repo, shipped_params, monkeypatch, capsys):
    shipped_params["export"]["dtype"] = "float32"
    write_params(repo / "params.yaml", shipped_params)
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda path: SimpleNamespace(free=0.05e9))
    code, out = run_cli(capsys, "--params", "params.yaml")
    assert code == 1
    line = next(x for x in out.splitlines() if x.startswith("FAIL  disk"))
    # tiny: 4 x 51.6 MB checkpoints (best.pt among them) + 2 x 17.2 MB exported weights = 0.24 GB
    assert "0.1 GB free" in line and "writes ~0.24 GB" in line and "free at least 0.2 GB" in line


def test_secrets_never_printed(repo, shipped_params, monkeypatch, capsys):
    for name, value in FAKE_SECRETS.items():
        monkeypatch.setenv(name, value)
    shipped_params["fetch"]["weights"] = "hf://facebook/sam3"
    write_params(repo / "params.yaml", shipped_params)
    s3_remote(
        repo,
        f"http://127.0.0.1:{closed_port()}",
        f"    access_key_id = AKIAFAKELOCALKEY0002\n    secret_access_key = {LOCAL_SECRET}\n"
        f"['remote \"mirror\"']\n    url = https://alice:{URL_PASSWORD}@127.0.0.1:9/store?sig={LOCAL_SECRET}\n",
    )
    code, out = run_cli(capsys, "--params", "params.yaml")
    for secret in (*FAKE_SECRETS.values(), LOCAL_SECRET, URL_PASSWORD, "AKIAFAKELOCALKEY0002"):
        assert secret not in out
    checks = by_name(doctor.run_checks(repo / "params.yaml", repo))
    assert "in .dvc/config.local" in checks["remote storage credentials"].detail
    assert "AWS_ACCESS_KEY_ID/SECRET env" in checks["remote storage credentials"].detail
    assert checks["remote mirror"].detail.startswith("https://alice:***@127.0.0.1:9/store ")
    assert checks["secrets"].status == "OK" and "HF_TOKEN" in checks["secrets"].detail
    assert code == 1  # the closed endpoint


def test_hf_weights_without_token_warn(repo, shipped_params):
    shipped_params["fetch"]["weights"] = "hf://facebook/sam3"
    write_params(repo / "params.yaml", shipped_params)
    check = by_name(doctor.run_checks(repo / "params.yaml", repo))["secrets"]
    assert check.status == "WARN" and "HF_TOKEN is not set" in check.detail and "HF_TOKEN" in check.fix


def test_keys_in_tracked_config_fail(repo):
    config = repo / ".dvc" / "config"
    config.write_text(config.read_text() + f"    secret_access_key = {LOCAL_SECRET}\n")
    s3_remote(repo, f"http://127.0.0.1:{closed_port()}")
    checks = by_name(doctor.run_checks(repo / "params.yaml", repo))
    assert checks["remote storage credentials"].status == "FAIL"
    assert "--local" in checks["remote storage credentials"].fix


def test_closed_loopback_endpoint_unreachable(repo):
    port = closed_port()
    s3_remote(repo, f"http://127.0.0.1:{port}")
    checks = by_name(doctor.run_checks(repo / "params.yaml", repo))
    assert checks["remote storage (default)"].detail == "s3://team-bucket/sam3ft"
    endpoint = checks["remote storage endpoint"]
    assert endpoint.status == "FAIL" and f"127.0.0.1:{port} unreachable" in endpoint.detail
    assert checks["remote storage credentials"].status == "WARN"  # none planted
    assert "endpointurl" in endpoint.fix


def test_listening_loopback_endpoint_reachable():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        check = doctor.check_reachable("storage", "127.0.0.1", server.getsockname()[1])
    assert check.status == "OK" and "reachable" in check.detail


def test_invalid_params_fail_and_remotes_still_checked(repo, shipped_params):
    shipped_params["trainer"]["batch_size"] = 0
    write_params(repo / "params.yaml", shipped_params)
    checks = by_name(doctor.run_checks(repo / "params.yaml", repo))
    assert checks["params"].status == "FAIL" and "trainer.batch_size=0 is invalid" in checks["params"].detail
    assert checks["params"].fix == "use >= 1"
    assert "disk" not in checks and "remote bundled" in checks


def test_invalid_params_in_another_file_name_that_file(repo, shipped_params):
    shipped_params["trainer"]["batch_size"] = 0
    path = write_params(repo / "gpu.yaml", shipped_params)
    detail = by_name(doctor.run_checks(path, repo))["params"].detail
    assert detail.startswith(f"{path}: trainer.batch_size=0 is invalid")


def test_resolution_must_match_preset(repo, shipped_params):
    """trainer.resolution follows the preset when null; a value set by hand must match it."""
    shipped_params["model"]["preset"] = "sam3"
    write_params(repo / "params.yaml", shipped_params)
    check = by_name(doctor.run_checks(repo / "params.yaml", repo))["model"]
    assert check.status == "OK" and "1008 px" in check.detail
    shipped_params["trainer"].update(resolution=224, resize_min=160)
    write_params(repo / "params.yaml", shipped_params)
    check = by_name(doctor.run_checks(repo / "params.yaml", repo))["model"]
    assert check.status == "FAIL" and check.fix == "set trainer.resolution: 1008"


def test_package_checks():
    assert doctor.check_package("torch", None, "==2.14.1").status == "FAIL"
    assert doctor.check_package("dvclive", None, "").status == "WARN"
    assert doctor.check_package("dvc", "3.40.0", "<4,>=3.50").status == "WARN"
    assert doctor.check_package("dvc", "3.67.1", "<4,>=3.50").status == "OK"


@pytest.mark.parametrize(
    ("statuses", "code"),
    [(["OK"], 0), (["OK", "WARN"], 0), (["WARN", "FAIL"], 1), (["FAIL", "OK"], 1)],
)
def test_exit_code_is_nonzero_exactly_on_fail(monkeypatch, capsys, statuses, code):
    checks = [Check(s, f"check{i}", "detail", "fix") for i, s in enumerate(statuses)]
    monkeypatch.setattr(doctor, "run_checks", lambda params, root: checks)
    assert run_cli(capsys)[0] == code


def _bench_rows() -> list[dict]:
    rows = [json.loads(line) for line in (REPO / "bench/results/gpu_recipes.jsonl").read_text().splitlines()]
    return [r for r in rows if "peak_gb" in r]


def _trained(row: dict) -> list[str]:
    """The groups a bench run trained: its trainable list, plus the mask head's with segmentation."""
    return trained_groups(row["trainable"], (row.get("overrides") or {}).get("segmentation") == "true")


def _weight_dtype(row: dict) -> str:
    """Rows carry no weight_dtype: the run's recipe file (or an override) set it."""
    recipe = params.load_recipe(row["recipe"])
    return (row.get("overrides") or {}).get("weight_dtype", recipe.get("weight_dtype", "float32"))


def test_counts_match_the_models_trained_on_the_gpu():
    """The meta-device count equals what the GPU runs reported for the real sam3 model."""
    spec = load_preset("sam3")
    built: dict[tuple, tuple[int, int]] = {}  # one meta-device build per distinct model
    for row in _bench_rows():
        key = (tuple(_trained(row)), row["lora_rank"])
        if key not in built:
            built[key] = memory.param_counts(spec, bundled_vocab(), list(key[0]), row["lora_rank"])
        assert built[key] == (row["params"], row["trainable_params"]), row["recipe"]


def test_vram_estimate_within_15_percent_of_every_measured_peak():
    """Every recipe and batch measured in bench/results/gpu_recipes.jsonl (H100, H200), with and without the
    DDP wrapper, boxes and masks, float32 and bf16 weights, the optimizer after and inside the backward."""
    spec = load_preset("sam3")
    rows = _bench_rows()
    assert {r["recipe"] for r in rows} >= {"stock", "lean", "frozen-trunk", "lora"}
    for row in rows:
        trainer = SimpleNamespace(amp=True, optimizer=row["optimizer"], lora_rank=row["lora_rank"])
        trainer.trainable, trainer.weight_dtype = _trained(row), _weight_dtype(row)
        trainer.autocast_cache, trainer.batch_size = row["autocast_cache"], row["batch"]
        trainer.num_gpus, trainer.num_nodes, trainer.ddp_one_process = 1, 1, row["ddp"]  # one process
        # rows before each switch: upstream's checkpointing
        trainer.act_ckpt_trunk = row.get("act_ckpt_trunk", True)
        trainer.act_ckpt_text = row.get("act_ckpt_text", True)
        trainer.act_ckpt_geometry = row.get("act_ckpt_geometry", True)
        trainer.act_ckpt_detr = row.get("act_ckpt_detr", True)
        largest = None  # only an in-backward optimizer's estimate reads it (a model build on meta)
        if row["optimizer"].endswith("_in_backward"):
            largest = memory.param_sizes(spec, bundled_vocab(), trainer.trainable, row["lora_rank"])[2]
        total, trained = row["params"], row["trainable_params"]
        estimate, how = memory.training_peak_gb(spec, total, trained, trainer, largest)
        assert abs(estimate - row["peak_gb"]) <= 0.15 * row["peak_gb"], (row["recipe"], row["batch"], how)


def test_vram_estimate_terms():
    """Static terms from parameter counts alone; unmeasured presets say they are a lower bound."""
    trainer = SimpleNamespace(amp=False, autocast_cache=True, optimizer="adamw_bf16", trainable=["heads"])
    trainer.lora_rank, trainer.batch_size = 0, 64
    tiny, how = memory.training_peak_gb(load_preset("tiny"), 1_000_000, 100_000, trainer)
    assert tiny == pytest.approx((4e6 + 100_000 * 8) / 1e9) and "not measured" in how
    sam3 = load_preset("sam3")
    trainer.amp, trainer.batch_size = True, 2
    lean, _ = memory.training_peak_gb(sam3, 10**9, 10**9, trainer)
    trainer.optimizer = "adamw"
    stock, _ = memory.training_peak_gb(sam3, 10**9, 10**9, trainer)
    assert stock - lean == pytest.approx(4.0)  # 4 B/param of moments saved
    trainer.autocast_cache = False
    assert stock - memory.training_peak_gb(sam3, 10**9, 10**9, trainer)[0] == pytest.approx(2.0)


def unchecked_cost(switch: str, trainable: list[str], lora_rank: int, batch: int) -> float:
    """GB the estimate adds for the sam3 preset (lean's optimizer, one process) when activation
    checkpointing `switch` goes from true to false."""
    trainer = SimpleNamespace(amp=True, autocast_cache=False, optimizer="adamw_bf16", trainable=trainable)
    trainer.lora_rank, trainer.batch_size, trainer.ddp_one_process = lora_rank, batch, True
    trainer.num_gpus = trainer.num_nodes = 1
    sam3 = load_preset("sam3")
    checked, _ = memory.training_peak_gb(sam3, 10**9, 10**8, trainer)
    setattr(trainer, switch, False)
    unchecked, _ = memory.training_peak_gb(sam3, 10**9, 10**8, trainer)
    return unchecked - checked


@pytest.mark.parametrize(
    ("trainable", "lora_rank", "kept"),
    [(["heads"], 0, False), (["geometry", "heads"], 0, True), (["neck"], 0, True), (["heads"], 16, True)],
)
def test_unchecked_geometry_encoder_costs_memory_only_when_the_backward_runs_through_it(
    trainable, lora_rank, kept
):
    """`act_ckpt_geometry: false` keeps the encoder's activations, which exist only when a gradient
    flows through it: it trains, or something before it does (neck, trunk, LoRA on the trunk)."""
    cost = unchecked_cost("act_ckpt_geometry", trainable, lora_rank, batch=8)
    assert cost == pytest.approx(8 * 0.027 if kept else 0.0)


@pytest.mark.parametrize(
    ("trainable", "lora_rank", "kept"), [(["heads"], 0, False), (["trunk"], 0, True), (["heads"], 16, True)]
)
def test_unchecked_trunk_costs_memory_only_when_the_backward_runs_through_it(trainable, lora_rank, kept):
    """`act_ckpt_trunk: false` keeps the ViT blocks' activations for the backward: per image, when
    the trunk trains or carries LoRA; a frozen trunk keeps none either way."""
    cost = unchecked_cost("act_ckpt_trunk", trainable, lora_rank, batch=4)
    assert cost == pytest.approx(4 * 6.83 if kept else 0.0)


@pytest.mark.parametrize(
    ("trainable", "lora_rank", "kept"),
    [(["heads"], 0, False), (["decoder", "heads"], 0, True), (["text"], 0, True), (["heads"], 16, True)],
)
def test_unchecked_detr_layers_cost_memory_only_when_the_backward_runs_through_them(
    trainable, lora_rank, kept
):
    """`act_ckpt_detr: false` keeps the DETR encoder's and decoder's activations: per image, when
    anything but the scoring heads trains (all of it feeds them); heads alone keep none."""
    cost = unchecked_cost("act_ckpt_detr", trainable, lora_rank, batch=4)
    assert cost == pytest.approx(4 * 0.96 if kept else 0.0)


def test_train_preflight_refuses_with_the_recipe_estimate(tmp_path, monkeypatch):
    """The train stage's pre-flight: one meta-device count feeds the disk and the VRAM check."""
    from sam3ft.errors import ConfigError
    from sam3ft.stages import train as stage

    data = params.read_params(REPO / "params.yaml")["trainer"]
    data.update(num_gpus=1, amp=True, resolution=1008, batch_size=4, recipe="lean")
    trainer = params.section_from_dict(params.Trainer, data, "trainer", "sam3")
    spec = load_preset("sam3")
    monkeypatch.setattr(stage.shutil, "disk_usage", lambda path: SimpleNamespace(free=1e12))
    monkeypatch.setattr(stage, "cuda_memory_gb", lambda: (11.0, 12.0))  # a 12 GB card
    # lean, batch 4: 14.3 GB (13.94 measured with the text and geometry encoders checkpointed,
    # + 0.07 + 0.027 GB per image)
    with pytest.raises(ConfigError, match=r"not enough GPU memory: estimated peak ~14\.3\d GB"):
        stage.preflight(spec, trainer, tmp_path, bundled_vocab())
    monkeypatch.setattr(stage, "cuda_memory_gb", lambda: (15.0, 16.0))
    stage.preflight(spec, trainer, tmp_path, bundled_vocab())  # fits a 16 GB card
    monkeypatch.setattr(stage.shutil, "disk_usage", lambda path: SimpleNamespace(free=20e9))
    with pytest.raises(ConfigError, match="not enough disk"):  # 3 copies of a 10 GB checkpoint
        stage.preflight(spec, trainer, tmp_path, bundled_vocab())
