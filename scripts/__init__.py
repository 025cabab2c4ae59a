"""Tools beside the methods (downloads, the GPU check, benchmarks, counting), run from the
repository root as `python -m scripts.NAME`."""
