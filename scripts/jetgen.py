"""jetgen: boosted jets from Pythia 8 + fastjet, written in the JetClass ROOT layout.

The embedded default data set of nanojet: every script runs on these jets when no real data set
has been downloaded, and the reader in common.py reads them exactly like real JetClass files.

    python -m scripts.jetgen --out data/pythia --classes QCD,Tbqq --jets-per-class 10000 \
        --seed 0 --workers 2
    python -m scripts.jetgen --out data/pythia10 --classes all --preset jetclass \
        --jets-per-class 1000

Physics (generator level, no detector simulation):
- Processes (pp, sqrt(s) = 13 TeV for preset "jetclass", 14 TeV for "toptagging"):
  QCD  HardQCD:all (2 -> 2 QCD). JetClass's QCD jets recoil against Z -> nu nu instead (its file
       prefix ZJetsToNuNu); the jets are the same light-quark/gluon physics with a different
       quark/gluon mix, and dijets give two jets per event. The Top Tagging set uses dijets too.
  H*   HiggsSM:gg2Hg(l:t), qg2Hq(l:t), qqbar2Hg(l:t) (boosted H + jet, top loop resolved), with the
       Higgs decay forced: Hbb (b b~), Hcc (c c~), Hgg (g g), H4q (H -> W W* -> q q q q),
       Hqql (H -> W W* -> q q l nu: two Pythias per chunk, one with W+ -> q q', W- -> l nu and
       one with the charges swapped, get the same number of events, so both lepton charges appear
       equally and no event is wasted on W W -> 4q or 2l).
  Zqq, Wqq  WeakBosonAndParton (q q~ -> V g, q g -> V q), Z (no gamma*) -> q q~ (q = d u s c b),
       W -> q q'.
  Tbqq, Tbl  Top:gg2ttbar, qqbar2ttbar with every W forced to q q' (Tbqq) or to e nu / mu nu
       (Tbl; l = e or mu, tau left out: our choice, as for Hqql).
- Final-state particles with c*tau > 10 mm are stable (the usual generator-level convention, so
  K_S0 and Lambda reach the "detector" and carry impact parameters of cm).
- Multi-parton interactions are OFF by default (3x faster; the Top Tagging set had none, JetClass
  had MPI and pile-up): `--mpi` turns them on. PhaseSpace:pTHatMin/Max = 0.9 x / 1.1 x the jet
  pT window, so few events are wasted.
- Jets: anti-kt R = 0.8 on all visible final-state particles (neutrinos removed). The two leading
  jets of each event are kept when they fall in the preset's window (jetclass: pT 500-1000 GeV,
  toptagging: 550-650 GeV; |eta| < 2 for both).
- Truth matching (signal classes): a jet is kept only if every visible decay product of one
  resonance (top, H, W, Z; the partons/leptons right after the decay, before showering) lies
  within dR < 0.8 of the jet axis. Neutrinos are invisible and excluded from this requirement
  (Tbl: b and charged lepton; Hqql: two quarks and the charged lepton); JetClass's jets are
  made of detector objects, which cannot contain the neutrino either.

Branches (tree "tree", the names and dtypes of the real JetClass files, see ANCHORS.md):
- part_px/py/pz/energy (GeV), part_deta = (eta - jet_eta) * sign(jet_eta) (JetClass's convention),
  part_dphi wrapped to [-pi, pi), part_charge, part_isChargedHadron/NeutralHadron/Photon/
  Electron/Muon (int32), constituents ordered by pT (descending).
- part_d0val, part_dzval (mm): transverse and longitudinal impact parameters of a straight line
  from the particle's production vertex along its momentum, relative to the origin (the
  primary vertex in Pythia). They are true values, not smeared. part_d0err, part_dzerr: a
  simple CMS-like resolution model, d0err = 0.010 (+) 0.030 / pT[GeV] mm and
  dzerr = 0.020 (+) 0.050 / pT mm (added in quadrature); illustrative, not fitted to JetClass.
  Neutral particles get 0 for all four, as in JetClass.
- label_QCD (float32), label_Hbb..label_Hqql (bool), label_Zqq..label_Tbl (int32): one-hot.
- jet_pt/eta/phi/energy (the E-scheme sum of the constituents), jet_nparticles, jet_sdmass
  (soft-drop mass of the C/A reclustered jet, beta = 0, z_cut = 0.1, R0 = 0.8), jet_tau1..4
  (N-subjettiness from fastjet-contrib via fastjet's python package: normalised measure,
  beta = 1, R0 = 0.8, exclusive-kt axes without minimisation), all float32.
- uproot also writes "npart", the shared counter of the part_* branches.

Files: OUT/{train,val,test}/<JetClass prefix>_<k>.root (e.g. TTBar_000.root). Each class is cut
into chunks of at most --jets-per-file jets; chunk k is one task with its own Pythia, seeded from
(seed, class, k), and its jets go 80/10/10 (by default) into train/, val/, test/ file k. The
content of a file therefore does not depend on --workers. Same seed -> identical arrays; the
ROOT files themselves are not byte identical, since uproot stamps each file and key with the
creation time and a random UUID. Writes are atomic (X.root.tmp, then os.replace) and finished
files are skipped, so an interrupted run resumes where it stopped (a missing file re-runs its
chunk and only the missing files are written).
"""
import argparse
import math
import multiprocessing as mp
import os
import queue
import sys
import time
from pathlib import Path

import awkward as ak
import numpy as np

# --- constants ---------------------------------------------------------------------------------
# JetClass label order
CLASSES = ["QCD", "Hbb", "Hcc", "Hgg", "H4q", "Hqql", "Zqq", "Wqq", "Tbqq", "Tbl"]
PREFIX = {"QCD": "ZJetsToNuNu", "Hbb": "HToBB", "Hcc": "HToCC", "Hgg": "HToGG", "H4q": "HToWW4Q",
          "Hqql": "HToWW2Q1L", "Zqq": "ZToQQ", "Wqq": "WToQQ", "Tbqq": "TTBar", "Tbl": "TTBarLep"}
SPLITS = ("train", "val", "test")

PRESETS = {  # beam energy (GeV), jet pT window (GeV), |eta| cut, allowed classes
    "jetclass": dict(ecm=13000.0, pt=(500.0, 1000.0), eta=2.0, classes=CLASSES),
    "toptagging": dict(ecm=14000.0, pt=(550.0, 650.0), eta=2.0, classes=["QCD", "Tbqq"]),
}

HIGGS = ["HiggsSM:gg2Hg(l:t) = on", "HiggsSM:qg2Hq(l:t) = on", "HiggsSM:qqbar2Hg(l:t) = on",
         "25:onMode = off"]
TOP = ["Top:gg2ttbar = on", "Top:qqbar2ttbar = on", "24:onMode = off"]
W_HAD = "24:onIfAny = 1 2 3 4 5"  # W -> q q' (W -> t b is closed)
W_LEP = "24:onIfAny = 11 13"       # W -> e nu, mu nu
PROCESSES = {
    "QCD": ["HardQCD:all = on"],
    "Hbb": HIGGS + ["25:onIfMatch = 5 -5"],
    "Hcc": HIGGS + ["25:onIfMatch = 4 -4"],
    "Hgg": HIGGS + ["25:onIfMatch = 21 21"],
    "H4q": HIGGS + ["25:onIfMatch = 24 -24", "24:onMode = off", W_HAD],
    "Hqql": HIGGS + ["25:onIfMatch = 24 -24", "24:onMode = off"],
    "Zqq": ["WeakBosonAndParton:qqbar2gmZg = on", "WeakBosonAndParton:qg2gmZq = on",
            "WeakZ0:gmZmode = 2", "23:onMode = off", "23:onIfAny = 1 2 3 4 5"],
    "Wqq": ["WeakBosonAndParton:qqbar2Wg = on", "WeakBosonAndParton:qg2Wq = on",
            "24:onMode = off", W_HAD],
    "Tbqq": TOP + [W_HAD],
    "Tbl": TOP + [W_LEP],
}
# truth match: (resonance |PDG id|, number of its visible decay products that must be in the jet)
TRUTH = {"Hbb": (25, 2), "Hcc": (25, 2), "Hgg": (25, 2), "H4q": (25, 4), "Hqql": (25, 3),
         "Zqq": (23, 2), "Wqq": (24, 2), "Tbqq": (6, 3), "Tbl": (6, 2)}
# Pythia variants taking turns within one chunk (Pythia can force a decay per charge, not per W)
VARIANTS = {"Hqql": [["24:onPosIfAny = 1 2 3 4 5", "24:onNegIfAny = 11 13"],
                     ["24:onPosIfAny = 11 13", "24:onNegIfAny = 1 2 3 4 5"]]}
RESONANCES = np.array([6, 23, 24, 25])
NEUTRINOS = np.array([12, 14, 16])
R_JET = 0.8

PART_FLOAT = ["px", "py", "pz", "energy", "deta", "dphi", "d0val", "d0err", "dzval", "dzerr",
              "charge"]
PART_INT = ["isChargedHadron", "isNeutralHadron", "isPhoton", "isElectron", "isMuon"]
JET = ["pt", "eta", "phi", "energy", "nparticles", "sdmass", "tau1", "tau2", "tau3", "tau4"]


def label_dtype(c):
    """JetClass stores its one-hot labels with three dtypes; we write the same."""
    i = CLASSES.index(c)
    return np.float32 if i == 0 else (np.bool_ if i <= CLASSES.index("Hqql") else np.int32)


# --- one Pythia per task -----------------------------------------------------------------------
def make_pythia(cls, preset, seed, mpi=False, extra=()):
    import pythia8mc
    p = PRESETS[preset]
    pythia = pythia8mc.Pythia("", False)
    settings = PROCESSES[cls] + list(extra) + [
        f"Beams:eCM = {p['ecm']}",
        f"PhaseSpace:pTHatMin = {0.9 * p['pt'][0]}",
        f"PhaseSpace:pTHatMax = {1.1 * p['pt'][1]}",
        f"PartonLevel:MPI = {'on' if mpi else 'off'}",
        "ParticleDecays:limitTau0 = on", "ParticleDecays:tau0Max = 10",  # c*tau > 10 mm: stable
        "Random:setSeed = on", f"Random:seed = {seed}",
        "Print:quiet = on",
    ]
    for s in settings:
        if not pythia.readString(s):
            raise RuntimeError(f"Pythia rejected the setting '{s}'")
    if not pythia.init():
        raise RuntimeError(f"Pythia failed to initialise for class {cls}")
    return pythia


def _flat(a):
    return ak.to_numpy(ak.flatten(a)) if a.ndim > 1 else ak.to_numpy(a)


def _flat_opt(a):  # like _flat, for option-typed fields (vProd is None when at the origin)
    return ak.flatten(a) if a.ndim > 1 else a


def _eta_phi(px, py, pz):
    pt = np.hypot(px, py)
    return np.arcsinh(pz / np.maximum(pt, 1e-12)), np.arctan2(py, px), pt


def _wrap(dphi):
    return (dphi + np.pi) % (2 * np.pi) - np.pi  # [-pi, pi)


def _truth_axes(prt, pid, status, offsets, cls):
    """Visible decay products of each resonance, as dense (B, G, K) eta/phi arrays (NaN pads)
    plus (B, G) flags saying whether group g of event b is the resonance the class asks for."""
    res_id, n_visible = TRUTH[cls]
    starts = offsets[:-1]
    base = np.repeat(starts, np.diff(offsets))  # global index of each particle's event start
    mother1 = _flat(prt.mother1)
    mother2 = _flat(prt.mother2)
    m1 = mother1 + base  # global index of the mother (0 -> the event's system entry)
    apid = np.abs(pid)
    is_res = np.isin(apid, RESONANCES)
    prod = np.flatnonzero((np.abs(status) == 23) & ~is_res & is_res[m1]
                          & ~np.isin(apid, NEUTRINOS))

    def first_copy(i):  # walk up the recoil copies (mother1 == mother2, same id) of a particle
        while True:
            up = (mother1[i] == mother2[i]) & (mother1[i] > 0) & (pid[m1[i]] == pid[i])
            if not up.any():
                return i
            i = np.where(up, m1[i], i)

    root = first_copy(m1[prod])  # the resonance that decayed into the product
    while True:  # t -> W -> q and H -> W -> q: climb to the top-level resonance
        up = is_res[m1[root]]
        if not up.any():
            break
        root = np.where(up, first_copy(m1[root]), root)

    B = len(prt)
    groups, inv, counts = np.unique(root, return_inverse=True, return_counts=True)
    gevent = np.searchsorted(starts, groups, side="right") - 1  # event of each group
    grank = np.arange(len(groups)) - np.searchsorted(gevent, gevent)  # group's rank in its event
    order = np.argsort(inv, kind="stable")
    slot = np.empty_like(inv)
    slot[order] = np.arange(len(inv)) - np.searchsorted(inv[order], inv[order])
    G = grank.max() + 1 if len(groups) else 1
    K = slot.max() + 1 if len(slot) else 1
    eta = np.full((B, G, K), np.nan)
    phi = np.full((B, G, K), np.nan)
    px, py, pz = (_flat(prt.p.px)[prod], _flat(prt.p.py)[prod], _flat(prt.p.pz)[prod])
    e, f, _ = _eta_phi(px, py, pz)
    eta[gevent[inv], grank[inv], slot] = e
    phi[gevent[inv], grank[inv], slot] = f
    good = np.zeros((B, G), bool)
    good[gevent, grank] = (apid[groups] == res_id) & (counts == n_visible)
    return eta, phi, good


def _fastjet():
    """fastjet, with its banner (printed to stdout by the first clustering in each process, so
    once per worker, inside the progress bar) swallowed by one tiny clustering."""
    import fastjet
    if not getattr(_fastjet, "done", False):
        sys.stdout.flush()
        fd, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        try:
            one = ak.Array([[{"px": 1.0, "py": 0.0, "pz": 0.0, "E": 1.0}]])
            fastjet.ClusterSequence(one, fastjet.JetDefinition(fastjet.antikt_algorithm, 0.4))
        finally:
            os.dup2(fd, 1)
            os.close(fd)
            os.close(null)
        _fastjet.done = True
    return fastjet


def jets_from_batch(events, cls, preset, charge_of):
    """One nextBatch() of events -> dict of arrays for the jets that pass window and truth match.
    Everything is vectorised over the batch: no per-particle Python loop."""
    fastjet = _fastjet()
    p = PRESETS[preset]
    prt = events.prt
    counts = ak.to_numpy(ak.num(prt))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    event = np.repeat(np.arange(len(counts)), counts)
    pid = _flat(prt.id)
    status = _flat(prt.status)

    # visible final state: status > 0, no neutrinos
    vis = (status > 0) & ~np.isin(np.abs(pid), NEUTRINOS)
    vcount = np.bincount(event[vis], minlength=len(counts))
    voff = np.concatenate([[0], np.cumsum(vcount)])
    P = {k: _flat(getattr(prt.p, k))[vis] for k in ("px", "py", "pz", "e")}
    V = {k: ak.to_numpy(ak.fill_none(_flat_opt(getattr(prt.vProd, k)), 0.0))[vis]
         for k in ("px", "py", "pz")}
    vpid = pid[vis]

    # --- anti-kt R=0.8 on the whole batch, keep the two leading jets in the window ---
    parts = ak.unflatten(ak.zip({"px": P["px"], "py": P["py"], "pz": P["pz"], "E": P["e"]}),
                         vcount)
    cs = fastjet.ClusterSequence(parts, fastjet.JetDefinition(fastjet.antikt_algorithm, R_JET))
    min_pt = 0.5 * p["pt"][0]
    jets = cs.inclusive_jets(min_pt=min_pt)
    cidx = cs.constituent_index(min_pt=min_pt)
    njet = ak.to_numpy(ak.num(jets))
    jpx, jpy, jpz, je = (_flat(jets.px), _flat(jets.py), _flat(jets.pz), _flat(jets.E))
    jeta, jphi, jpt = _eta_phi(jpx, jpy, jpz)
    jevent = np.repeat(np.arange(len(counts)), njet)
    by_pt = ak.argsort(ak.unflatten(-jpt, njet), stable=True)
    # pT rank of each jet in its event
    rank = ak.to_numpy(ak.flatten(ak.argsort(by_pt, stable=True)))
    keep = (rank < 2) & (jpt >= p["pt"][0]) & (jpt < p["pt"][1]) & (np.abs(jeta) < p["eta"])

    if cls in TRUTH:
        teta, tphi, good = _truth_axes(prt, pid, status, offsets, cls)
        dr = np.hypot(teta[jevent] - jeta[:, None, None],
                      _wrap(tphi[jevent] - jphi[:, None, None]))
        dr = np.where(np.isnan(dr), 0.0, dr).max(axis=2)  # (J, G) farthest product of each group
        keep &= (good[jevent] & (dr < R_JET)).any(axis=1)

    sel = np.flatnonzero(keep)
    ci = ak.flatten(cidx, axis=1)[sel]  # (J, var) index into the event's visible particles
    nconst = ak.to_numpy(ak.num(ci))
    g = ak.to_numpy(ak.flatten(ci)).astype(np.int64) + np.repeat(voff[jevent[sel]], nconst)

    # constituents pT-ordered inside each jet
    cpt = np.hypot(P["px"][g], P["py"][g])
    jid = np.repeat(np.arange(len(sel)), nconst)
    order = np.lexsort((-cpt, jid))
    g = g[order]
    px, py, pz, e = P["px"][g], P["py"][g], P["pz"][g], P["e"][g]
    eta, phi, pt = _eta_phi(px, py, pz)
    a = np.abs(vpid[g])
    charge = charge_of(vpid[g])
    charged = charge != 0
    vx, vy, vz = V["px"][g], V["py"][g], V["pz"][g]
    d0 = np.where(charged, (vx * py - vy * px) / pt, 0.0)
    dz = np.where(charged, vz - (vx * px + vy * py) / pt * (pz / pt), 0.0)
    jeta_c = np.repeat(jeta[sel], nconst)
    part = {
        "px": px, "py": py, "pz": pz, "energy": e,
        "deta": (eta - jeta_c) * np.where(jeta_c < 0, -1.0, 1.0),
        "dphi": _wrap(phi - np.repeat(jphi[sel], nconst)),
        "d0val": d0, "d0err": np.where(charged, np.hypot(0.010, 0.030 / pt), 0.0),
        "dzval": dz, "dzerr": np.where(charged, np.hypot(0.020, 0.050 / pt), 0.0),
        "charge": charge,
        "isChargedHadron": charged & (a != 11) & (a != 13),
        "isNeutralHadron": ~charged & (a != 22),
        "isPhoton": a == 22, "isElectron": a == 11, "isMuon": a == 13,
    }
    part = {k: (v.astype(np.int32) if k in PART_INT else v.astype(np.float32))
            for k, v in part.items()}

    # --- substructure: soft drop and N-subjettiness on the C/A-reclustered constituents ---
    cons = ak.unflatten(ak.zip({"px": px, "py": py, "pz": pz, "E": e}), nconst)
    sub = fastjet.ClusterSequence(cons, fastjet.JetDefinition(fastjet.cambridge_algorithm, R_JET))
    sd = sub.exclusive_jets_softdrop_grooming(njets=1, beta=0.0, symmetry_cut=0.1, R0=R_JET)
    taus = ak.to_numpy(sub.njettiness(measure_definition="NormalizedMeasure",
                                      axes_definition="KT_Axes",
                                      njets=[1, 2, 3, 4], beta=1.0, R0=R_JET))  # (J, 4)
    jet = {"pt": jpt[sel], "eta": jeta[sel], "phi": jphi[sel], "energy": je[sel],
           "nparticles": nconst, "sdmass": ak.to_numpy(sd.msoftdrop),
           "tau1": taus[:, 0], "tau2": taus[:, 1], "tau3": taus[:, 2], "tau4": taus[:, 3]}
    jet = {k: np.asarray(v, np.float32) for k, v in jet.items()}
    return dict(nconst=nconst, part=part, jet=jet)


def make_charge_of(pythia):
    """PDG id -> electric charge (array), looked up once per distinct id in Pythia's table."""
    table = {}

    def charge_of(ids):
        uniq, inv = np.unique(ids, return_inverse=True)
        for i in uniq:
            if i not in table:
                table[int(i)] = pythia.particleData.charge(int(i))
        return np.array([table[int(i)] for i in uniq], np.float32)[inv]
    return charge_of


# --- one task = one output file ------------------------------------------------------------------
def generate_jets(cls, n_jets, preset, seed, mpi=False, report=None):
    """n_jets jets of one class from fresh Pythia(s) seeded with `seed` -> (nconst, part, jet)."""
    variants = VARIANTS.get(cls, [()])
    pythias = [make_pythia(cls, preset, seed + i, mpi, extra) for i, extra in enumerate(variants)]
    charge_of = make_charge_of(pythias[0])
    chunks = []
    done = 0
    events = 0
    # events per Pythia; a small first batch keeps tiny samples fast
    batch = min(100, 8 * n_jets + 8)
    while done < n_jets:
        for pythia in pythias:  # variants get the same number of events
            out = jets_from_batch(pythia.nextBatch(batch), cls, preset, charge_of)
            events += batch
            n = len(out["nconst"])
            chunks.append(out)
            if report is not None:
                report(max(0, min(n, n_jets - done)))
            done += n
        if done == 0 and events >= 5000:
            raise RuntimeError(f"{cls}: no jet passed the window and truth match in "
                               f"{events} events")
        # next batch sized from the efficiency so far (deterministic: depends only on the events)
        eff = max(done, 1) / events
        batch = int(min(2000, max(20, 1.2 * (n_jets - done) / eff / len(pythias))))
    nconst = np.concatenate([c["nconst"] for c in chunks])[:n_jets]
    n_part = int(nconst.sum())
    part = {k: np.concatenate([c["part"][k] for c in chunks])[:n_part] for k in chunks[0]["part"]}
    jet = {k: np.concatenate([c["jet"][k] for c in chunks])[:n_jets] for k in chunks[0]["jet"]}
    return nconst, part, jet


def write_root(path, cls, nconst, part, jet):
    """JetClass layout; atomic: written to path.tmp then renamed."""
    import uproot
    n = len(nconst)
    tree = {"part": ak.zip({k: ak.unflatten(part[k], nconst) for k in PART_FLOAT + PART_INT})}
    for c in CLASSES:
        tree[f"label_{c}"] = np.full(n, c == cls, dtype=label_dtype(c))
    for k in JET:
        tree[f"jet_{k}"] = jet[k]
    tmp = Path(str(path) + ".tmp")
    with uproot.recreate(tmp) as f:
        # mktree: a TTree like JetClass (assigning a dict would make uproot 5.7 write an RNTuple)
        f.mktree("tree", {k: (v.type if isinstance(v, ak.Array) else v.dtype)
                          for k, v in tree.items()})
        f["tree"].extend(tree)
    os.replace(tmp, path)


_QUEUE = None


def _init_worker(q):
    global _QUEUE
    _QUEUE = q


def run_task(task, report=None):
    """One chunk of one class: a fresh Pythia generates the jets of file k of every split
    (train, then val, then test) and writes the files that are missing."""
    cls, files, preset, seed, mpi = task
    if report is None and _QUEUE is not None:
        report = _QUEUE.put
    n_total = sum(n for _, n in files)
    nconst, part, jet = generate_jets(cls, n_total, preset, seed, mpi, report)
    jet_off = np.concatenate([[0], np.cumsum([n for _, n in files])])
    part_off = np.concatenate([[0], np.cumsum(nconst)])
    for (path, _), j0, j1 in zip(files, jet_off[:-1], jet_off[1:]):
        if not path.exists():
            p0, p1 = part_off[j0], part_off[j1]
            write_root(path, cls, nconst[j0:j1], {k: v[p0:p1] for k, v in part.items()},
                       {k: v[j0:j1] for k, v in jet.items()})
    return [path for path, _ in files]


# --- planning: classes x chunks x splits ---------------------------------------------------------
def task_seed(seed, cls, k):
    """Pythia seed in [1, 899,999,990] (Pythia takes up to 900,000,000; a chunk with several
    Pythias uses seed + i) from (seed, class, chunk index)."""
    state = np.random.SeedSequence([seed, CLASSES.index(cls), k]).generate_state(1)[0]
    return int(state % 899_999_990) + 1


def plan(out, classes, jets_per_class, seed, preset, split, jets_per_file, mpi):
    """Each class is cut into F = ceil(jets_per_class / jets_per_file) chunks; chunk k holds file
    k of train/, val/ and test/ (their split fractions of the chunk) and is one task."""
    out = Path(out)
    if preset not in PRESETS:
        raise ValueError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
    for c in classes:
        if c not in PRESETS[preset]["classes"]:
            raise ValueError(f"--classes: {c!r} is not generated by preset {preset!r} "
                             f"(allowed: {','.join(PRESETS[preset]['classes'])}; "
                             f"--preset jetclass has all ten)")
    if len(split) != 3 or min(split) < 0 or abs(sum(split) - 1) > 1e-6:
        raise ValueError(f"--split {split}: give three non-negative fractions summing to 1, "
                         f"e.g. 0.8,0.1,0.1")
    if jets_per_class < 1 or jets_per_file < 1:
        raise ValueError("--jets-per-class and --jets-per-file must be positive")
    tasks = []
    for c in classes:
        n_train = round(jets_per_class * split[0])
        n_val = min(round(jets_per_class * split[1]), jets_per_class - n_train)
        per_split = (n_train, n_val, jets_per_class - n_train - n_val)
        n_chunks = math.ceil(jets_per_class / jets_per_file)
        for k in range(n_chunks):
            files = []
            for s, n in zip(SPLITS, per_split):
                n_k = n // n_chunks + (k < n % n_chunks)  # spread evenly over the chunks
                if n_k > 0:
                    files.append((out / s / f"{PREFIX[c]}_{k:03d}.root", n_k))
            tasks.append((c, files, preset, task_seed(seed, c, k), mpi))
    return tasks


def _finished(path, n):
    """A file that exists is finished (writes are atomic); check it holds what was asked for."""
    if not path.exists():
        return False
    import uproot
    try:
        with uproot.open(path) as f:
            entries = f["tree"].num_entries
    except Exception as err:
        raise SystemExit(f"{path}: unreadable ROOT file ({err}); delete it and rerun") from None
    if entries != n:
        raise SystemExit(f"{path}: holds {entries} jets, this run asks for {n}; use another --out "
                         "or delete the old files")
    return True


def generate(out, classes=("QCD", "Tbqq"), jets_per_class=1000, seed=0, workers=1,
             preset="toptagging", split=(0.8, 0.1, 0.1), progress=True, jets_per_file=10_000,
             mpi=False):
    """Generate jets_per_class jets of each class into out/{train,val,test}/ (see the module
    docstring); files that already exist are kept. Returns the paths of all files of the sample."""
    classes = list(classes)
    tasks = plan(out, classes, jets_per_class, seed, preset, tuple(split), jets_per_file, mpi)
    todo = [t for t in tasks if not all([_finished(path, n) for path, n in t[1]])]
    for s in SPLITS:
        (Path(out) / s).mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm
    bar = tqdm(total=sum(n for t in todo for _, n in t[1]), unit="jet", desc="jetgen",
               disable=not progress)
    if workers <= 1 or len(todo) <= 1:
        for t in todo:
            run_task(t, report=bar.update)
    else:
        # a clean interpreter per worker, safe even if torch is loaded
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        with ctx.Pool(min(workers, len(todo)), initializer=_init_worker, initargs=(q,)) as pool:
            result = pool.map_async(run_task, todo, chunksize=1)
            while not result.ready():
                try:
                    bar.update(q.get(timeout=0.2))
                except queue.Empty:
                    pass
            result.get()  # re-raises a worker's error
            while not q.empty():
                bar.update(q.get())
    bar.close()
    return [path for t in tasks for path, _ in t[1]]


# --- command line --------------------------------------------------------------------------------
def get_args(argv=None):
    ap = argparse.ArgumentParser(description="Generate boosted jets with Pythia 8 + fastjet in "
                                             "the JetClass ROOT layout.")
    ap.add_argument("--out", required=True, help="output folder (gets train/ val/ test/)")
    ap.add_argument("--classes", default="QCD,Tbqq",
                    help=f"comma-separated JetClass labels or 'all' ({','.join(CLASSES)})")
    ap.add_argument("--jets-per-class", type=int, default=1000,
                    help="jets per class over all splits")
    ap.add_argument("--seed", type=int, default=0, help="master seed; same seed -> same jets")
    ap.add_argument("--workers", type=int, default=1, help="parallel processes (one Pythia each)")
    ap.add_argument("--preset", default="toptagging", choices=list(PRESETS),
                    help="jet window: toptagging = 550-650 GeV, 14 TeV, QCD/Tbqq only; "
                         "jetclass = 500-1000 GeV, 13 TeV, all ten classes")
    ap.add_argument("--split", default="0.8,0.1,0.1",
                    help="train,val,test fractions of each class")
    ap.add_argument("--jets-per-file", type=int, default=10_000,
                    help="at most this many jets per chunk; chunk k (file k of train/val/test, "
                         "one Pythia) is the unit of parallel work")
    ap.add_argument("--mpi", action="store_true",
                    help="multi-parton interactions on (about 3x slower)")
    return ap.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    classes = (CLASSES if args.classes == "all"
               else [c.strip() for c in args.classes.split(",") if c.strip()])
    try:
        split = tuple(float(x) for x in args.split.split(","))
    except ValueError:
        raise SystemExit(f"--split {args.split!r}: give three numbers, e.g. 0.8,0.1,0.1") from None
    t0 = time.time()
    try:
        paths = generate(args.out, classes, args.jets_per_class, args.seed, args.workers,
                         args.preset, split, progress=True, jets_per_file=args.jets_per_file,
                         mpi=args.mpi)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    print(f"{len(paths)} files under {args.out} ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
