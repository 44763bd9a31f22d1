"""Look at the results in a browser: ``geovae view OUT/`` or ``geovae.view(OUT)``.

A local, read-only web server shows a segment or batch output folder on a map: the input
scene as RGB (stretched as the quicklook is), the classes in the model's colours with a
legend of class names and areas, confidence, uncertainty and reconstruction error as layers
with opacity, and the polygons (click one for its attributes). A batch folder lists its
scenes and zooms to each. Everything the page needs ships with the installed packages
(Leaflet from ``xstatic-leaflet``): it works offline and loads nothing from elsewhere unless
a basemap is asked for.

``geovae.view`` is this module and can be called: ``geovae.view(path)`` is
``geovae.view.view(path)``, so a notebook needs one name for both the call and :func:`show`.
"""

from __future__ import annotations

import logging
import sys
import threading
import types
import webbrowser
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from geovae import signals
from geovae.errors import OptionError
from geovae.view.catalog import Catalog, ViewError, load_catalog

log = logging.getLogger(__name__)

__all__ = ["ViewError", "Viewer", "serve", "show", "view"]

_RUNNING: dict[Path, Viewer] = {}


class Viewer:
    """A running viewer: its address, and how to stop it.

    In Jupyter, a ``Viewer`` shown as a cell's result is the page itself, in an iframe.

    Attributes:
        url: the page's address.
        catalog: the scenes and layers it shows.
    """

    def __init__(self, server: Any, url: str, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self._stopped = threading.Event()
        self.url = url
        self.catalog: Catalog = server.catalog

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(self._server.port)

    @property
    def running(self) -> bool:
        """False once :meth:`stop` has been called."""
        return not self._stopped.is_set()

    def stop(self) -> None:
        """Stop serving and free the port (idempotent)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        for k, v in list(_RUNNING.items()):
            if v is self:
                del _RUNNING[k]

    def wait(self, timeout: float | None = None) -> bool:
        """Block until :meth:`stop` is called (Ctrl-C raises ``KeyboardInterrupt`` here).

        Returns:
            True when stopped, False when ``timeout`` seconds passed first.
        """
        # Event.wait with a timeout in a loop stays interruptible by Ctrl-C on every platform
        if timeout is not None:
            return self._stopped.wait(timeout)
        while not self._stopped.wait(0.5):
            signals.check()  # the CLI's Ctrl-C and SIGTERM only set a flag
        return True

    def open(self) -> bool:
        """Open the page in the default browser; False when none could be started."""
        try:
            return webbrowser.open(self.url)
        except webbrowser.Error:
            return False

    def _repr_html_(self) -> str:
        return (
            f'<iframe src="{self.url}" style="width:100%;height:620px;border:1px solid #ccc" '
            f'title="geovae view {self.catalog.root.name}"></iframe>'
            f'<div style="font-size:small"><a href="{self.url}" target="_blank">{self.url}</a></div>'
        )

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<geovae Viewer {self.url} ({state}): {self.catalog.root}>"

    def __enter__(self) -> Viewer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _check_basemap(url: str | None) -> str | None:
    if not url:
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or not all(k in url for k in ("{z}", "{x}", "{y}")):
        raise OptionError(
            f"--basemap {url}: give an XYZ tile URL template, e.g. https://tile.example.org/{{z}}/{{x}}/{{y}}.png"
        )
    return url


def view(
    path: str | Path, *, host: str | None = None, port: int = 0, basemap: str | None = None, open_browser: bool = False
) -> Viewer:
    """Start a viewer for a segment output folder, a batch output folder or one run report.

    The server runs in a background thread until :meth:`Viewer.stop` (or the interpreter
    exits). Only files under the folder are served, read-only.

    Args:
        path: the folder ``geovae segment --out`` or ``geovae batch --out`` wrote, or a
            ``<stem>.json`` report.
        host: address to listen on; default 127.0.0.1 (this machine only). Giving one (e.g.
            ``0.0.0.0``) serves to whoever can reach it.
        port: port to listen on; 0 picks a free one.
        basemap: an XYZ tile URL template drawn under the layers (none by default: the page
            then loads nothing from outside this machine).
        open_browser: open the page in the default browser.

    Returns:
        The running :class:`Viewer`; in Jupyter it displays as the page.

    Raises:
        ViewError: nothing to show at ``path``.
        OptionError: the port is taken or the basemap is not a tile URL template.
    """
    from geovae.view.server import ViewServer

    basemap = _check_basemap(basemap)
    catalog = load_catalog(path)
    bind = host if host is not None else "127.0.0.1"
    try:
        # serving to the network: requests name this machine however the network reaches it
        server = ViewServer(
            catalog, bind, port, basemap=basemap, any_host=bind not in ("127.0.0.1", "localhost", "::1")
        )
    except OSError as e:
        raise OptionError(
            f"cannot listen on {bind}:{port} ({e.strerror or e}); choose another --port or 0 for a free one"
        ) from e
    if host is not None and bind not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving %s to the network on %s: anyone who can reach this machine can see it", catalog.root, bind)
    shown = "127.0.0.1" if bind in ("0.0.0.0", "", "::") else bind
    if ":" in shown:
        shown = f"[{shown}]"
    url = f"http://{shown}:{server.port}/"
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.25}, name=f"geovae-view-{server.port}", daemon=True
    )
    thread.start()
    threading.Thread(target=server.warm_up, name=f"geovae-view-warm-{server.port}", daemon=True).start()
    viewer = Viewer(server, url, thread)
    if open_browser:
        viewer.open()
    return viewer


def serve(
    path: str | Path,
    *,
    host: str | None = None,
    port: int = 0,
    basemap: str | None = None,
    open_browser: bool = True,
    echo: Callable[[str], Any] = print,
) -> None:
    """Run a viewer in the foreground until Ctrl-C (what ``geovae view`` does).

    Args:
        path, host, port, basemap, open_browser: as for :func:`view`.
        echo: prints the address line.

    Raises:
        KeyboardInterrupt: on Ctrl-C, after the server has stopped.
    """
    v = view(path, host=host, port=port, basemap=basemap)
    try:
        n = len(v.catalog.scenes)
        echo(f"geovae view: {v.url}  ({n} scene{'s' if n != 1 else ''} from {v.catalog.root}; Ctrl-C to stop)")
        if open_browser and not v.open():
            echo("geovae view: no browser could be started; open the address above")
        v.wait()
    finally:
        v.stop()


def _folder_of(obj: Any) -> Path:
    """The path to view for a SegmentResult, BatchResult, report dict, folder or file."""
    if isinstance(obj, (str, Path)):
        return Path(obj)
    outputs = getattr(obj, "outputs", None)
    if isinstance(outputs, dict) and outputs.get("report"):
        return Path(outputs["report"])
    report = getattr(obj, "report", obj if isinstance(obj, dict) else None)
    if isinstance(report, dict) and isinstance(report.get("outputs"), dict) and report["outputs"].get("report"):
        return Path(report["outputs"]["report"])
    manifest = getattr(obj, "manifest", None)
    if manifest:
        return Path(manifest).parent
    raise TypeError(f"show() takes a SegmentResult, a BatchResult, a report or a path, not {type(obj).__name__}")


def show(result_or_folder: Any, **kwargs: Any) -> Viewer:
    """Show a segment result (or a batch result, report, folder) in the viewer.

    A viewer already running for the same path is reused, so calling it again in a notebook
    does not start another server.

    Args:
        result_or_folder: a ``SegmentResult`` (its report is found through ``outputs`` or
            ``report``), a ``BatchResult`` (its manifest's folder), a report dict, or a path.
        **kwargs: passed to :func:`view` (host, port, basemap, open_browser).

    Returns:
        The running :class:`Viewer` (in Jupyter, displayed as the page).
    """
    path = _folder_of(result_or_folder).expanduser().resolve()
    running = _RUNNING.get(path)
    if running is not None and running.running and not kwargs:
        return running
    v = view(path, **kwargs)
    _RUNNING[path] = v
    return v


class _CallableModule(types.ModuleType):
    """Lets ``geovae.view(path)`` call :func:`view` while ``geovae.view.show`` stays reachable."""

    def __call__(self, *args: Any, **kwargs: Any) -> Viewer:
        return view(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
