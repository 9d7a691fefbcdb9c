"""geopeft:embed in a real QGIS with the real engine: a false-colour embedding layer."""
from __future__ import annotations

import numpy as np
import pytest
from qgis.core import (
    QgsApplication,
    QgsMultiBandColorRenderer,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingOutputLayerDefinition,
    QgsProcessingUtils,
    QgsProject,
)

from plugin_testdata import needs_engine


def run_loaded(params: dict) -> tuple[dict, object]:
    """Run geopeft:embed with its output loaded into the project, as the toolbox does."""
    from qgis import processing
    project = QgsProject.instance()
    context = QgsProcessingContext()
    context.setProject(project)
    feedback = QgsProcessingFeedback()
    params = {**params, "OUTPUT": QgsProcessingOutputLayerDefinition(params["OUTPUT"], project)}
    result = processing.run("geopeft:embed", params, context=context, feedback=feedback)
    (source, details), = context.layersToLoadOnCompletion().items()
    layer = QgsProcessingUtils.mapLayerFromString(source, context)
    assert layer is not None and layer.isValid(), source
    details.postProcessor().postProcessLayer(layer, context, feedback)
    project.addMapLayer(layer)
    return result, layer


def test_embed_is_registered_with_the_engines_backbones(provider):
    alg = QgsApplication.processingRegistry().algorithmById("geopeft:embed")
    assert alg is not None and alg.shortHelpString()
    for name in ("INPUT", "MODEL", "BACKBONE", "COMPONENTS", "OUTPUT"):
        assert alg.parameterDefinition(name) is not None, name
    assert "prithvi_eo_v2_tiny" in alg.parameterDefinition("BACKBONE").options()


@needs_engine
def test_embed_writes_a_false_colour_layer(provider, data, tmp_path, qgis_new_project):
    from osgeo import gdal

    out = str(tmp_path / "embedding.tif")
    names = QgsApplication.processingRegistry().algorithmById("geopeft:embed").parameterDefinition(
        "BACKBONE").options()
    result, layer = run_loaded({"INPUT": str(data["scene"]), "BACKBONE": names.index("prithvi_eo_v2_tiny"),
                                "PRETRAINED": False, "COMPONENTS": 3, "DEVICE": 1, "OUTPUT": out})
    assert result["OUTPUT"] == out
    assert (layer.width(), layer.height(), layer.bandCount()) == (128 // 16, 128 // 16, 3)
    renderer = layer.renderer()
    assert isinstance(renderer, QgsMultiBandColorRenderer)
    assert (renderer.redBand(), renderer.greenBand(), renderer.blueBand()) == (1, 2, 3)
    ds = gdal.Open(out)
    for band, enhancement in zip((1, 2, 3), (renderer.redContrastEnhancement(), renderer.greenContrastEnhancement(),
                                             renderer.blueContrastEnhancement())):
        values = ds.GetRasterBand(band).ReadAsArray()
        assert ds.GetRasterBand(band).GetDescription() == f"PC {band}"
        assert enhancement.minimumValue() == pytest.approx(float(values.min()), rel=1e-5, abs=1e-5)
        assert enhancement.maximumValue() == pytest.approx(float(values.max()), rel=1e-5, abs=1e-5)
        assert np.ptp(values) > 0


def test_embed_needs_a_model_or_a_backbone(provider, data, tmp_path):
    from qgis import processing
    with pytest.raises(QgsProcessingException, match="either a trained model folder or a foundation model"):
        processing.run("geopeft:embed", {"INPUT": str(data["scene"]), "OUTPUT": str(tmp_path / "e.tif")})


def test_embed_args_pass_only_what_is_set():
    from qgis_plugin.core.commands import EmbedConfig, embed_args, validate_embed

    model = EmbedConfig(images=["a.tif"], out="e.tif", model="m/card.json")
    assert embed_args(model) == ["embed", "--model", "m/card.json", "--image", "a.tif", "--out", "e.tif",
                                 "--device", "auto"]
    bare = EmbedConfig(images=["a.tif", "b.tif"], out="e.tif", backbone="prithvi_eo_v2_tiny", weights="none",
                       bands=[1, 2], components=0, batch_size=4, device="cpu")
    assert embed_args(bare) == ["embed", "--backbone", "prithvi_eo_v2_tiny", "--weights", "none", "--image", "a.tif",
                                "--image", "b.tif", "--bands", "1,2", "--out", "e.tif", "--components", "0",
                                "--batch-size", "4", "--device", "cpu"]
    both = EmbedConfig(images=[], out="e.png", model="m", backbone="prithvi_eo_v2_tiny", components=-1)
    problems = " ".join(validate_embed(both))
    for text in ("not both", "Choose the raster", "GeoTIFF", "0 (every feature) or more"):
        assert text in problems
