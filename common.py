"""nanojet common: data, features, subjets, encoder blocks, metrics and training helpers
shared by every method script."""

# (development: the parts below are merged into this file by the lead)
from nn_part import *  # noqa: E402,F401,F403
from harness_part import *  # noqa: E402,F401,F403
