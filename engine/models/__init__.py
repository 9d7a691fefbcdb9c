"""Backbones, necks, decoders and checkpoint loading."""
from engine.models.compat import ensure_torchvision_importable

ensure_torchvision_importable()


def create_backbone(name: str, weights=None, bands=None, num_frames: int = 1, img_size: int = 224,
                    trust_checkpoint: bool = False):
    """A foundation-model encoder by registry name, timm-like (``python -m engine models`` lists
    the names).

    ``weights``: None (random), a local checkpoint in its published layout (``.pt``/``.pth`` read
    with ``weights_only=True``, or ``.safetensors``; ``trust_checkpoint`` to unpickle more),
    ``"hf://OWNER/REPO/FILE"`` or ``"hub"``. ``bands``: the input's band names in order (default: the pretraining bands);
    pretrained input channels are matched to them by name, the others start fresh.
    ``num_frames``/``img_size``: the size the positions are precomputed for (any other input size
    or number of frames works; positions are then recomputed).

    The module's ``forward_features(x, temporal_coords=None, location_coords=None)`` returns every
    block's output tokens [B, 1 + T*h*w, D] (CLS first; the last after the final norm) for ``x``
    [B, C, T, H, W]; -TL models take ``temporal_coords`` [B, T, 2] (year, day of year) and
    ``location_coords`` [B, 2] (latitude, longitude)."""
    from engine.models.checkpoints import load_backbone_weights, resolve_weights
    from engine.models.families import build_encoder
    from engine.models.registry import get_backbone_spec
    from engine.protocol import Reporter

    spec = get_backbone_spec(name)
    bands = list(bands) if bands else list(spec.bands)
    # every frame carries the same bands (only Prithvi takes more than one)
    model = build_encoder(spec, bands * num_frames, img_size, num_frames, metadata=spec.tl)
    if weights is not None:
        reporter = Reporter("quiet")
        path = resolve_weights(spec, str(weights), reporter)
        load_backbone_weights(model, spec, path, bands, reporter, trust=trust_checkpoint)
    return model
