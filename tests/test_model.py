"""Tiny SAM3 from sam3's classes: builds, predicts, and its weights load only when every key fits."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch
from PIL import Image

from sam3ft.errors import ConfigError, WeightsError
from sam3ft.model.build import build_model
from sam3ft.model.predict import Predictor
from sam3ft.model.spec import ModelSpec, load_preset
from sam3ft.model.weights import load_safetensors, load_trainer_checkpoint, save_safetensors, verify_and_load
from sam3ft.stages.fetch import bundled_vocab


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model(load_preset("tiny"), str(bundled_vocab()), training=False)


def test_tiny_model_size_and_finite_text_params(tiny):
    n = sum(p.numel() for p in tiny.parameters())
    assert 4_000_000 < n < 5_000_000  # ~3.2 M of it the 49408-token embedding
    text = tiny.backbone.language_backbone.encoder
    # sam3 leaves these as torch.empty; uninitialised memory would give NaN downstream
    assert torch.isfinite(text.positional_embedding).all() and text.positional_embedding.std() > 0
    assert torch.isfinite(text.text_projection).all()


def test_same_seed_same_weights():
    specs = load_preset("tiny"), str(bundled_vocab())
    torch.manual_seed(3)
    a = build_model(*specs).state_dict()
    torch.manual_seed(3)
    b = build_model(*specs).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_predict_returns_boxes_in_original_pixels(tiny):
    image = Image.new("RGB", (320, 200), (120, 80, 40))
    dets = Predictor(tiny, 224).predict(image, {1: "fuse neutrals", 2: "screw"}, max_dets=5)
    assert len(dets) == 10
    assert {d.category_id for d in dets} == {1, 2}
    for d in dets:
        x0, y0, x1, y1 = d.box_xyxy
        assert -1 <= x0 <= x1 <= 321 and -1 <= y0 <= y1 <= 201
        assert 0.0 <= d.score <= 1.0
    scores = [d.score for d in dets if d.category_id == 1]
    assert scores == sorted(scores, reverse=True)


def test_spec_rejects_bad_values():
    data = load_preset("tiny").to_dict()
    with pytest.raises(ConfigError, match="not a multiple of 14"):
        ModelSpec.from_dict({**data, "image_size": 225})
    with pytest.raises(ConfigError, match="unknown model key"):
        ModelSpec.from_dict({**data, "depth": 3})
    with pytest.raises(ConfigError, match=r"outside 0\.\.1"):
        ModelSpec.from_dict({**data, "vit_global_blocks": [5]})


def test_verify_and_load_reports_prefix_mismatch(tiny):
    state = {f"detector.{k}": v for k, v in tiny.state_dict().items()}
    with pytest.raises(WeightsError, match=r"'detector\.' prefix of sam3\.pt") as err:
        verify_and_load(tiny, state, "sam3.pt")
    assert "missing" in str(err.value) and "backbone.vision_backbone" in str(err.value)


def test_verify_and_load_reports_missing_and_shape(tiny):
    state = dict(tiny.state_dict())
    state.pop("dot_prod_scoring.hs_proj.weight")
    with pytest.raises(WeightsError, match=r"1 missing \[dot_prod_scoring.hs_proj \(1\)\]"):
        verify_and_load(tiny, state, "x.pt")
    state = dict(tiny.state_dict())
    other = dataclasses.replace(load_preset("tiny"), num_queries=7)
    state["transformer.decoder.query_embed.weight"] = build_model(
        other, str(bundled_vocab()), training=False
    ).state_dict()["transformer.decoder.query_embed.weight"]
    with pytest.raises(WeightsError, match="wrong shape"):
        verify_and_load(tiny, state, "x.pt")


def test_safetensors_roundtrip_is_exact(tmp_path, tiny):
    path = tmp_path / "m.safetensors"
    save_safetensors(tiny.state_dict(), path, {"k": "v"})
    loaded = load_safetensors(path)
    assert set(loaded) == set(tiny.state_dict())
    assert all(torch.equal(loaded[k], v) for k, v in tiny.state_dict().items())


class _RunsCode:
    def __reduce__(self):
        return (print, ("pwned",))


def test_checkpoint_with_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _RunsCode()}, path, pickle_protocol=2)
    with pytest.raises(WeightsError, match="weights-only"):
        load_trainer_checkpoint(path)
    assert "pwned" not in capsys.readouterr().out
    truncated = tmp_path / "cut.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(WeightsError):
        load_trainer_checkpoint(truncated)
    assert pickle  # the payload class above pickles with the stdlib protocol


def test_decoder_gets_the_feature_size_as_ints_and_the_same_boxes(tiny):
    """Our decoder reads (H, W) from the encoder's host-side shapes instead of the `spatial_shapes`
    device tensor (no host waits), and detects exactly what upstream's path does."""
    from sam3.model.sam3_image import Sam3Image

    image = Image.new("RGB", (320, 200), (120, 80, 40))
    decoder = tiny.transformer.decoder
    seen: list[tuple] = []
    original = type(decoder)._get_rpb_matrix

    def spy(self, reference_boxes, feat_size):
        seen.append(tuple(type(v) for v in (self.feat_hw or feat_size)))
        return original(self, reference_boxes, feat_size)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(decoder), "_get_rpb_matrix", spy)
        ours = Predictor(tiny, 224).outputs(image, "fuse neutrals")
        assert seen and set(seen) == {(int, int)} and decoder.feat_hw is None  # reset after the forward
        seen.clear()
        mp.setattr(tiny, "_run_decoder", lambda **kw: Sam3Image._run_decoder(tiny, **kw))  # upstream's
        upstream = Predictor(tiny, 224).outputs(image, "fuse neutrals")
        assert seen and set(seen) == {(torch.Tensor, torch.Tensor)}
    assert torch.equal(ours["boxes"], upstream["boxes"]) and torch.equal(ours["scores"], upstream["scores"])


def test_token_ids_wait_on_the_text_encoders_device_once_per_caption_list():
    """The text encoder's ids come from a cache on its own device, so `.to(device)` in sam3's forward
    (text_encoder_ve.py:297) copies nothing and waits for no queued kernel; same ids as sam3's tokenizer."""
    from sam3.model.tokenizer_ve import SimpleTokenizer

    model = build_model(load_preset("tiny"), str(bundled_vocab()), training=False)
    text = model.backbone.language_backbone
    tokenizer = text.tokenizer
    captions = ["fuse neutrals", "a breaker"]
    ids = tokenizer(captions, context_length=text.context_length)
    reference = SimpleTokenizer(bpe_path=str(bundled_vocab()))
    upstream = reference(captions, context_length=text.context_length)
    assert ids.dtype == torch.long and torch.equal(ids, upstream)
    assert tokenizer(list(captions), context_length=text.context_length) is ids  # cached per caption list
    assert not torch.equal(tokenizer(["a breaker"], context_length=text.context_length), ids[:1])
    model.to("meta")  # ids follow the encoder to wherever its weights are
    assert tokenizer(captions, context_length=text.context_length).device.type == "meta"
    if torch.cuda.is_available():
        model.to_empty(device="cuda")
        torch.cuda.set_sync_debug_mode("error")  # any host wait raises
        try:
            for _ in range(2):  # a new caption list (pinned copy), then the cached one
                assert tokenizer(captions, context_length=text.context_length).is_cuda
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.equal(tokenizer(captions, context_length=text.context_length).cpu(), upstream)
        # a compiled forward calls the tokenizer as it is: traced, its pinned copy failed in dynamo
        # ("NYI: aten._pin_memory.default" on a GPU)
        fresh = ["a fuse box"]
        traced = torch.compile(lambda: tokenizer(fresh, context_length=text.context_length), backend="eager")
        assert torch.equal(traced().cpu(), reference(fresh, context_length=text.context_length))


def test_compiled_encoder_and_decoder_layers_detect_the_same(tiny):
    """`compile_layers` (train/model.compile_parts) compiles each DETR encoder and decoder layer; in
    eval mode (validation) the detections equal eager's up to float reassociation. Training with
    it is trained in tests/test_recipes.py."""
    import copy

    from sam3ft.train.model import compile_parts

    compiled = copy.deepcopy(tiny)
    compile_parts(compiled, trunk=False, layers=True)
    layers = [*compiled.transformer.encoder.layers, *compiled.transformer.decoder.layers]
    assert len(layers) == 3 and all(  # tiny: 1 encoder and 2 decoder layers
        hasattr(layer.forward, "_torchdynamo_orig_callable") for layer in layers
    )
    image = Image.new("RGB", (320, 200), (120, 80, 40))
    eager = Predictor(tiny, 224).outputs(image, "fuse neutrals")
    ours = Predictor(compiled, 224).outputs(image, "fuse neutrals")
    torch.testing.assert_close(ours["boxes"], eager["boxes"], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(ours["scores"], eager["scores"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("keep", [False, True])
def test_act_ckpt_switches_reach_the_modules_sam3_reads_them_from(keep):
    """`act_ckpt_text` / `act_ckpt_geometry` false: the text transformer's `grad_checkpointing` and
    the geometry encoder's `use_act_ckpt`, the flags sam3 checks before re-running those layers in
    the backward, are off; true (upstream): on."""
    from sam3ft.model.spec import presets_dir
    from sam3ft.train.model import build_trainable_model

    model = build_trainable_model(
        str(presets_dir() / "tiny.yaml"),
        str(bundled_vocab()),
        trainable=["geometry", "text", "heads"],
        act_ckpt_text=keep,
        act_ckpt_geometry=keep,
    )
    text = model.get_submodule("backbone.language_backbone.encoder.transformer")
    assert text.grad_checkpointing is keep
    assert model.get_submodule("geometry_encoder").use_act_ckpt is keep


@pytest.fixture
def checkpoint_calls(monkeypatch) -> list[int]:
    """One entry per torch.utils.checkpoint.checkpoint call from here on: sam3's ViT
    (sam3/model/vitdet.py) and its activation_ckpt_wrapper (act_ckpt_utils.py) both call it through
    that module."""
    import torch.utils.checkpoint

    calls: list[int] = []
    real = torch.utils.checkpoint.checkpoint

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted)
    return calls


def test_unchecked_detr_layers_skip_the_recompute_and_keep_the_gradients(monkeypatch, checkpoint_calls):
    """`act_ckpt_detr: false`: every DETR encoder and decoder layer and the decoder's box-bias MLPs
    are marked, and sam3's activation_ckpt_wrapper, looked up where the encoder and decoder call it,
    runs a marked module without torch.utils.checkpoint while an unmarked one (another model in the
    process) is still checkpointed; output and gradients are those of the checkpointed module."""
    import sam3.model.decoder as decoder_code
    import sam3.model.encoder as encoder_code

    from sam3ft.model.spec import presets_dir
    from sam3ft.train.model import KEEP_ACTIVATIONS, build_trainable_model

    # the build rebinds both names (keep_activations); set through monkeypatch, sam3's own come back
    monkeypatch.setattr(encoder_code, "activation_ckpt_wrapper", encoder_code.activation_ckpt_wrapper)
    monkeypatch.setattr(decoder_code, "activation_ckpt_wrapper", decoder_code.activation_ckpt_wrapper)
    models = {}
    for keep in (True, False):
        models[keep] = build_trainable_model(
            str(presets_dir() / "tiny.yaml"), str(bundled_vocab()), trainable=["decoder"], act_ckpt_detr=keep
        )
    unchecked = models[False]
    encoder, decoder = unchecked.transformer.encoder, unchecked.transformer.decoder
    marked = [*encoder.layers, *decoder.layers, decoder.boxRPB_embed_x, decoder.boxRPB_embed_y]
    assert all(getattr(m, KEEP_ACTIVATIONS, False) for m in marked) and len(marked) > 2
    assert not any(hasattr(m, KEEP_ACTIVATIONS) for m in models[True].modules())
    for code in (encoder_code, decoder_code):
        assert getattr(code.activation_ckpt_wrapper, KEEP_ACTIVATIONS)

    x = torch.rand(2, 5, 2, generator=torch.Generator().manual_seed(1))
    results = {}
    for keep, model in models.items():
        mlp = model.transformer.decoder.boxRPB_embed_x
        checkpoint_calls.clear()
        out = decoder_code.activation_ckpt_wrapper(mlp)(x=x, act_ckpt_enable=True)  # as sam3 calls it
        out.square().sum().backward()
        results[keep] = (len(checkpoint_calls), out.detach(), [p.grad.clone() for p in mlp.parameters()])
    assert (results[True][0], results[False][0]) == (1, 0)
    assert torch.equal(results[True][1], results[False][1])
    for checked, kept in zip(results[True][2], results[False][2], strict=True):
        assert torch.equal(checked, kept)


def test_unchecked_trunk_skips_the_recompute_and_keeps_the_gradients(checkpoint_calls):
    """`act_ckpt_trunk: false`: sam3's ViT runs its blocks without torch.utils.checkpoint while
    training (no block's forward re-runs in the backward), and the trunk's output and gradients are
    those of the checkpointed trunk, bit for bit (checkpoint replays the same operations and restores
    the RNG for drop-path)."""
    from sam3ft.model.spec import presets_dir
    from sam3ft.train.model import build_trainable_model

    image = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    results = {}
    for keep in (True, False):
        model = build_trainable_model(
            str(presets_dir() / "tiny.yaml"),
            str(bundled_vocab()),
            trainable=["trunk", "heads"],
            act_ckpt_trunk=keep,
            init_seed=0,
        )
        vit = model.get_submodule("backbone.vision_backbone.trunk")
        assert vit.use_act_checkpoint is keep
        vit.train()
        checkpoint_calls.clear()
        torch.manual_seed(2)
        features = vit(image)
        sum(f.float().square().mean() for f in features).backward()
        grads = {name: p.grad.clone() for name, p in vit.named_parameters() if p.grad is not None}
        results[keep] = (len(checkpoint_calls), [f.detach() for f in features], grads)
    blocks = len(vit.blocks)
    assert (results[True][0], results[False][0]) == (blocks, 0)
    for checked, unchecked in zip(results[True][1], results[False][1], strict=True):
        assert torch.equal(checked, unchecked)
    assert results[True][2].keys() == results[False][2].keys() and results[True][2]
    for name, grad in results[True][2].items():
        assert torch.equal(grad, results[False][2][name]), name
