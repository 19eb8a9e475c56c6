"""Compose a SAM3 image model from sam3's own classes, sized by a ModelSpec.

Mirrors `sam3.model_builder.build_sam3_image_model` module for module (the `sam3` preset yields the
same state_dict keys and shapes), but avoids its hard-coded CUDA allocations so it builds on CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from sam3.model.decoder import TransformerDecoder, TransformerDecoderLayer
from sam3.model.encoder import TransformerEncoderFusion, TransformerEncoderLayer
from sam3.model.geometry_encoders import SequenceGeometryEncoder
from sam3.model.maskformer_segmentation import PixelDecoder, UniversalSegmentationHead
from sam3.model.model_misc import MLP, DotProductScoring, TransformerWrapper
from sam3.model.model_misc import MultiheadAttentionWrapper as MultiheadAttention
from sam3.model.necks import Sam3DualViTDetNeck
from sam3.model.position_encoding import PositionEmbeddingSine
from sam3.model.sam3_image import Sam3Image
from sam3.model.text_encoder_ve import VETextEncoder
from sam3.model.tokenizer_ve import SimpleTokenizer
from sam3.model.vitdet import ViT
from sam3.model.vl_combiner import SAM3VLBackbone
from torch import nn

from sam3ft import compat
from sam3ft.errors import ConfigError
from sam3ft.layout import VOCAB_NAME
from sam3ft.model.spec import PATCH_SIZE, ModelSpec


def _attention(spec: ModelSpec, dropout: float = 0.1, batch_first: bool | None = None) -> nn.Module:
    kwargs = {} if batch_first is None else {"batch_first": batch_first}
    return MultiheadAttention(num_heads=spec.heads, dropout=dropout, embed_dim=spec.d_model, **kwargs)


def _position_encoding(spec: ModelSpec) -> PositionEmbeddingSine:
    # precompute_resolution=None: sam3/model/position_encoding.py:47 precomputes on "cuda".
    return PositionEmbeddingSine(
        num_pos_feats=spec.d_model,
        normalize=True,
        scale=None,
        temperature=10000,
        precompute_resolution=None,
    )


def _vision(spec: ModelSpec) -> Sam3DualViTDetNeck:
    trunk = ViT(
        img_size=spec.image_size,
        pretrain_img_size=spec.vit_pretrain_size,
        patch_size=PATCH_SIZE,
        embed_dim=spec.vit_dim,
        depth=spec.vit_depth,
        num_heads=spec.vit_heads,
        mlp_ratio=spec.vit_mlp_ratio,
        norm_layer="LayerNorm",
        drop_path_rate=spec.vit_drop_path,
        qkv_bias=True,
        use_abs_pos=True,
        tile_abs_pos=True,
        global_att_blocks=spec.vit_global_blocks,
        rel_pos_blocks=(),
        use_rope=True,
        use_interp_rope=True,
        window_size=spec.vit_window_size,
        pretrain_use_cls_token=True,
        retain_cls_token=False,
        ln_pre=True,
        ln_post=False,
        return_interm_layers=False,
        bias_patch_embed=False,
        compile_mode=None,
    )
    return Sam3DualViTDetNeck(
        position_encoding=_position_encoding(spec),
        d_model=spec.d_model,
        scale_factors=[4.0, 2.0, 1.0, 0.5],
        trunk=trunk,
        add_sam2_neck=False,
    )


class DeviceTokenizer(SimpleTokenizer):  # type: ignore[misc]  # sam3 ships no type information
    """sam3's tokenizer whose token ids already lie on the text encoder's device, kept per caption list.

    VETextEncoder.forward moves the ids with a plain `.to(device)` (sam3/model/text_encoder_ve.py:297).
    From pageable memory that copy waits for every kernel queued before it: in training, the whole
    image trunk's forward, and the GPU then idles while the host queues the text encoder. A cached
    id tensor is already there (`.to` returns it); a new one goes through pinned memory, without a wait.
    """

    MAX_CACHED = 256  # caption lists; a dataset's batches repeat few of them

    def __init__(self, bpe_path: str) -> None:
        super().__init__(bpe_path=bpe_path)
        self.embedding: nn.Embedding | None = None  # the text encoder's token embedding: ids go to its device
        self._ids: dict[tuple[tuple[str, ...], int | None, torch.device], torch.Tensor] = {}

    @torch.compiler.disable  # a host-side cache: a compiled forward calls it as it is
    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        device = torch.device("cpu") if self.embedding is None else self.embedding.weight.device
        key = ((texts,) if isinstance(texts, str) else tuple(texts), context_length, device)
        ids = self._ids.get(key)
        if ids is None:
            ids = super().__call__(texts, context_length)  # (captions, context_length) int64, CPU
            pinned = ids.pin_memory() if device.type == "cuda" else ids
            ids = pinned.to(device, non_blocking=True)  # from pinned memory: no host wait
            if len(self._ids) >= self.MAX_CACHED:
                self._ids.clear()
            self._ids[key] = ids
        return ids


def _text(spec: ModelSpec, bpe_path: str) -> VETextEncoder:
    encoder = VETextEncoder(
        tokenizer=DeviceTokenizer(bpe_path),
        d_model=spec.d_model,
        width=spec.text_width,
        heads=spec.text_heads,
        layers=spec.text_layers,
    )
    # sam3/model/text_encoder_ve.py:196,218 leave these as torch.empty: random init would give NaN.
    # Same initialisation as open_clip's TextTransformer.init_parameters.
    transformer = encoder.encoder
    nn.init.normal_(transformer.positional_embedding, std=0.01)
    nn.init.normal_(transformer.text_projection, std=transformer.width**-0.5)
    encoder.tokenizer.embedding = transformer.token_embedding
    return encoder


def _encoder(spec: ModelSpec) -> TransformerEncoderFusion:
    layer = TransformerEncoderLayer(
        activation="relu",
        d_model=spec.d_model,
        dim_feedforward=spec.ffn_dim,
        dropout=0.1,
        pos_enc_at_attn=True,
        pos_enc_at_cross_attn_keys=False,
        pos_enc_at_cross_attn_queries=False,
        pre_norm=True,
        self_attention=_attention(spec, batch_first=True),
        cross_attention=_attention(spec, batch_first=True),
    )
    # use_act_checkpoint=True: sam3/model/encoder.py:440 asserts it whenever the model trains.
    return TransformerEncoderFusion(
        layer=layer,
        num_layers=spec.encoder_layers,
        d_model=spec.d_model,
        num_feature_levels=1,
        frozen=False,
        use_act_checkpoint=True,
        add_pooled_text_to_img_feat=False,
        pool_text_with_mask=True,
    )


class _Decoder(TransformerDecoder):  # type: ignore[misc]  # sam3 ships no type information
    """sam3's decoder, given the image feature map's (H, W) as Python ints while a forward runs.

    Upstream hands each layer's box-relative position bias (H, W) as elements of the `spatial_shapes`
    device tensor (sam3/model/decoder.py:522); its cache check and shape asserts then compare against
    device scalars, a host wait each: 42 per training step. Same values, same coordinates.
    """

    feat_hw: tuple[int, int] | None = None

    def _get_rpb_matrix(self, reference_boxes: torch.Tensor, feat_size: tuple[Any, Any]) -> torch.Tensor:
        return super()._get_rpb_matrix(reference_boxes, self.feat_hw or feat_size)


class _Sam3Image(Sam3Image):  # type: ignore[misc]
    """sam3's image model; its decoder learns the feature map size from the encoder's host-side shapes."""

    def _run_decoder(self, *args: Any, **kwargs: Any) -> Any:
        decoder = self.transformer.decoder  # a _Decoder: build_model composes the two together
        sizes = kwargs["encoder_out"].get("vis_feat_sizes") if "encoder_out" in kwargs else None
        if not sizes or len(sizes) != 1:  # several feature levels: upstream's path
            return super()._run_decoder(*args, **kwargs)
        ((height, width),) = sizes  # torch.Size of the single feature level, Python ints
        decoder.feat_hw = (int(height), int(width))
        try:
            return super()._run_decoder(*args, **kwargs)
        finally:
            decoder.feat_hw = None


def _decoder(spec: ModelSpec, coord_cache: bool) -> TransformerDecoder:
    layer = TransformerDecoderLayer(
        activation="relu",
        d_model=spec.d_model,
        dim_feedforward=spec.ffn_dim,
        dropout=0.1,
        cross_attention=_attention(spec),
        n_heads=spec.heads,
        use_text_cross_attention=True,
    )
    # resolution/stride only fill a coordinate cache, allocated on "cuda" (sam3/model/decoder.py:281);
    # they create no parameters. Without them the cache is made on the first forward, on the
    # model's device: same values, and a model built on a GPU machine still runs on its CPU.
    return _Decoder(
        layer=layer,
        num_layers=spec.decoder_layers,
        num_queries=spec.num_queries,
        return_intermediate=True,
        box_refine=True,
        num_o2m_queries=0,
        dac=True,
        boxRPB="log",
        d_model=spec.d_model,
        frozen=False,
        interaction_layer=None,
        dac_use_selfatt_ln=True,
        resolution=spec.image_size if coord_cache else None,
        stride=PATCH_SIZE if coord_cache else None,
        use_act_checkpoint=True,
        presence_token=True,
    )


def _scoring(spec: ModelSpec) -> DotProductScoring:
    prompt_mlp = MLP(
        input_dim=spec.d_model,
        hidden_dim=spec.ffn_dim,
        output_dim=spec.d_model,
        num_layers=2,
        dropout=0.1,
        residual=True,
        out_norm=nn.LayerNorm(spec.d_model),
    )
    return DotProductScoring(d_model=spec.d_model, d_proj=spec.d_model, prompt_mlp=prompt_mlp)


def _segmentation_head(spec: ModelSpec) -> UniversalSegmentationHead:
    pixel_decoder = PixelDecoder(
        num_upsampling_stages=3,
        interpolation_mode="nearest",
        hidden_dim=spec.d_model,
        compile_mode=None,
    )
    return UniversalSegmentationHead(
        hidden_dim=spec.d_model,
        upsampling_stages=3,
        aux_masks=False,
        presence_head=False,
        dot_product_scorer=None,
        act_ckpt=True,
        cross_attend_prompt=_attention(spec, dropout=0),
        pixel_decoder=pixel_decoder,
    )


def _geometry_encoder(spec: ModelSpec) -> SequenceGeometryEncoder:
    layer = TransformerEncoderLayer(
        activation="relu",
        d_model=spec.d_model,
        dim_feedforward=spec.ffn_dim,
        dropout=0.1,
        pos_enc_at_attn=False,
        pre_norm=True,
        self_attention=_attention(spec, batch_first=False),
        pos_enc_at_cross_attn_queries=False,
        pos_enc_at_cross_attn_keys=True,
        cross_attention=_attention(spec, batch_first=False),
    )
    return SequenceGeometryEncoder(
        pos_enc=_position_encoding(spec),
        encode_boxes_as_points=False,
        points_direct_project=True,
        points_pool=True,
        points_pos_enc=True,
        boxes_direct_project=True,
        boxes_pool=True,
        boxes_pos_enc=True,
        d_model=spec.d_model,
        num_layers=spec.geometry_layers,
        layer=layer,
        use_act_ckpt=True,
        add_cls=True,
        add_post_encode_proj=True,
    )


def build_model(
    spec: ModelSpec, bpe_path: str, training: bool = True, coord_cache: bool = False
) -> Sam3Image:
    """A randomly initialised SAM3 image model (seed torch first for a reproducible init).

    `training` adds the Hungarian matcher the training forward needs (as upstream's eval_mode=False).
    `coord_cache`: allocate the decoder's coordinate cache on CUDA now, as upstream does; by default
    the first forward makes it on the model's device (see `_decoder`).
    """
    compat.apply(training=training)
    backbone = SAM3VLBackbone(visual=_vision(spec), text=_text(spec, bpe_path), scalp=1)
    transformer = TransformerWrapper(
        encoder=_encoder(spec), decoder=_decoder(spec, coord_cache), d_model=spec.d_model
    )
    matcher = None
    if training:
        from sam3.train.matcher import BinaryHungarianMatcherV2

        matcher = BinaryHungarianMatcherV2(
            focal=True,
            cost_class=2.0,
            cost_bbox=5.0,
            cost_giou=2.0,
            alpha=0.25,
            gamma=2,
            stable=False,
        )
    model = _Sam3Image(
        backbone=backbone,
        transformer=transformer,
        input_geometry_encoder=_geometry_encoder(spec),
        segmentation_head=_segmentation_head(spec) if spec.segmentation else None,
        num_feature_levels=1,
        o2m_mask_predict=True,
        dot_prod_scoring=_scoring(spec),
        use_instance_query=False,
        multimask_output=True,
        inst_interactive_predictor=None,
        matcher=matcher,
    )
    if not training:
        model.eval()
    return model


def bundled_vocab() -> Path:
    """sam3 0.1.4 ships no BPE vocab; open_clip_torch ships the identical file."""
    import open_clip

    path = Path(open_clip.__file__).parent / VOCAB_NAME
    if not path.is_file():
        raise ConfigError(f"{path} missing from open_clip_torch", fix="pip install open_clip_torch")
    return path


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Build modules with parameters on the meta device: full-size key/shape layouts in no memory.

    Module code still runs on the CPU (sam3's ViT calls `.item()` while building, which the meta
    device cannot do); only each registered parameter is moved to meta as it is created.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            meta = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            module._parameters[name] = meta

    nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def allocate_parameters(model: nn.Module) -> None:
    """Real, uninitialised CPU storage for the meta parameters `empty_weights` left; a strict load
    then overwrites every one of them (buffers were built normally)."""
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and param.is_meta:
                storage = torch.empty(param.shape, dtype=param.dtype)
                module._parameters[name] = nn.Parameter(storage, requires_grad=param.requires_grad)


def build_to_load(spec: ModelSpec, bpe_path: str) -> Sam3Image:
    """The eval-mode model with uninitialised parameters, for a strict load of every weight: no
    random init to overwrite (the full model's init is most of its CPU build time)."""
    with empty_weights():
        model = build_model(spec, bpe_path, training=False, coord_cache=False)
    allocate_parameters(model)
    return model
