"""Joining: pieces of one region cut by block lines -> one polygon; geometry repair.

Pieces of one key (a class id, an object's name) that meet across a block line are found
with an STRtree and exact predicates, grouped by connected components, and united once
per group. All of it happens in pixel coordinates, where every vertex is an exact integer,
so unions are exact.
"""

from __future__ import annotations

import numpy as np
import shapely

from geovae.vector.trace import NSTATS

__all__ = ["join_pieces", "valid_polygons"]


def _components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected-component label of each of ``n`` nodes given undirected edges (i, j)."""
    parent = np.arange(n)

    def find(a: int) -> int:
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:  # path compression keeps later look-ups O(1)
            parent[a], a = root, parent[a]
        return root

    for a, b in zip(i.tolist(), j.tolist()):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(a) for a in range(n)])


def join_pieces(geoms: np.ndarray, cls: np.ndarray, stats: np.ndarray, connectivity: int) -> tuple[np.ndarray, ...]:
    """Join same-class pieces that touch across block lines; returns joined geoms/cls/stats."""
    if len(geoms) < 2:
        return geoms, cls, stats
    # Boxes first, then the exact test only on pairs of the same class: most touching
    # neighbours are of another class, and the exact predicates are the costly part.
    i, j = shapely.STRtree(geoms).query(geoms)
    keep = (i < j) & (cls[i] == cls[j])
    i, j = i[keep], j[keep]
    if len(i):
        if connectivity == 4:
            # Pieces of one class that meet only at a corner are separate regions with
            # 4-connectivity: join only those whose boundaries share a line.
            joined = shapely.relate_pattern(geoms[i], geoms[j], "F***1****")
        else:
            joined = shapely.intersects(geoms[i], geoms[j])
        i, j = i[joined], j[joined]
    if len(i) == 0:
        return geoms, cls, stats
    comp = _components(len(geoms), i, j)
    order = np.argsort(comp, kind="stable")
    comp_sorted = comp[order]
    starts = np.flatnonzero(np.r_[True, comp_sorted[1:] != comp_sorted[:-1]])
    ends = np.r_[starts[1:], len(order)]
    out_g = np.empty(len(starts), dtype=object)
    out_c = np.empty(len(starts), dtype=np.int64)
    out_s = np.empty((len(starts), NSTATS))
    for k, (s, e) in enumerate(zip(starts, ends)):
        members = order[s:e]
        out_g[k] = geoms[members[0]] if e - s == 1 else _union_pieces(geoms[members])
        out_c[k] = cls[members[0]]
        out_s[k] = stats[members].sum(axis=0)
    return out_g, out_c, out_s


def _union_pieces(pieces: np.ndarray) -> shapely.Geometry:
    """Union of same-class pieces of one region, which meet only along block lines.

    A piece's holes lie inside its own block and hold other classes, so joining never
    touches them: uniting only the outer rings and putting the old holes back gives the
    same polygon as a full overlay, several times faster for regions with many holes.

    With 4-connectivity the result is valid by construction, so nothing checks it again:
    GDAL traces 4-connected regions as valid polygons (a hole meets its shell at most at
    one vertex), a GEOS union of valid polygons is valid, and a piece's holes lie inside
    its own shell, away from every other piece, each still meeting at most one ring at one
    vertex. An affine map to world coordinates keeps that. tests/test_vectorize.py checks
    every written polygon on real rasters and on random-noise ones (the worst case).
    """
    if not (shapely.get_type_id(pieces) == shapely.GeometryType.POLYGON).all():
        return shapely.union_all(pieces)  # 8-connected regions can be multi-part: full overlay
    merged = shapely.union_all(shapely.polygons(shapely.get_exterior_ring(pieces)))
    if merged.geom_type != "Polygon":
        return shapely.union_all(pieces)
    holes = [ring for piece in pieces for ring in piece.interiors]
    return shapely.Polygon(merged.exterior, [*merged.interiors, *holes])


def valid_polygons(geoms: np.ndarray) -> np.ndarray:
    """Repair invalid geometries and keep only their polygonal part."""
    bad = ~shapely.is_valid(geoms)
    if bad.any():
        fixed = shapely.make_valid(geoms[bad])
        # make_valid can return a collection with stray lines or points: keep area only.
        fixed = np.array(
            [g if g.geom_type in ("Polygon", "MultiPolygon") else _polygonal(g) for g in fixed], dtype=object
        )
        geoms = geoms.copy()
        geoms[bad] = fixed
    return geoms


def _polygonal(g: shapely.Geometry) -> shapely.Geometry:
    parts = [p for p in shapely.get_parts(g) if p.geom_type in ("Polygon", "MultiPolygon")]
    if not parts:
        return shapely.Polygon()
    return shapely.union_all(parts)
