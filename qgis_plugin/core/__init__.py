"""Qt-free core of the GeoPEFT plugin: build engine commands, launch and talk to the engine.

Nothing here imports Qt, QGIS or any ML library, so it can be unit-tested with plain Python and
runs unchanged on a Processing worker thread or inside a ``QgsTask``.
"""
