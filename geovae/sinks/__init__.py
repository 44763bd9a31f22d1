"""The sinks of a run's block stream (:mod:`geovae.blocks`): each is fed every block in write
order, then closed (or aborted after an error).

* :class:`~geovae.sinks.rasters.RasterSink`: the output rasters (COGs, the class sidecar),
  each file's SHA-256 computed once, when it is written;
* :class:`~geovae.sinks.statistics.StatisticsSink`: class pixels and areas, anomaly-flagged
  pixels per class, the STAC raster statistics;
* :class:`~geovae.sinks.objects.ObjectSink`: the object polygons of ``--objects``.

The class polygons' sink is :class:`geovae.vector.PolygonStream`.
"""
