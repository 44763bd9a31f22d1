"""Segment a GeoTIFF and open what comes out.

    python examples/segment_geotiff.py [--scene scene.tif] [--model model.safetensors] [--out out/]

Without ``--model`` a model is trained first on the NC scene's land-class map (see
train_own_labels.py). The outputs: Cloud Optimized GeoTIFFs (classes, confidence,
uncertainty), polygons, QGIS styles, a STAC Item and the report; then the same run is
opened as an xarray Dataset, a GeoDataFrame and a STAC Item.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scene", help="a GeoTIFF (default: the NC Landsat-7 scene)")
    ap.add_argument("--model", help="a geovae model file (default: train one on the NC labels)")
    ap.add_argument("--data", help="the real-data folder (default $GEOVAE_DATA or ../shared/data)")
    ap.add_argument("--out", default="geovae-example-segment", help="output folder")
    a = ap.parse_args(argv)
    import pystac

    import geovae

    out = Path(a.out)
    scene, labels = _common.nc_scene_and_labels(a.data, out / "data")
    scene = Path(a.scene) if a.scene else scene
    model = Path(a.model) if a.model else _common.quick_model(scene, labels, out / "model.safetensors")

    res = geovae.segment_scene(scene, model, out, samples=4, formats=("geojson", "gpkg"), **_common.segment_settings())
    for kind, path in res.outputs.items():
        print(f"{kind:>28}: {path}")

    ds = res.to_xarray()  # lazy: classes, confidence, uncertainty... on the scene's grid
    print(ds)
    print("mean confidence:", float(ds.confidence.mean()))
    polygons = res.polygons()  # a GeoDataFrame (from the GeoPackage)
    print(polygons.groupby("class_name")["area_m2"].sum().sort_values(ascending=False))
    item = pystac.Item.from_file(str(res.outputs["stac"]))
    print("STAC item", item.id, "bbox", item.bbox, "assets", sorted(item.assets))
    return {"scene": scene, "result": res, "dataset": ds, "polygons": polygons, "item": item}


if __name__ == "__main__":
    main()
