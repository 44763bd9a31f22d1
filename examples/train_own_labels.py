"""Train geovae's VAE segmenter on your own labels, then segment with it.

    python examples/train_own_labels.py [--image scene.tif --labels labels.tif --classes "1:a,2:b"]
        [--epochs 20] [--out out/]

Labels: a raster on the image's grid (class ids; 0 or its nodata = unlabelled). The default
is the NC Landsat-7 scene with the 1996 land-class map. The model file is self-describing
(bands, normalisation, classes and colours): ``geovae segment`` needs nothing else.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image")
    ap.add_argument("--labels")
    ap.add_argument("--classes", default=_common.NC_CLASSES, help='class ids and names, "1:developed,5:forest"')
    ap.add_argument("--epochs", type=int, help="training epochs (default 20; 1 with GEOVAE_EXAMPLE_FAST)")
    ap.add_argument("--data", help="the real-data folder (default $GEOVAE_DATA or ../shared/data)")
    ap.add_argument("--out", default="geovae-example-train")
    a = ap.parse_args(argv)
    import geovae
    from geovae.training import train_model

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    image, labels = _common.nc_scene_and_labels(a.data, out / "data")
    image, labels = Path(a.image or image), Path(a.labels or labels)
    settings = {**_common.train_settings(), **({"epochs": a.epochs} if a.epochs else {})}
    trained = train_model(image, labels, out / "model.safetensors", classes=a.classes, **settings)
    print("model:", trained.model_path)
    for k, v in sorted(trained.metrics.items()):
        print(f"  {k}: {v}")
    model = geovae.load_model(trained.model_path, device="cpu")
    print("classes:", dict(zip(model.info.class_ids, model.info.class_names)))
    res = geovae.segment_scene(image, trained.model_path, out, **_common.segment_settings())
    print("class areas (m^2):", {c["name"]: round(c["area_m2"]) for c in res.report["classes"]})
    return {"trained": trained, "result": res}


if __name__ == "__main__":
    main()
