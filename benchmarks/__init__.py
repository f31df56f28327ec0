"""p2pcompute benchmark suites. Run ``python -m benchmarks SUITE`` or ``p2pcompute bench SUITE``."""
