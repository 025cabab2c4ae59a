# model blocks and metrics (to be merged into common.py)
