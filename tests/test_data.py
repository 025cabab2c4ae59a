"""Data layer: readers, features, cache, streaming, subjets, bad input, download."""
import hashlib
import http.server
import io
import math
import os
import tarfile
import threading
import warnings

import awkward as ak
import h5py
import numpy as np
import pytest
import uproot

import common
from scripts import download

LABEL_DTYPES = {"QCD": np.float32, "Hbb": bool, "Hcc": bool, "Hgg": bool, "H4q": bool,
                "Hqql": bool, "Zqq": np.int32, "Wqq": np.int32, "Tbqq": np.int32, "Tbl": np.int32}


# --- helpers: files in the real layouts ---------------------------------------------------

def write_jetclass(path, jets, label, jet_obs=None, drop=()):
    """jets: list of dicts of per-particle lists (px, py, pz, energy, deta, dphi, ...) in file
    order; label: class name; label branches with the real files' mixed dtypes."""
    n = len(jets)
    keys = ["px", "py", "pz", "energy", "deta", "dphi", "d0val", "d0err", "dzval", "dzerr",
            "charge", "isChargedHadron", "isNeutralHadron", "isPhoton", "isElectron", "isMuon"]
    d = {}
    for k in keys:
        dtype = np.int32 if k.startswith("is") else np.float32
        d[f"part_{k}"] = ak.values_astype(ak.Array([j.get(k, [0.0] * len(j["px"])) for j in jets]),
                                          dtype)
    obs = jet_obs or {}
    for k in ("pt", "eta", "phi", "energy"):
        d[f"jet_{k}"] = np.asarray(obs.get(k, [600.0] * n), dtype=np.float32)
    for c, dt in LABEL_DTYPES.items():
        d[f"label_{c}"] = np.full(n, c == label).astype(dt)
    for b in drop:
        d.pop(b)
    path.parent.mkdir(parents=True, exist_ok=True)
    with uproot.recreate(path) as f:
        f.mktree("tree", d)  # a TTree, as the real files (f["tree"] = ... may give an RNTuple)
    return path


def random_jets(n, seed, n_lo=3, n_hi=60):
    rng = np.random.default_rng(seed)
    jets = []
    for _ in range(n):
        m = int(rng.integers(n_lo, n_hi))
        pt, eta, phi = rng.exponential(20, m) + 0.5, rng.normal(0, 0.3, m), rng.normal(0, 0.3, m)
        px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
        jets.append(dict(px=px, py=py, pz=pz, energy=np.sqrt(px**2 + py**2 + pz**2), deta=eta,
                         dphi=phi))
    return jets


def write_toptagging(path, constituents, labels, **create):
    """pandas/PyTables layout: /table/table with values_block_0 (E, PX, PY, PZ x 200 + truth)
    and values_block_1 (ttv, is_signal_new). constituents: (N, k, 4) as (E, px, py, pz)."""
    n = len(labels)
    block0 = np.zeros((n, 804), dtype=np.float32)
    c = np.asarray(constituents, dtype=np.float32)
    block0[:, :4 * c.shape[1]] = c.reshape(n, -1)
    dt = np.dtype([("index", "<i8"), ("values_block_0", "<f4", (804,)),
                   ("values_block_1", "<i8", (2,))])
    rows = np.zeros(n, dtype=dt)
    rows["index"] = np.arange(n)
    rows["values_block_0"] = block0
    rows["values_block_1"][:, 1] = labels
    names0 = [f"{q}_{i}" for i in range(200) for q in ("E", "PX", "PY", "PZ")] + \
        ["truthE", "truthPX", "truthPY", "truthPZ"]
    with h5py.File(path, "w") as f:
        d = f.create_dataset("table/table", shape=(n,), dtype=dt, chunks=(max(n, 1),), **create)
        if not create:
            d[...] = rows
        d.attrs["values_block_0_kind"] = ("(lp0\n" + "".join(
            f"{'a' if i else ''}V{s}\np{i + 1}\n" for i, s in enumerate(names0)) + "a.").encode()
        d.attrs["values_block_1_kind"] = b"(lp0\nVttv\np1\naVis_signal_new\np2\na."
    return path


def ptetaphi(pt, eta, phi):
    return [pt * math.cosh(eta), pt * math.cos(phi), pt * math.sin(phi), pt * math.sinh(eta)]


@pytest.fixture
def jc(tmp_path):
    """A JetClass-like folder: val_5M/ with TTBar and ZJetsToNuNu files (100 jets each)."""
    write_jetclass(tmp_path / "jc/val_5M/TTBar_000.root", random_jets(100, 1), "Tbqq")
    write_jetclass(tmp_path / "jc/val_5M/ZJetsToNuNu_000.root", random_jets(100, 2), "QCD")
    return tmp_path / "jc"


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOJET_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --- reader and features ------------------------------------------------------------------

def test_features_by_hand(tmp_path):
    # three particles written out of pT order; the middle one is the hardest
    jet = dict(px=[3.0, 40.0, 1.0], py=[4.0, 30.0, 0.0], pz=[0.0, 20.0, 1.0],
               energy=[5.0, 55.0, 1.5], deta=[0.1, -0.2, 0.3], dphi=[0.05, 3.5, -0.1],
               charge=[1, -1, 0], isChargedHadron=[1, 0, 0], isElectron=[0, 1, 0],
               isPhoton=[0, 0, 1], d0val=[0.5, 2.0, 0.0], d0err=[0.1, 3.0, 0.0],
               dzval=[-0.5, 0.1, 0.0], dzerr=[0.2, -1.0, 0.0])
    write_jetclass(tmp_path / "d/test/HToBB_000.root", [jet], "Hbb",
                   jet_obs=dict(pt=[60.0], eta=[0.5], phi=[0.1], energy=[70.0]))
    j = common.load_jets("pythia", tmp_path / "d", split="test", n_max=4, features="full")
    assert j.x.shape == (1, 4, 17) and j.y.tolist() == [common.CLASSES.index("Hbb")]
    assert j.valid.tolist() == [[True, True, True, False]]
    # leading particle: pt = 50, E = 55, dphi 3.5 wraps to 3.5 - 2 pi
    dphi = 3.5 - 2 * math.pi
    expect = [(math.log(50) - 1.7) * 0.7, (math.log(55) - 2.0) * 0.7,
              (math.log(50 / 60) + 4.7) * 0.7, (math.log(55 / 70) + 4.7) * 0.7,
              min(5.0, (math.hypot(-0.2, dphi) - 0.2) * 4.0), -1, 0, 0, 0, 1, 0,
              math.tanh(2.0), 1.0, math.tanh(0.1), 0.0, -0.2, dphi]
    np.testing.assert_allclose(j.x[0, 0], expect, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(j.p4[0, 0], [40, 30, 20, 55])
    assert np.hypot(j.p4[0, :3, 0], j.p4[0, :3, 1]).tolist() == [50.0, 5.0, 1.0]
    assert (j.x[0, 3] == 0).all() and (j.p4[0, 3] == 0).all()
    # deltaR above (3.14 - 0.2) * 4 = 11.8 was clipped to 5; the soft particle's is not
    np.testing.assert_allclose(j.x[0, 2, 4], (math.hypot(0.3, -0.1) - 0.2) * 4, rtol=1e-5)
    kin = common.load_jets("pythia", tmp_path / "d", split="test", n_max=4, features="kin")
    np.testing.assert_allclose(kin.x[0, 0], np.array(expect)[[0, 1, 2, 3, 4, 15, 16]], rtol=1e-5,
                               atol=1e-6)
    assert common.FEATURE_NAMES["full"][15:] == ["deta", "dphi"]


def test_refeature_in_the_jet_axis_is_the_data_layer():
    """common.refeature (torch, the methods' own frames) and features_flat (numpy, the data
    layer) share one set of formulas: in the jet's own axis they agree, "full" extras kept."""
    import torch
    rng = np.random.default_rng(3)
    pt, eta = rng.uniform(1, 80, 12), rng.normal(-0.8, 0.3, 12)
    phi = rng.uniform(-np.pi, np.pi, 12)
    p4 = np.stack([pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta),
                   pt * np.cosh(eta) * 1.01], -1)
    axis = np.array([300.0, -0.7, 3.0, 420.0])
    deta = common.signed_deta(eta, axis[1])
    dphi = common.wrap_phi(phi - axis[2])
    extra = {"part_charge": rng.integers(-1, 2, 12).astype(float),
             "part_d0val": rng.normal(0, 1, 12)}
    x = common.features_flat(p4[:, 0], p4[:, 1], p4[:, 3], deta, dphi,
                             np.tile(axis, (12, 1)), extra, "full")
    t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32)[None]  # noqa: E731
    valid = torch.ones(1, 12, dtype=torch.bool)
    new = common.refeature(t(x), t(p4), valid, t(axis))
    torch.testing.assert_close(new[0], t(x)[0], atol=2e-4, rtol=0)


def test_wrap_phi_boundary():
    x = np.array([math.pi - 0.01, math.pi + 0.01, -math.pi - 0.01, -math.pi, 2 * math.pi + 0.3])
    w = common.wrap_phi(x)
    assert ((w >= -math.pi) & (w < math.pi)).all()
    np.testing.assert_allclose(w, [math.pi - 0.01, -math.pi + 0.01, math.pi - 0.01, -math.pi, 0.3],
                               atol=1e-9)


def test_toptagging_dphi_across_pi_and_deta_sign(tmp_path):
    # jet 0 straddles phi = +-pi; jet 1 sits at negative eta
    c0 = [ptetaphi(100, 0.5, 3.1), ptetaphi(100, 0.5, -3.1)]
    c1 = [ptetaphi(100, -1.0, 0.0), ptetaphi(50, -0.8, 0.1)]
    f = write_toptagging(tmp_path / "t.h5", [c0, c1], [1, 0])
    j = common.load_jets("toptagging", f, features="kin", n_max=8)
    deta, dphi = j.x[..., 5], j.x[..., 6]
    assert abs(abs(j.jet[0, 2]) - math.pi) < 1e-3                      # jet axis at +-pi
    np.testing.assert_allclose(np.sort(dphi[0, :2]), [-(math.pi - 3.1), math.pi - 3.1], atol=1e-4)
    assert j.y.tolist() == [1, 0]
    # jet_eta < 0: deta = -(eta - jet_eta); the particle at eta -0.8 is further from the beam
    jet_eta = j.jet[1, 1]
    assert jet_eta < -0.9
    np.testing.assert_allclose(deta[1, 1], -(-0.8 - jet_eta), atol=1e-5)
    np.testing.assert_allclose(j.jet[1, 0], np.hypot(*j.p4[1].sum(0)[:2]), rtol=1e-5)


def test_padding_ordering_and_truncation(jc):
    j = common.load_jets("jetclass", jc, split="val", n_max=16)
    n = j.valid.sum(1)
    assert (n <= 16).all() and (n == 16).any() and (n < 16).any()
    assert (j.valid == (np.arange(16) < n[:, None])).all()               # valid first
    pt = np.hypot(j.p4[..., 0], j.p4[..., 1])
    assert (np.diff(pt, axis=1)[j.valid[:, 1:]] <= 0).all()              # pT descending
    assert (j.p4[~j.valid] == 0).all() and (j.x[~j.valid] == 0).all()
    # truncation keeps the leading particles: compare with a wider load
    wide = common.load_jets("jetclass", jc, split="val", n_max=128)
    np.testing.assert_array_equal(wide.p4[:, :16], j.p4)
    assert j.x.dtype == np.float32 and j.y.dtype == np.int64 and j.valid.dtype == bool
    assert sorted(set(j.y.tolist())) == [0, 8]


def test_toptagging_fixture(toptagging_fixture):
    j = common.load_jets("toptagging", toptagging_fixture, n_max=200, features="full")
    assert j.x.shape == (300, 200, 17) and j.p4.shape == (300, 200, 4)
    assert set(j.y.tolist()) == {0, 1}
    s = j.p4.sum(1)
    pt = np.hypot(s[:, 0], s[:, 1])
    assert (pt > 550).all() and (pt < 650).all()
    assert (j.x[..., 5:15] == 0).all()                    # no charge/PID/impact parameters
    # deta/dphi of the reader equal the recomputed ones (constituent eta/phi vs jet axis)
    p = j.p4[j.valid]
    row = np.nonzero(j.valid)[0]
    eta = np.arcsinh(p[:, 2] / np.hypot(p[:, 0], p[:, 1]))
    np.testing.assert_allclose(j.x[..., 15][j.valid], common.signed_deta(eta, j.jet[row, 1]),
                               atol=1e-4)
    folder = toptagging_fixture.parent
    if (folder / "val.h5").exists() is False:
        with pytest.raises(SystemExit, match="val.h5"):
            common.load_jets("toptagging", folder, split="val")


def test_nan_and_empty_jets_dropped_with_one_warning(tmp_path):
    jets = random_jets(5, 3)
    jets[1]["px"][0] = np.nan
    jets[3] = {k: [] for k in jets[3]}
    jets[4]["energy"][2] = np.inf
    f = write_jetclass(tmp_path / "d/train/WToQQ_000.root", jets, "Wqq")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        j = common.load_jets("pythia", f.parent, cache=False)
    msgs = [str(x.message) for x in w if "dropped" in str(x.message)]
    assert len(msgs) == 1 and "2 constituents" in msgs[0] and "1 jets" in msgs[0]
    assert len(j) == 4 and np.isfinite(j.x).all() and np.isfinite(j.p4).all()
    assert j.valid.sum(1).tolist() == [len(jets[i]["px"]) - (i in (1, 4)) for i in (0, 1, 2, 4)]


def test_balanced_subset_and_classes(jc):
    j = common.load_jets("jetclass", jc, split="val", n_jets=51)
    assert np.bincount(j.y, minlength=10)[[0, 8]].tolist() == [25, 26]
    q = common.load_jets("jetclass", jc, split="val", classes=["QCD"])
    assert len(q) == 100 and set(q.y.tolist()) == {0}


def test_jetgen_round_trip(request):
    pytest.importorskip("scripts.jetgen")
    path = request.getfixturevalue("tiny_pythia")
    j = common.load_jets("pythia", path, split="train", features="full")
    assert len(j) > 0 and set(j.y.tolist()) <= {0, 8} and len(set(j.y.tolist())) == 2
    assert j.valid[:, 0].all() and np.isfinite(j.x).all()
    # the generator's deta/dphi follow the same convention as the reader's own computation
    p = j.p4[j.valid]
    row = np.nonzero(j.valid)[0]
    pt = np.hypot(p[:, 0], p[:, 1])
    eta, phi = np.arcsinh(p[:, 2] / pt), np.arctan2(p[:, 1], p[:, 0])
    np.testing.assert_allclose(j.x[..., 15][j.valid], common.signed_deta(eta, j.jet[row, 1]),
                               atol=2e-3)
    np.testing.assert_allclose(j.x[..., 16][j.valid], common.wrap_phi(phi - j.jet[row, 2]),
                               atol=2e-3)


# --- cache and streaming ------------------------------------------------------------------

def test_cache_hit_miss_invalidation(jc, tmp_cache, monkeypatch):
    reads = []
    reader = common.READERS["jetclass"]
    monkeypatch.setitem(common.READERS, "jetclass",
                        lambda f, *a, **k: reads.append(f) or reader(f, *a, **k))
    a = common.load_jets("jetclass", jc, split="val", n_max=32)
    assert len(reads) == 2                                   # miss: both files decoded
    entries = lambda: sorted(p.name for p in tmp_cache.iterdir())  # noqa: E731
    assert len(entries()) == 1 and not any(e.startswith(".") for e in entries())
    b = common.load_jets("jetclass", jc, split="val", n_max=32)
    assert len(reads) == 2 and isinstance(b.x, np.memmap) and len(entries()) == 1   # hit
    np.testing.assert_array_equal(a.x, b.x)
    common.load_jets("jetclass", jc, split="val", n_max=16)
    common.load_jets("jetclass", jc, split="val", n_max=32, features="full")
    common.load_jets("jetclass", jc, split="val", n_max=32, n_jets=10)
    assert len(entries()) == 4 and len(reads) == 2 + 2 * 3
    # rewriting a source file changes size/mtime: a new entry, not the stale one
    write_jetclass(jc / "val_5M/TTBar_000.root", random_jets(50, 9), "Tbqq")
    c = common.load_jets("jetclass", jc, split="val", n_max=32)
    assert len(entries()) == 5 and len(c) == 150


# --- subjets ------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ["ca", "kt", "antikt"])
def test_subjets_partition_and_sum(toptagging_fixture, algorithm):
    j = common.load_jets("toptagging", toptagging_fixture, n_max=128)[:100]
    s = common.cluster_subjets(j.p4, j.valid, algorithm=algorithm, R=0.2, n_subjets=128,
                               n_per_subjet=128)
    # every constituent in exactly one subjet
    for i in range(len(j)):
        got = np.sort(s.idx[i][s.valid[i]])
        np.testing.assert_array_equal(got, np.nonzero(j.valid[i])[0])
    assert (s.idx[~s.valid] == -1).all()
    # subjet 4-vectors sum to the jet, and each one is the sum of its particles
    np.testing.assert_allclose(s.p4.sum(1), j.p4.sum(1), rtol=1e-4, atol=1e-2)
    parts = np.where(s.valid[..., None], j.p4[np.arange(len(j))[:, None, None], s.idx], 0).sum(2)
    np.testing.assert_allclose(parts, s.p4, rtol=1e-4, atol=1e-2)
    spt = np.hypot(s.p4[..., 0], s.p4[..., 1])
    assert (np.diff(spt, axis=1) <= 1e-3).all()
    ppt = np.hypot(j.p4[..., 0], j.p4[..., 1])[np.arange(len(j))[:, None, None], s.idx]
    assert (np.diff(np.where(s.valid, ppt, -1), axis=2) <= 0).all()


def test_subjets_cut(toptagging_fixture):
    j = common.load_jets("toptagging", toptagging_fixture, n_max=128)
    s = common.cluster_subjets(j.p4, j.valid, n_subjets=20, n_per_subjet=30)
    assert s.p4.shape == (300, 20, 4) and s.idx.shape == (300, 20, 30)
    full = common.cluster_subjets(j.p4, j.valid, n_subjets=128, n_per_subjet=128)
    np.testing.assert_array_equal(s.idx, full.idx[:, :20, :30])
    other = common.cluster_subjets(j.p4, j.valid, R=0.4, n_subjets=20, n_per_subjet=30)
    assert not np.array_equal(other.idx, s.idx)
    with pytest.raises(ValueError, match="algorithm"):
        common.cluster_subjets(j.p4, j.valid, algorithm="siscone")


# --- bad input ----------------------------------------------------------------------------

def test_missing_dataset_names_path_and_command(tmp_path):
    with pytest.raises(SystemExit) as e:
        common.load_jets("jetclass", tmp_path / "nowhere", split="val")
    msg = str(e.value)
    assert "nowhere" in msg and "python -m scripts.download jetclass" in msg and "\n" not in msg
    with pytest.raises(SystemExit, match="download toptagging"):
        common.load_jets("toptagging", tmp_path / "nowhere")


def test_truncated_root_and_h5(jc, tmp_path, toptagging_fixture):
    src = (jc / "val_5M/TTBar_000.root").read_bytes()
    bad = tmp_path / "bad/val/TTBar_000.root"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(src[: len(src) // 2])
    with pytest.raises(SystemExit, match="TTBar_000.root"):
        common.load_jets("pythia", tmp_path / "bad", split="val", cache=False)
    h5 = tmp_path / "trunc.h5"
    data = toptagging_fixture.read_bytes()
    h5.write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit, match="trunc.h5"):
        common.load_jets("toptagging", h5, cache=False)


def test_missing_branch(tmp_path):
    write_jetclass(tmp_path / "d/train/ZToQQ_000.root", random_jets(3, 0), "Zqq",
                   drop=["part_dzerr"])
    common.load_jets("pythia", tmp_path / "d", features="kin", cache=False)  # not needed: fine
    with pytest.raises(SystemExit, match="part_dzerr.*ZToQQ_000.root|ZToQQ_000.root.*part_dzerr"):
        common.load_jets("pythia", tmp_path / "d", features="full", cache=False)


def test_blosc_without_plugin(tmp_path):
    if h5py.h5z.filter_avail(32001):
        pytest.skip("a blosc filter is installed here")
    f = write_toptagging(tmp_path / "blosc.h5", np.zeros((2, 1, 4)), [0, 1], compression=32001,
                         allow_unknown_filter=True)
    with pytest.raises(SystemExit, match="pip install hdf5plugin"):
        common.load_jets("toptagging", f, cache=False)


# --- download -----------------------------------------------------------------------------

class RangeHandler(http.server.BaseHTTPRequestHandler):
    files = {}      # url path -> bytes
    ranges = []     # Range headers seen

    def do_GET(self):
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        self.ranges.append(rng)
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    RangeHandler.files, RangeHandler.ranges = {}, []
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_fetch_checksum_failure_and_resume(server, tmp_path):
    blob = os.urandom(300_000)
    RangeHandler.files["/f.bin"] = blob
    md5 = hashlib.md5(blob).hexdigest()
    with pytest.raises(SystemExit, match="md5"):
        download.fetch(server + "/f.bin", tmp_path / "f.bin", md5="0" * 32, progress=False)
    assert not (tmp_path / "f.bin").exists() and not (tmp_path / "f.bin.part").exists()
    (tmp_path / "f.bin.part").write_bytes(blob[:123_456])   # an interrupted download
    download.fetch(server + "/f.bin", tmp_path / "f.bin", md5=md5, progress=False)
    assert RangeHandler.ranges[-1] == "bytes=123456-"
    assert (tmp_path / "f.bin").read_bytes() == blob and not (tmp_path / "f.bin.part").exists()


def test_download_cli_extracts_tar(server, tmp_path, jc, monkeypatch):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(jc / "val_5M/TTBar_000.root", arcname="val_5M/TTBar_000.root")
    RangeHandler.files["/JetClass_Pythia_val_5M.tar"] = buf.getvalue()
    md5 = hashlib.md5(buf.getvalue()).hexdigest()
    monkeypatch.setitem(download.DOWNLOADS, ("jetclass", "val"),
                        [(server + "/JetClass_Pythia_val_5M.tar", md5)])
    out = tmp_path / "dl"
    download.main(["jetclass", "--split", "val", "--dir", str(out), "--no-progress"])
    assert ((out / "val_5M/TTBar_000.root").exists()
            and not (out / "JetClass_Pythia_val_5M.tar").exists())
    assert len(common.load_jets("jetclass", out, split="val")) == 100
    download.main(["jetclass", "--split", "val", "--dir", str(out), "--no-progress"])
    assert len(RangeHandler.ranges) == 1                    # second call: already extracted


def test_embedded_default_generated_once(tmp_path, monkeypatch):
    calls = []

    class FakeJetgen:
        @staticmethod
        def generate(out, classes, jets_per_class, seed, workers, preset):
            calls.append((tuple(classes), preset))
            for split in ("train", "val", "test"):
                for c in classes:
                    write_jetclass(out / split / f"{common.PREFIX[c]}_000.root",
                                   random_jets(4, len(calls)), c)

    monkeypatch.setitem(__import__("sys").modules, "scripts.jetgen", FakeJetgen)
    monkeypatch.setattr(common, "DATA_DIR", tmp_path / "data")
    j = common.load_jets("pythia")
    assert calls == [(("QCD", "Tbqq"), "toptagging")] and sorted(set(j.y.tolist())) == [0, 8]
    common.load_jets("pythia", split="val")
    assert len(calls) == 1 and (tmp_path / "data/pythia/.complete").exists()
