import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# tests never write into the repository's data/cache
os.environ.setdefault("NANOJET_CACHE", tempfile.mkdtemp(prefix="nanojet-cache-"))


@pytest.fixture(scope="session")
def tiny_pythia(tmp_path_factory):
    """Two-class (QCD, Tbqq) generated sample in the Top Tagging window, 50 jets per class."""
    import jetgen
    out = tmp_path_factory.mktemp("pythia2")
    jetgen.generate(out, classes=("QCD", "Tbqq"), jets_per_class=50, seed=1, workers=1,
                    preset="toptagging", progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_pythia10(tmp_path_factory):
    """All ten JetClass classes, 8 jets per class."""
    import jetgen
    out = tmp_path_factory.mktemp("pythia10")
    jetgen.generate(out, classes=jetgen.CLASSES, jets_per_class=8, seed=2, workers=1,
                    preset="jetclass", progress=False)
    return out


@pytest.fixture(scope="session")
def toptagging_fixture():
    path = ROOT.parent / "shared" / "fixtures" / "toptagging_sample.h5"
    if not path.exists():
        pytest.skip(f"{path} not found (the shared fixtures folder sits beside the checkout)")
    return path
