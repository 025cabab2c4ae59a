"""Helpers only the tests use: reference forms of what common.py computes inside other code."""
import numpy as np

import common


def particle_features(p4, valid, jet, deta, dphi, extra=None, features="kin"):
    """common.features_flat on padded arrays: p4 (N, M, 4), valid (N, M), jet (N, 4), deta/dphi
    and the extra arrays (N, M). Returns float32 (N, M, F), zero in padding."""
    row = np.nonzero(valid)[0]
    flat_extra = {k: v[valid] for k, v in (extra or {}).items()}
    x = np.zeros(valid.shape + (len(common.FEATURE_NAMES[features]),), dtype=np.float32)
    x[valid] = common.features_flat(p4[..., 0][valid], p4[..., 1][valid], p4[..., 3][valid],
                                    deta[valid], dphi[valid], jet[row], flat_extra, features)
    return x


def pair_features(p4, valid):
    """p4 (B, N, 4), valid (B, N) -> (B, N, N, 4) fp32: ParT's pair features of every pair, the
    full square the encoder never builds (it embeds i <= j only); zero where either particle is
    padding. The diagonal (i, i) is kept, as in ParT."""
    pair_valid = valid[:, :, None] & valid[:, None, :]                          # (B, N, N)
    return common._pair_feats(p4[:, :, None], p4[:, None, :]) * pair_valid[..., None]
