"""geovae's benchmarks: speed and memory against TorchGeo's tiled-prediction loop and the model alone.

Run them all with ``python -m benchmarks`` (``--quick`` for a smoke run); results and the
machine they ran on are recorded in docs/benchmarks.md.
"""
