"""Tools that stand beside the methods: downloads, counting; run as python -m scripts.NAME."""
