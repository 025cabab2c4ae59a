import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# tests never write into the repository's data/cache; a folder made here is removed at the end
_OWN_CACHE = None
if "NANOJET_CACHE" not in os.environ:
    _OWN_CACHE = os.environ["NANOJET_CACHE"] = tempfile.mkdtemp(prefix="nanojet-cache-")
# one intra-op thread per test process: the suite shares small machines, and two threads per
# process thrash as soon as anything else runs (the overfit tests went from seconds to minutes)
torch.set_num_threads(1)


def pytest_configure(config):
    # torch's own deprecation notices (torch.compile imports torch.jit internals); the suite
    # must show the warnings of our code only
    config.addinivalue_line("filterwarnings",
                            "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_pythia(tmp_path_factory):
    """Two-class (QCD, Tbqq) generated sample in the Top Tagging window, 50 jets per class."""
    from scripts import jetgen
    out = tmp_path_factory.mktemp("pythia2")
    jetgen.generate(out, classes=("QCD", "Tbqq"), jets_per_class=50, seed=1, workers=1,
                    preset="toptagging", progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_pythia10(tmp_path_factory):
    """All ten JetClass classes, 8 jets per class."""
    from scripts import jetgen
    out = tmp_path_factory.mktemp("pythia10")
    jetgen.generate(out, classes=jetgen.CLASSES, jets_per_class=8, seed=2, workers=1,
                    preset="jetclass", progress=False)
    return out


# --- Top Tagging fixture ------------------------------------------------------------------------


def toptagging_frame(n=300, seed=0, n_const=200):
    """A pandas DataFrame in the Top Tagging reference layout (arXiv 1902.09914, Zenodo
    2603256): per jet up to 200 massless constituents as E_i, PX_i, PY_i, PZ_i (float32, pT
    ordered, zero-padded), truthE..truthPZ (the top's 4-vector, zero for QCD), then the int64
    columns ttv and is_signal_new. Synthetic kinematics: jet pT 550-650 GeV, |eta| < 2; QCD jets
    are one diffuse prong, top jets three (b, q, q') of the decay, so the classes are learnable."""
    import pandas as pd
    rng = np.random.default_rng(seed)
    cols = np.zeros((n, 4 * n_const), dtype=np.float64)
    truth = np.zeros((n, 4))
    label = np.arange(n) % 2                                  # 150 QCD, 150 top, interleaved
    for i in range(n):
        top = bool(label[i])
        eta0, phi0 = rng.uniform(-2, 2), rng.uniform(-np.pi, np.pi)
        m = int(rng.integers(40, 110) if top else rng.integers(17, 80))
        if top:  # three prongs within R = 0.8, each a narrow spray
            prong = rng.integers(0, 3, m)
            axes = rng.normal(0, 0.3, (3, 2))
            d = axes[prong] + rng.normal(0, 0.05, (m, 2))
        else:
            d = rng.normal(0, 0.12, (m, 2)) * rng.exponential(1.0, (m, 1))
        eta, phi = eta0 + d[:, 0], phi0 + d[:, 1]
        pt = rng.dirichlet(np.full(m, 0.6)) + 1e-4
        px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
        scale = rng.uniform(555, 645) / np.hypot(px.sum(), py.sum())   # jet pT in the window
        p = np.stack([np.sqrt(px**2 + py**2 + pz**2), px, py, pz], -1) * scale  # massless
        p = p[np.argsort(-np.hypot(p[:, 1], p[:, 2]))][:n_const]
        cols[i, :4 * len(p)] = p.reshape(-1)
        if top:
            s = p.sum(0)
            truth[i] = [np.hypot(s[0], 173.0), *s[1:]]
    names = [f"{q}_{k}" for k in range(n_const) for q in ("E", "PX", "PY", "PZ")]
    frame = {c: cols[:, k].astype(np.float32) for k, c in enumerate(names)}
    frame.update({c: truth[:, k].astype(np.float32)
                  for k, c in enumerate(["truthE", "truthPX", "truthPY", "truthPZ"])})
    frame.update(ttv=np.full(n, 2, dtype=np.int64), is_signal_new=label.astype(np.int64))
    return pd.DataFrame(frame, index=pd.RangeIndex(1000, 1000 + n))


def write_toptagging_h5(path, n=300, seed=0):
    """Write toptagging_frame as the original files were made: pandas + PyTables, format
    "table" under the key "table", zlib-compressed."""
    toptagging_frame(n, seed).to_hdf(path, key="table", format="table", complevel=5,
                                     complib="zlib")
    return path


@pytest.fixture(scope="session")
def toptagging_fixture(tmp_path_factory):
    """A 300-jet Top Tagging sample (150 QCD, 150 top) in the reference pandas/PyTables layout."""
    return write_toptagging_h5(tmp_path_factory.mktemp("toptagging") / "toptagging_sample.h5")
