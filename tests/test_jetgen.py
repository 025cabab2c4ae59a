"""scripts/jetgen.py: layout and dtypes of the JetClass files, physics of the truth-matched jets,
determinism and resumability. Uses the session fixtures of conftest.py where it can."""
import numpy as np
import pytest
import uproot

from scripts import jetgen

PART_FLOAT = ["part_px", "part_py", "part_pz", "part_energy", "part_deta", "part_dphi",
              "part_d0val", "part_d0err", "part_dzval", "part_dzerr", "part_charge"]
PART_INT = ["part_isChargedHadron", "part_isNeutralHadron", "part_isPhoton", "part_isElectron",
            "part_isMuon"]
JET = ["jet_pt", "jet_eta", "jet_phi", "jet_energy", "jet_nparticles", "jet_sdmass",
       "jet_tau1", "jet_tau2", "jet_tau3", "jet_tau4"]


def read(path):
    with uproot.open(path) as f:
        return f["tree"].arrays(library="ak")


def flat(a):
    import awkward as ak
    return ak.to_numpy(ak.flatten(a))


def test_layout_and_dtypes_all_classes(tiny_pythia10):
    """Every class lands in train/val/test under its JetClass prefix, with JetClass's dtypes."""
    for c in jetgen.CLASSES:
        for split, n in (("train", 6), ("val", 1), ("test", 1)):  # 8 jets, 80/10/10 rounded
            path = tiny_pythia10 / split / f"{jetgen.PREFIX[c]}_000.root"
            with uproot.open(path) as f:
                tree = f["tree"]
                assert tree.num_entries == n
                assert isinstance(tree, uproot.TTree)  # like JetClass, not an RNTuple
                types = {k: tree[k].typename for k in tree.keys()}
                a = tree.arrays(library="np")
            for k in PART_FLOAT:
                assert a[k][0].dtype == np.float32, k
            for k in PART_INT:
                assert a[k][0].dtype == np.int32, k
            for k in JET:
                assert a[k].dtype == np.float32, k
            for i, lab in enumerate(jetgen.CLASSES):
                want = np.float32 if i == 0 else (np.bool_ if i <= 5 else np.int32)
                assert a[f"label_{lab}"].dtype == want, lab
                assert (a[f"label_{lab}"] == (lab == c)).all(), (c, lab)
            assert len(types) >= len(PART_FLOAT) + len(PART_INT) + len(JET) + 10


def test_constituents_sum_to_jet_and_conventions(tiny_pythia10):
    for c in ("Tbqq", "Hbb", "QCD"):
        a = read(tiny_pythia10 / "train" / f"{jetgen.PREFIX[c]}_000.root")
        import awkward as ak
        px, py, pz, e = (ak.to_numpy(ak.sum(ak.values_astype(a[k], np.float64), axis=1))
                         for k in ("part_px", "part_py", "part_pz", "part_energy"))
        jet = {k: ak.to_numpy(a[k]) for k in JET}
        np.testing.assert_allclose(np.hypot(px, py), jet["jet_pt"], rtol=1e-4)
        np.testing.assert_allclose(e, jet["jet_energy"], rtol=1e-4)
        n = ak.to_numpy(ak.num(a["part_px"]))
        assert (n == jet["jet_nparticles"]).all()
        # JetClass's deta convention: (eta - jet_eta) * sign(jet_eta)
        pt = np.hypot(flat(a["part_px"]), flat(a["part_py"]))
        eta = np.arcsinh(flat(a["part_pz"]) / pt)
        jeta = np.repeat(ak.to_numpy(a["jet_eta"]), ak.to_numpy(ak.num(a["part_px"])))
        np.testing.assert_allclose(flat(a["part_deta"]), (eta - jeta) * np.where(jeta < 0, -1, 1),
                                   atol=1e-4)
        dphi = flat(a["part_dphi"])
        assert dphi.min() >= -np.pi and dphi.max() < np.pi
        # pT-ordered constituents, exactly one PID flag each, neutrals without impact parameters
        same_jet = np.repeat(np.arange(len(n)), n)
        assert (np.diff(pt)[np.diff(same_jet) == 0] <= 1e-3).all()
        assert (sum(flat(a[k]) for k in PART_INT) == 1).all()
        neutral = flat(a["part_charge"]) == 0
        assert ((flat(a["part_d0val"])[neutral] == 0).all()
                and (flat(a["part_d0err"])[neutral] == 0).all())
        assert (flat(a["part_d0err"])[~neutral] > 0).all()
        assert ((jet["jet_pt"] >= 500) & (jet["jet_pt"] < 1000)
                & (np.abs(jet["jet_eta"]) < 2)).all()


def test_truth_matching_masses(tiny_pythia):
    """Top jets (all of t -> b q q' inside) peak near m_t; QCD jets are much lighter."""
    top = read(tiny_pythia / "train" / "TTBar_000.root")
    qcd = read(tiny_pythia / "train" / "ZJetsToNuNu_000.root")
    top, qcd = ({k: np.asarray(t[k]) for k in JET} for t in (top, qcd))
    m_top, m_qcd = np.median(top["jet_sdmass"]), np.median(qcd["jet_sdmass"])
    assert 150 < m_top < 190, m_top
    assert m_qcd < 100, m_qcd
    assert (np.median(top["jet_tau3"] / top["jet_tau2"])
            < np.median(qcd["jet_tau3"] / qcd["jet_tau2"]))
    assert ((top["jet_pt"] >= 550) & (top["jet_pt"] < 650)).all()


def test_w_jets_near_w_mass():
    nconst, part, jet = jetgen.generate_jets("Wqq", 20, "jetclass", seed=11)
    assert len(nconst) == 20
    assert 65 < np.median(jet["sdmass"]) < 95, np.median(jet["sdmass"])
    assert all(np.isfinite(jet[k]).all() for k in jet)


def test_deterministic_and_resumable(tmp_path):
    kw = dict(classes=("Zqq",), jets_per_class=10, seed=5, workers=1, preset="jetclass",
              progress=False)
    paths = jetgen.generate(tmp_path / "a", **kw)
    again = jetgen.generate(tmp_path / "b", **kw)
    assert ([p.relative_to(tmp_path / "a") for p in paths]
            == [p.relative_to(tmp_path / "b") for p in again])
    # identical arrays (the files differ in uproot's timestamps/UUIDs)
    for p, q in zip(paths, again):
        a, b = read(p), read(q)
        for k in a.fields:
            assert a[k].tolist() == b[k].tolist(), k
    assert (jetgen.task_seed(5, "Zqq", 0) != jetgen.task_seed(6, "Zqq", 0)
            != jetgen.task_seed(5, "Wqq", 0))

    # resume: nothing rewritten; a deleted file, and only it, comes back with the same content
    mtimes = {p: p.stat().st_mtime_ns for p in paths}
    before = read(paths[1])
    paths[1].unlink()
    jetgen.generate(tmp_path / "a", **kw)
    for p in (paths[0], paths[2]):
        assert p.stat().st_mtime_ns == mtimes[p]
    assert read(paths[1])["jet_pt"].tolist() == before["jet_pt"].tolist()
    assert not list((tmp_path / "a").rglob("*.tmp"))


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="preset"):
        jetgen.generate(tmp_path, classes=("Hbb",), jets_per_class=5, preset="toptagging",
                        progress=False)
    with pytest.raises(ValueError, match="split"):
        jetgen.generate(tmp_path, jets_per_class=5, split=(0.5, 0.1, 0.1), progress=False)
    with pytest.raises(SystemExit, match="--classes"):
        jetgen.main(["--out", str(tmp_path), "--classes", "Top"])


def test_leptonic_jets_contain_their_lepton(tiny_pythia10):
    """Tbl and Hqql truth matching requires the charged lepton from the W inside the jet."""
    import awkward as ak
    for c in ("Tbl", "Hqql"):
        a = read(tiny_pythia10 / "train" / f"{jetgen.PREFIX[c]}_000.root")
        n_lep = ak.to_numpy(ak.sum(a["part_isElectron"] + a["part_isMuon"], axis=1))
        assert (n_lep >= 1).all(), c
