"""Training reads remote rasters (http://, as https:// and s3://) through the same opener as local ones."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from geovae.errors import SceneError
from geovae.training import SceneDataModule

NC_CLASSES = "1:developed,2:agriculture,3:herbaceous,4:shrubland,5:forest,6:water,7:sediment"


def _one_line(e: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


#: A static file server with the HTTP Range requests GDAL's /vsicurl/ makes, run in its own
#: process: TorchGeo lists remote files through pyogrio, which holds the GIL while it waits
#: for the answer, so a server thread in the test process would never answer.
RANGE_SERVER = r"""
import http.server, sys
from pathlib import Path

class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def send_head(self):
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return None
        size, rng = path.stat().st_size, self.headers.get("Range", "")
        start, end = 0, size - 1
        if rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            start, end = int(a), min(int(b) if b else size - 1, size - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        f = open(path, "rb")
        f.seek(start)
        self._left = end - start + 1
        return f

    def copyfile(self, source, outputfile):
        outputfile.write(source.read(self._left))

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a, **k: Handler(*a, directory=sys.argv[1], **k))
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def test_remote_image_and_labels_train_like_local_ones(
    nc_stack: Path, nc_labels: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """https:// paths go through the same opener (scene.open_raster) as local ones, and TorchGeo
    reads them by their GDAL name: the same checks, statistics, classes and patches."""
    assert nc_stack.parent == nc_labels.parent
    server = subprocess.Popen(
        [sys.executable, "-c", RANGE_SERVER, str(nc_stack.parent)], stdout=subprocess.PIPE, text=True
    )
    monkeypatch.setenv("GDAL_DISABLE_READDIR_ON_OPEN", "EMPTY_DIR")
    try:
        url = f"http://127.0.0.1:{int(server.stdout.readline())}"  # type: ignore[union-attr]
        kw = dict(classes=NC_CLASSES, tile=64, batch_size=4, samples_per_epoch=4, val_fraction=0.5)
        remote = SceneDataModule(f"{url}/{nc_stack.name}", f"{url}/{nc_labels.name}", **kw)
        local = SceneDataModule(str(nc_stack), str(nc_labels), **kw)
        assert remote.mean == local.mean and remote.classes == local.classes
        assert remote.n_labelled == local.n_labelled and remote.describe()["image"].startswith("http://")
        remote.setup("fit")
        local.setup("fit")
        got, want = next(iter(remote.train_dataloader())), next(iter(local.train_dataloader()))
        assert torch.equal(got["image"], want["image"]) and torch.equal(got["mask"], want["mask"])
        with pytest.raises(SceneError) as e:
            SceneDataModule(f"{url}/missing.tif", f"{url}/{nc_labels.name}", **kw)
        assert "check the URL" in _one_line(e)
    finally:
        server.kill()
        server.wait()
