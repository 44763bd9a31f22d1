"""What identifies a remote file's version: its size and ETag or modification time.

A batch redoes a scene whose input changed; for a remote scene (or a STAC asset) that is
known only from what the server says of the file. :func:`remote_identity` asks it: an HTTP
``HEAD`` (a one-byte ``GET`` where a signed URL refuses ``HEAD``) for ``http(s)://``, fsspec's
metadata for an object store (``s3://`` with s3fs installed...): the size, the ``ETag`` and
the ``Last-Modified`` time. Where the server cannot be asked, the identity says so and holds
the URL only.
"""

from __future__ import annotations

from typing import Any

__all__ = ["remote_identity"]

#: Seconds a server may take to describe a file.
HEAD_TIMEOUT = 30

_VSI = {"/vsis3/": "s3://", "/vsigs/": "gs://", "/vsiaz/": "az://"}


def _url(name: str) -> str:
    """A GDAL name (``/vsicurl/https://...``, ``/vsis3/b/k``) as the URL fsspec reads."""
    if name.startswith("/vsicurl/"):
        return name[len("/vsicurl/") :]
    for vsi, scheme in _VSI.items():
        if name.startswith(vsi):
            return scheme + name[len(vsi) :]
    return name


def _pick(info: dict[str, Any], *names: str) -> Any:
    lower = {str(k).lower(): v for k, v in info.items()}
    for n in names:
        v = lower.get(n.lower())
        if v not in (None, ""):
            return v
    return None


def remote_identity(url: str) -> dict[str, Any]:
    """The size, ETag and modification time a server gives for ``url``.

    Args:
        url: ``http(s)://``, ``s3://``, ``gs://``, ``az://`` URL or GDAL ``/vsi...`` name.

    Returns:
        ``{"url", "size", "etag", "last_modified"}`` (those the server gives), or
        ``{"url", "unverified": reason}`` when the file cannot be described: a scene so
        fingerprinted is redone on resume only if its URL changes.
    """
    target = _url(url)
    try:
        if target.lower().startswith(("http://", "https://")):
            info = _http_info(target)
        else:
            import fsspec

            fs, path = fsspec.core.url_to_fs(target)
            info = dict(fs.info(path))
    except ImportError as e:
        return {"url": url, "unverified": f"no fsspec filesystem for this URL ({e})"}
    except Exception as e:
        return {"url": url, "unverified": " ".join(f"{type(e).__name__}: {e}".split())[:300]}
    out: dict[str, Any] = {"url": url}
    size = _pick(info, "size", "Content-Length")
    if size is not None:
        out["size"] = int(size)
    etag = _pick(info, "ETag", "md5Hash", "content_md5")
    if etag is not None:
        out["etag"] = str(etag)
    modified = _pick(info, "Last-Modified", "LastModified", "last_modified", "mtime", "updated")
    if modified is not None:
        out["last_modified"] = str(modified)
    return out


def _http_info(url: str) -> dict[str, Any]:
    """The headers that describe a file over HTTP (``HEAD``, else the first byte's ``GET``)."""
    import requests

    r = requests.head(url, allow_redirects=True, timeout=HEAD_TIMEOUT)
    if r.status_code in (403, 405, 501):  # signed URLs are often valid for GET only
        r = requests.get(url, headers={"Range": "bytes=0-0"}, allow_redirects=True, timeout=HEAD_TIMEOUT, stream=True)
        r.close()
    r.raise_for_status()
    info: dict[str, Any] = {k: v for k, v in r.headers.items() if k.lower() in ("etag", "last-modified")}
    total = r.headers.get("Content-Range", "").rpartition("/")[2]
    if r.status_code == 206 and total.isdigit():
        info["size"] = int(total)
    elif r.headers.get("Content-Length", "").isdigit() and r.headers.get("Content-Encoding", "identity") == "identity":
        info["size"] = int(r.headers["Content-Length"])
    return info
