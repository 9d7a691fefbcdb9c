"""Class polygons from a predicted raster with QGIS's own algorithms (no ML in the plugin)."""
from __future__ import annotations

from qgis import processing
from qgis.core import QgsProcessingContext, QgsProcessingFeedback

from ..styling import CLASS_FIELD, NAME_FIELD


def class_name_expression(classes: list[dict], field: str = CLASS_FIELD) -> str:
    """CASE expression giving each class value its name."""
    if not classes:
        return "NULL"
    whens = " ".join("WHEN \"{}\" = {} THEN '{}'".format(field, int(c["value"]),
                                                          str(c["name"]).replace("'", "''"))
                     for c in classes)
    return f"CASE {whens} ELSE NULL END"


def polygonize(raster: str, classes: list[dict], output: str, context: QgsProcessingContext,
               feedback: QgsProcessingFeedback | None = None, child: bool = True) -> str:
    """gdal:polygonize (class_id) then native:fieldcalculator (class_name) into ``output``."""
    feedback = feedback or QgsProcessingFeedback()
    polygons = processing.run("gdal:polygonize", {
        "INPUT": raster, "BAND": 1, "FIELD": CLASS_FIELD, "EIGHT_CONNECTEDNESS": False,
        "OUTPUT": "TEMPORARY_OUTPUT"}, context=context, feedback=feedback,
        is_child_algorithm=child)["OUTPUT"]
    if feedback.isCanceled():
        return ""
    return processing.run("native:fieldcalculator", {
        "INPUT": polygons, "FIELD_NAME": NAME_FIELD, "FIELD_TYPE": 2, "FIELD_LENGTH": 80,
        "FIELD_PRECISION": 0, "FORMULA": class_name_expression(classes), "OUTPUT": output},
        context=context, feedback=feedback, is_child_algorithm=child)["OUTPUT"]
