"""Export a land-cover raster as GeoJSON polygons (and a GeoPackage QGIS opens styled).

    python examples/export_geojson.py [--classes landcover.tif] [--out landcover.geojson]
        [--min-area 8100] [--simplify 15]

Any integer class raster works; the default is the NC 1996 land-class map. GeoJSON is RFC
7946 (WGS84 longitude/latitude); the GeoPackage keeps the raster's CRS. No model needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", help="class raster (default: the NC land-class map)")
    ap.add_argument("--data", help="the real-data folder (default $GEOVAE_DATA or ../shared/data)")
    ap.add_argument("--out", default="geovae-example-landcover.geojson", help="the GeoJSON to write")
    ap.add_argument("--min-area", type=float, default=8100.0, help="drop polygons under this many m^2 (10 pixels)")
    ap.add_argument("--simplify", type=float, default=15.0, help="topology-preserving simplification, metres")
    a = ap.parse_args(argv)
    import geopandas as gpd

    import geovae

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    classes = Path(a.classes) if a.classes else _common.nc_scene_and_labels(a.data, out.parent / "data")[1]
    names = dict(p.split(":") for p in _common.NC_CLASSES.split(",")) if not a.classes else None
    res = geovae.vectorize(
        classes,
        [out, out.with_suffix(".gpkg")],
        min_area=a.min_area,
        simplify=a.simplify,
        class_names={int(k): v for k, v in names.items()} if names else None,
    )
    print(f"{res.n_polygons} polygons -> {', '.join(map(str, res.paths))}")
    gdf = gpd.read_file(out)
    print(gdf.crs, gdf.groupby("class_name")["area_m2"].sum().round(-3))
    return {"result": res, "polygons": gdf}


if __name__ == "__main__":
    main()
