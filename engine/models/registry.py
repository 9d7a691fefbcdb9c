"""The registry of foundation-model backbones: one small config per published model.

Facts from the models' own configs (see the project docs on foundation models). The loader
uses ``bands``/``mean``/``std`` to adapt the first layer when the user's bands differ.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from engine.protocol import EngineError

HLS_BANDS = ("BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2")
# Centre wavelengths (µm) of the bands users' rasters carry, by canonical name (Sentinel-2 MSI
# values; Landsat/HLS bands of the same name lie within a few nm). Used to match bands by
# wavelength and to feed wavelength-conditioned models (Clay).
WAVELENGTHS = {
    "COASTAL": 0.443, "BLUE": 0.493, "GREEN": 0.56, "RED": 0.665, "REDEDGE_1": 0.704, "REDEDGE_2": 0.74,
    "REDEDGE_3": 0.783, "NIR_BROAD": 0.842, "NIR_NARROW": 0.865, "WATER_VAPOUR": 0.945, "CIRRUS": 1.375,
    "SWIR_1": 1.61, "SWIR_2": 2.19,
}
PRITHVI_V1_MEAN = (775.2290211032589, 1080.992780391705, 1228.5855250417867, 2497.2022620507532,
                   2204.2139147975554, 1610.8324823273745)
PRITHVI_V1_STD = (1281.526139861424, 1270.0297974547493, 1399.4802505642526, 1368.3446143747644,
                  1291.6764008585435, 1154.505683480695)
PRITHVI_V2_MEAN = (1087.0, 1342.0, 1433.0, 2734.0, 1958.0, 1363.0)
PRITHVI_V2_STD = (2248.0, 2179.0, 2178.0, 1850.0, 1242.0, 1049.0)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    family: str  # which module builds it
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    feature_layers: tuple[int, ...]  # blocks whose outputs feed the decoder
    bands: tuple[str, ...] = HLS_BANDS
    mean: tuple[float, ...] = PRITHVI_V2_MEAN
    std: tuple[float, ...] = PRITHVI_V2_STD
    hub_repo: str | None = None
    hub_file: str | None = None
    licence: str = "Apache-2.0"
    tl: bool = False  # temporal and location encoders (the -TL checkpoints)
    frames: int = 1  # frames in pretraining (any number works: positions are recomputed)
    weights_licence: str = "Apache-2.0"
    options: tuple = ()  # family-specific settings as (key, value) pairs (e.g. a timm model name)

    def option(self, key: str, default=None):
        return dict(self.options).get(key, default)


BACKBONES: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    BACKBONES[spec.name] = spec
    return spec


register(BackboneSpec("prithvi_eo_v2_tiny", "prithvi", 192, 12, 3, 16, (2, 5, 8, 11),
                      hub_repo="ibm-nasa-geospatial/Prithvi-EO-2.0-tiny-TL",
                      hub_file="Prithvi_EO_V2_tiny_TL.pt", tl=True))
register(BackboneSpec("prithvi_eo_v2_100", "prithvi", 768, 12, 12, 16, (2, 5, 8, 11),
                      hub_repo="ibm-nasa-geospatial/Prithvi-EO-2.0-100M-TL",
                      hub_file="Prithvi_EO_V2_100M_TL.pt", tl=True, frames=4))
register(BackboneSpec("prithvi_eo_v2_300", "prithvi", 1024, 24, 16, 16, (5, 11, 17, 23),
                      hub_repo="ibm-nasa-geospatial/Prithvi-EO-2.0-300M",
                      hub_file="Prithvi_EO_V2_300M.pt", frames=4))
register(BackboneSpec("prithvi_eo_v2_300_tl", "prithvi", 1024, 24, 16, 16, (5, 11, 17, 23),
                      hub_repo="ibm-nasa-geospatial/Prithvi-EO-2.0-300M-TL",
                      hub_file="Prithvi_EO_V2_300M_TL.pt", tl=True, frames=4))
register(BackboneSpec("prithvi_eo_v2_600", "prithvi", 1280, 32, 16, 14, (7, 15, 23, 31),
                      hub_repo="ibm-nasa-geospatial/Prithvi-EO-2.0-600M",
                      hub_file="Prithvi_EO_V2_600M.pt", frames=4))
register(BackboneSpec("prithvi_eo_v2_600_tl", "prithvi", 1280, 32, 16, 14, (7, 15, 23, 31),
                      hub_repo="ibm-nasa-geospatial/Prithvi-EO-2.0-600M-TL",
                      hub_file="Prithvi_EO_V2_600M_TL.pt", tl=True, frames=4))
register(BackboneSpec("prithvi_eo_v1_100", "prithvi", 768, 12, 12, 16, (2, 5, 8, 11),
                      mean=PRITHVI_V1_MEAN, std=PRITHVI_V1_STD,
                      hub_repo="ibm-nasa-geospatial/Prithvi-EO-1.0-100M",
                      hub_file="Prithvi_EO_V1_100M.pt", frames=3))

# Clay (Clay foundation; github.com/Clay-foundation/model): wavelength-conditioned patch embedding
# (any bands with a known centre wavelength), patch 8, positions scaled by the GSD (option "gsd":
# Sentinel-2's 10 m, as in pretraining). Published as Lightning checkpoints (encoder under
# `model.encoder.`, plus MAE decoder and teacher, dropped on load): pickles with training
# state, so loading one may need --trust-checkpoint. Pretraining statistics of Sentinel-2 L2A
# (raw digital numbers) from the authors' configs/metadata.yaml. Weights Apache-2.0 since
# 2025-05 (OpenRAIL-M before).
CLAY_S2_BANDS = ("BLUE", "GREEN", "RED", "REDEDGE_1", "REDEDGE_2", "REDEDGE_3", "NIR_BROAD", "NIR_NARROW",
                 "SWIR_1", "SWIR_2")
CLAY_S2_MEAN = (1105.0, 1355.0, 1552.0, 1887.0, 2422.0, 2630.0, 2743.0, 2785.0, 2388.0, 1835.0)
CLAY_S2_STD = (1809.0, 1757.0, 1888.0, 1870.0, 1732.0, 1697.0, 1742.0, 1648.0, 1470.0, 1379.0)
register(BackboneSpec("clay_v1", "clay", 768, 12, 12, 8, (2, 5, 8, 11),
                      bands=CLAY_S2_BANDS, mean=CLAY_S2_MEAN, std=CLAY_S2_STD,
                      hub_repo="made-with-clay/Clay", hub_file="v1/clay-v1-base.ckpt", weights_licence="Apache-2.0", options=(("gsd", 10.0),)))
register(BackboneSpec("clay_v1_5", "clay", 1024, 24, 16, 8, (5, 11, 17, 23),
                      bands=CLAY_S2_BANDS, mean=CLAY_S2_MEAN, std=CLAY_S2_STD,
                      hub_repo="made-with-clay/Clay", hub_file="v1.5/clay-v1.5.ckpt", weights_licence="Apache-2.0", options=(("gsd", 10.0),)))


# SSL4EO-S12 / DeCUR ResNet-50 (Wang et al., DeCUR, ECCV 2024; github.com/zhu-xlab/DeCUR): the
# torchvision/timm resnet50 layout with a 13-band Sentinel-2 L1C or a 2-band Sentinel-1 stem; the
# backbone-only files are plain state dicts without ``fc`` (the joint SAR-MS file holds both under
# ``module.backbone_1.`` / ``module.backbone_2.``; engine.models.resnet picks the one that fits).
# Features: layer1…layer4 (strides 4, 8, 16, 32); ``depth`` counts timm's feature levels (0 the
# stem, 1-4 the stages) so ``feature_layers`` are the last four; ``patch_size`` is the chip multiple.
# mean/std: the pretraining band statistics (the SSL4EO-S12 50k subset), kept for reference: the
# pretraining scaled each band with them to [0, 1] ((x - (mean - 2 std)) / (4 std), clipped), TorchGeo
# divides S2 by 10000 instead, and GeoPEFT standardises every input band with statistics of the
# user's own training data (engine.data.chips.band_statistics), as for every backbone.
# Licence: the DeCUR code repository is MIT; TorchGeo's weight tables list these weights as Apache-2.0.
S2_L1C_BANDS = ("COASTAL", "BLUE", "GREEN", "RED", "REDEDGE_1", "REDEDGE_2", "REDEDGE_3", "NIR_BROAD",
                "NIR_NARROW", "WATER_VAPOUR", "CIRRUS", "SWIR_1", "SWIR_2")  # B1 … B8, B8A, B9, B10, B11, B12
SSL4EO_S2_MEAN = (1605.575, 1390.782, 1314.873, 1363.524, 1549.444, 2091.749, 2371.717, 2299.905, 2560.295,
                  830.066, 22.104, 2177.072, 1524.065)
SSL4EO_S2_STD = (786.787, 850.348, 875.065, 1138.850, 1122.178, 1161.592, 1274.392, 1248.429, 1345.527,
                 577.316, 51.154, 1336.099, 1136.538)
S1_BANDS = ("VV", "VH")
SSL4EO_S1_MEAN = (-12.548, -20.192)  # dB
SSL4EO_S1_STD = (5.257, 5.912)
register(BackboneSpec("decur_rn50_s2", "resnet", 2048, 5, 1, 32, (1, 2, 3, 4),
                      bands=S2_L1C_BANDS, mean=SSL4EO_S2_MEAN, std=SSL4EO_S2_STD,
                      hub_repo="wangyi111/DeCUR", hub_file="rn50_ssl4eo-s12_ms_decur_ep100.pth",
                      weights_licence="Apache-2.0", options=(("model", "resnet50"),)))
register(BackboneSpec("decur_rn50_s1", "resnet", 2048, 5, 1, 32, (1, 2, 3, 4),
                      bands=S1_BANDS, mean=SSL4EO_S1_MEAN, std=SSL4EO_S1_STD,
                      hub_repo="wangyi111/DeCUR", hub_file="rn50_ssl4eo-s12_sar_decur_ep100.pth",
                      weights_licence="Apache-2.0", options=(("model", "resnet50"),)))


def get_backbone_spec(name: str) -> BackboneSpec:
    """A registered backbone, or any timm model as ``timm:NAME``."""
    if name.startswith("timm:"):
        from engine.models.timm_backbones import timm_spec
        return timm_spec(name)
    try:
        return BACKBONES[name]
    except KeyError:
        raise EngineError(f"unknown backbone {name!r}",
                          hint=f"choose one of: {', '.join(sorted(BACKBONES))}, or timm:NAME for a timm "
                               "model") from None


def is_backbone(name: str) -> bool:
    return name in BACKBONES or name.startswith("timm:")


# Band names users' rasters carry (descriptions), mapped to the models' band names.
BAND_ALIASES = {
    "B2": "BLUE", "B02": "BLUE", "BLUE": "BLUE",
    "B3": "GREEN", "B03": "GREEN", "GREEN": "GREEN",
    "B4": "RED", "B04": "RED", "RED": "RED",
    "B8A": "NIR_NARROW", "B08A": "NIR_NARROW", "NIR_NARROW": "NIR_NARROW", "NIR08": "NIR_NARROW",
    "NARROW NIR": "NIR_NARROW", "NIR": "NIR_NARROW",
    "B1": "COASTAL", "B01": "COASTAL", "COASTAL": "COASTAL", "AEROSOL": "COASTAL",
    "B5": "REDEDGE_1", "B05": "REDEDGE_1", "REDEDGE1": "REDEDGE_1", "RED_EDGE_1": "REDEDGE_1",
    "B6": "REDEDGE_2", "B06": "REDEDGE_2", "REDEDGE2": "REDEDGE_2", "RED_EDGE_2": "REDEDGE_2",
    "B7": "REDEDGE_3", "B07": "REDEDGE_3", "REDEDGE3": "REDEDGE_3", "RED_EDGE_3": "REDEDGE_3",
    "B8": "NIR_BROAD", "B08": "NIR_BROAD", "NIR_BROAD": "NIR_BROAD",
    "B9": "WATER_VAPOUR", "B09": "WATER_VAPOUR", "WATER_VAPOUR": "WATER_VAPOUR",
    "B10": "CIRRUS", "CIRRUS": "CIRRUS",
    "B11": "SWIR_1", "SWIR_1": "SWIR_1", "SWIR1": "SWIR_1", "SWIR16": "SWIR_1",
    "B12": "SWIR_2", "SWIR_2": "SWIR_2", "SWIR2": "SWIR_2", "SWIR22": "SWIR_2",
    "VV": "VV", "VH": "VH",  # Sentinel-1 polarisations (no wavelength: matched by name only)
}


def canonical_band(name: str) -> str:
    key = name.strip().upper().replace("-", "_")
    return BAND_ALIASES.get(key, key)


def band_wavelength(name: str) -> float | None:
    """The centre wavelength (µm) of a band: by its name (``B04``, ``red``), or given in the
    name itself as ``665nm``, ``0.665um`` or ``0.665µm``; None when unknown."""
    if not name:
        return None
    text = name.strip().lower().replace(" ", "")
    m = re.fullmatch(r"(?:.*[^\d.])?(\d+(?:\.\d+)?)(nm|um|µm|μm)", text)
    if m:
        value = float(m.group(1))
        return value / 1000 if m.group(2) == "nm" else value
    return WAVELENGTHS.get(canonical_band(name))
