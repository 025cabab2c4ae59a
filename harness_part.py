# training harness (to be merged into common.py)
