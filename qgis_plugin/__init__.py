"""GeoPEFT QGIS plugin: fine-tune geospatial foundation models with LoRA, from QGIS.

The plugin holds no ML code: it drives the GeoPEFT engine, a separate Python process with its
own environment (torch is never imported into QGIS).
"""


def classFactory(iface):  # noqa: N802 - QGIS API
    from .plugin import GeoPEFTPlugin
    return GeoPEFTPlugin(iface)
