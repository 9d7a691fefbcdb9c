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
    params_m: float = 0.0  # encoder parameters (millions) with the pretraining bands, as listed
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
