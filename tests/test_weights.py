"""Base weights in: sam3.pt's layout, every source (path, hub, S3), and the key checks that refuse
weights which would leave the model at random init (upstream's loader loads nothing, silently)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import REPO, write_params
from sam3ft import params
from sam3ft.errors import ConfigError, Sam3ftError, WeightsError
from sam3ft.model.build import build_model, empty_weights
from sam3ft.model.spec import load_preset
from sam3ft.model.weights import (
    check_report,
    image_model_state,
    make_initializer,
    match_weights,
    read_weights_file,
)
from sam3ft.remote.weights import parse_source
from sam3ft.stages import fetch
from sam3ft.train.run import free_port

VOCAB = str(fetch.bundled_vocab())
TRACKER_KEYS = {
    "tracker.maskmem_tpos_enc": torch.zeros(7, 1, 1, 64),
    "tracker.no_mem_embed": torch.zeros(1, 1, 256),
}


def meta_model(preset: str):
    with empty_weights():
        return build_model(load_preset(preset), VOCAB, training=False, coord_cache=False)


def upstream_meta_model(monkeypatch):
    """sam3.model_builder.build_sam3_image_model itself, with its CUDA-only precomputes off."""
    import sam3.model_builder as builder
    from sam3.model.decoder import TransformerDecoder

    original_pe, original_coords = builder._create_position_encoding, TransformerDecoder._get_coords
    monkeypatch.setattr(
        builder, "_create_position_encoding", lambda precompute_resolution=None: original_pe()
    )
    monkeypatch.setattr(
        TransformerDecoder, "_get_coords", staticmethod(lambda h, w, device: original_coords(h, w, "cpu"))
    )
    with empty_weights():
        return builder.build_sam3_image_model(
            bpe_path=VOCAB, device="cpu", eval_mode=True, load_from_HF=False, enable_segmentation=True
        )


def test_sam3_preset_has_upstreams_exact_key_layout(monkeypatch):
    ours = {k: tuple(v.shape) for k, v in meta_model("sam3").state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in upstream_meta_model(monkeypatch).state_dict().items()}
    assert ours == theirs
    assert len(ours) == 1134
    assert 835e6 < sum(p.numel() for p in meta_model("sam3").parameters()) < 845e6


def test_full_size_sam3_pt_layout_loads_completely():
    """A checkpoint in sam3.pt's format (image model under `detector.`, video tracker beside it)."""
    model = meta_model("sam3")
    state = {f"detector.{k}": v for k, v in model.state_dict().items()} | TRACKER_KEYS
    report = match_weights(model, state)
    assert report.source_format == "sam3.pt"
    assert report.loaded_fraction == 1.0 and not report.missing and not report.unexpected
    assert report.ignored == len(TRACKER_KEYS)
    check_report(report, "sam3.pt", 0.95)


def test_trainer_checkpoint_keys_fed_to_upstream_layout_are_named():
    """The upstream bug inverted: bare trainer keys vs a `detector.`-only reader; and a foreign prefix."""
    model = meta_model("tiny")
    wrapped = {f"module.{k}": v for k, v in model.state_dict().items()}  # e.g. a DDP-wrapped save
    report = match_weights(model, wrapped)
    assert report.loaded_fraction == 0.0
    with pytest.raises(WeightsError, match="prefix mismatch") as err:
        check_report(report, "ddp.pt", 0.95)
    assert "'module.backbone" in str(err.value)


def test_partial_coverage_threshold():
    """A segmentation-less checkpoint into a model with the mask head: allowed only above the bar."""
    with_masks = meta_model("sam3")
    without = {k: v for k, v in with_masks.state_dict().items() if not k.startswith("segmentation_head.")}
    report = match_weights(with_masks, without)
    assert 0.99 < report.loaded_fraction < 1.0
    assert report.summary()["missing"].startswith("segmentation_head.")
    check_report(report, "nomask.pt", 0.95)
    with pytest.raises(WeightsError, match=r"would load \(minimum 100%\)"):
        check_report(report, "nomask.pt", 1.0)


@pytest.fixture(scope="module")
def tiny_sam3_pt(tmp_path_factory):
    """A real file in sam3.pt's format, from a seeded tiny model."""
    torch.manual_seed(7)
    model = build_model(load_preset("tiny"), VOCAB, training=False)
    path = tmp_path_factory.mktemp("weights") / "sam3.pt"
    state = {f"detector.{k}": v for k, v in model.state_dict().items()} | TRACKER_KEYS
    torch.save({"model": state}, path)
    return path, model.state_dict()


def test_initializer_loads_every_key(tiny_sam3_pt):
    path, expected = tiny_sam3_pt
    torch.manual_seed(99)
    fresh = build_model(load_preset("tiny"), VOCAB, training=True)
    initialise = make_initializer(str(path), 0.95)
    assert initialise is not None and make_initializer(None, 0.95) is None
    loaded = initialise(model=fresh).state_dict()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def run_fetch(tmp_path, shipped_params, weights: str) -> dict:
    shipped_params["fetch"]["weights"] = weights
    shipped_params["paths"]["base"] = str(tmp_path / "base")
    path = write_params(tmp_path / "params.yaml", shipped_params)
    fetch.run(params.load(fetch.SECTIONS, path))
    return json.loads((tmp_path / "base" / "manifest.json").read_text())


def test_fetch_from_a_local_path(tmp_path, shipped_params, tiny_sam3_pt):
    path, _ = tiny_sam3_pt
    manifest = run_fetch(tmp_path, shipped_params, str(path))
    weights = manifest["weights"]
    assert weights["source"] == "path" and weights["file"] == "weights/sam3.pt"
    assert weights["bytes"] == path.stat().st_size
    assert weights["verification"]["loaded_fraction"] == 1.0
    assert weights["verification"]["ignored_keys"] == len(TRACKER_KEYS)
    assert (tmp_path / "base" / "weights" / "sam3.pt").read_bytes() == path.read_bytes()


def test_fetch_refuses_wrong_weights_and_leaves_nothing(tmp_path, shipped_params):
    other = tmp_path / "other.pt"
    torch.save({"model": {"backbone.x": torch.zeros(3)}}, other)
    with pytest.raises(WeightsError, match=r"only 0\.0% of the model"):
        run_fetch(tmp_path, shipped_params, str(other))
    assert not (tmp_path / "base").exists()
    assert not list(tmp_path.glob(".base.tmp-*"))


def test_fetch_from_the_hub_cache_offline(tmp_path, shipped_params, tiny_sam3_pt, monkeypatch):
    """huggingface_hub's own resolution, against a hub cache laid out as a download leaves it."""
    path, _ = tiny_sam3_pt
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--facebook--sam3"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "sam3.pt").write_bytes(path.read_bytes())
    from huggingface_hub import constants

    # what HF_HUB_CACHE and HF_HUB_OFFLINE=1 set; huggingface_hub reads them at import time
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    manifest = run_fetch(tmp_path, shipped_params, "hf://facebook/sam3")
    assert manifest["weights"]["revision"] == commit
    assert manifest["weights"]["location"] == "facebook/sam3"
    assert manifest["weights"]["verification"]["loaded_fraction"] == 1.0
    with pytest.raises(Sam3ftError, match="not in the local cache"):
        run_fetch(tmp_path, shipped_params, "hf://facebook/sam3/other.pt")


def test_fetch_from_s3(tmp_path, shipped_params, tiny_sam3_pt, monkeypatch):
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    path, _ = tiny_sam3_pt
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for key, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
        }.items():
            monkeypatch.setenv(key, value)
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="team-models")
        s3.upload_file(str(path), "team-models", "sam3/base.pt")
        manifest = run_fetch(tmp_path, shipped_params, "s3://team-models/sam3/base.pt")
        assert manifest["weights"]["sha256"] == fetch.sha256_file(path)
        assert "testing-secret" not in json.dumps(manifest)
        with pytest.raises(Sam3ftError, match="no such object"):
            run_fetch(tmp_path, shipped_params, "s3://team-models/sam3/missing.pt")
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("gs://b/k.pt", "unknown scheme"),
        ("hf://facebook", "not a hub address"),
        ("s3://bucket", "names no object"),
        ("/nonexistent/sam3.pt", "no such file"),
    ],
)
def test_bad_sources_fail_before_downloading(value, message):
    with pytest.raises(ConfigError, match=message):
        parse_source(value)


def test_parse_hub_address_with_file_and_revision():
    src = parse_source("hf://facebook/sam3/sam3.pt@v1.0")
    assert (src.kind, src.location, src.filename, src.revision) == ("hf", "facebook/sam3", "sam3.pt", "v1.0")


def test_weights_only_reader_refuses_pickled_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (exec, ("import os; os.environ['PWNED'] = '1'",))

    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "x": Payload()}, path)
    with pytest.raises(WeightsError, match="weights-only"):
        read_weights_file(path)
    import os

    assert "PWNED" not in os.environ


def test_image_model_state_strips_detector_prefix():
    state, fmt, ignored = image_model_state({"detector.a": torch.zeros(1)} | TRACKER_KEYS)
    assert (list(state), fmt, ignored) == (["a"], "sam3.pt", 2)
    assert yaml.safe_load((REPO / "params.yaml").read_text())["fetch"]["weights"] == "none"
