"""nanojet common: everything the method scripts share, in four parts read top to bottom.

1. Data. Three sources: "pythia" (our scripts/jetgen.py output, generated on first use), "jetclass"
   (the real JetClass ROOT files) and "toptagging" (the Top Tagging reference HDF5 files). The
   readers yield ragged `Chunk`s (constituents pT-sorted, at most n_max; ParT's features).
   `JetStream` is the one path every script trains and evaluates through, for splits of any
   size: chunks read in DataLoader workers, classes interleaved, a shuffle buffer, shards per
   rank and worker, exact resume; `loader` / `train_batches` iterate it. `load_jets` reads a
   bounded sample into padded arrays (`Jets`, cached as memory-mapped .npy); `cluster_subjets`
   reclusters jets into subjets with fastjet's vectorised interface. `python -m
   scripts.download ...` (a script of its own) fetches the real datasets.
2. Model blocks. A "ParT-lite" particle transformer (`Encoder`): particle embedding, pair
   features as an attention bias, pre-norm blocks, class attention; reusable `Block`/`ClassBlock`.
3. Metrics. `roc_metrics`: accuracy, AUC, background rejection 1/eps_B at eps_S = 0.5 and 0.3.
4. Training harness. Shared flags (checked by argparse), device/DDP setup, AdamW + warm-up/
   cosine, atomic checkpoints that resume bit for bit and refuse NaN, JSON-lines log, progress bar.
"""

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# --- data: constants ------------------------------------------------------------------------

# JetClass label order; y is an index into this list (Top Tagging: 0 = QCD, 1 = top)
CLASSES = ["QCD", "Hbb", "Hcc", "Hgg", "H4q", "Hqql", "Zqq", "Wqq", "Tbqq", "Tbl"]
# JetClass file names start with the process name, e.g. TTBar_000.root
PREFIX = {"QCD": "ZJetsToNuNu", "Hbb": "HToBB", "Hcc": "HToCC", "Hgg": "HToGG", "H4q": "HToWW4Q",
          "Hqql": "HToWW2Q1L", "Zqq": "ZToQQ", "Wqq": "WToQQ", "Tbqq": "TTBar", "Tbl": "TTBarLep"}
FEATURE_NAMES = {
    "full": ["pt_log", "e_log", "logptrel", "logerel", "deltaR", "charge", "isChargedHadron",
             "isNeutralHadron", "isPhoton", "isElectron", "isMuon", "tanh_d0val", "d0err",
             "tanh_dzval", "dzerr", "deta", "dphi"],
    "kin": ["pt_log", "e_log", "logptrel", "logerel", "deltaR", "deta", "dphi"],
}
SOURCES = ("pythia", "jetclass", "toptagging")
# folder names of each split; the first is the real download's, the second jetgen's
SPLIT_DIRS = {"train": ("train_100M", "train"), "val": ("val_5M", "val"), "test": ("test_20M", "test")}
PID_BRANCHES = ["part_isChargedHadron", "part_isNeutralHadron", "part_isPhoton", "part_isElectron",
                "part_isMuon"]
# size of the embedded default sample: the quickstart must finish in minutes on 2 CPU cores
PYTHIA_JETS_PER_CLASS = 2500
CACHE_VERSION = 1  # bump when the arrays a reader produces change meaning
DATA_DIR = Path(os.environ.get("NANOJET_DATA", Path(__file__).resolve().parent / "data"))


def default_data_dir(source):
    """data/pythia, data/JetClass, data/toptagging (data/ beside common.py, or $NANOJET_DATA)."""
    return DATA_DIR / {"jetclass": "JetClass"}.get(source, source)


def cache_root(cache_dir=None):
    return Path(cache_dir or os.environ.get("NANOJET_CACHE") or DATA_DIR / "cache")


@dataclass
class Jets:
    x: np.ndarray      # float32 (N, n_max, F) standardised particle features
    p4: np.ndarray     # float32 (N, n_max, 4) (px, py, pz, E), zero in padding
    valid: np.ndarray  # bool    (N, n_max) real constituent; valid first, pT descending
    y: np.ndarray      # int64   (N,) index into CLASSES (Top Tagging: 1 = top)
    jet: np.ndarray    # float32 (N, 4) (jet_pt, jet_eta, jet_phi, jet_energy)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, idx):
        return type(self)(*(getattr(self, f.name)[idx] for f in fields(self)))


def concat(parts):
    """Concatenate Jets (or Subjets) chunks along the jet axis."""
    cls = type(parts[0])
    return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))


@dataclass
class Chunk:
    """Jets stored ragged, as the readers make them and the stream holds them: the particles of
    all jets in one flat array, jet after jet (each jet's particles pT-descending, at most n_max),
    so memory follows the real multiplicity (about 45 of 128 slots on JetClass) and a batch is
    padded only to its own longest jet. `per_jet` holds y (N,) int64, jet (N, 4) float32 and
    entry (N,) int64 (the jet's entry in its file), plus whatever the stream adds."""
    x: np.ndarray      # float32 (P, F) particle features
    p4: np.ndarray     # float32 (P, 4) (px, py, pz, E)
    n: np.ndarray      # int64   (N,) particles of each jet
    per_jet: dict      # name -> (N, ...) array

    def __len__(self):
        return len(self.n)

    def take(self, idx):
        """The jets idx (an index array), in that order."""
        idx = np.asarray(idx, dtype=np.int64)
        n = self.n[idx]
        start = (np.cumsum(self.n) - self.n)[idx]
        flat = np.repeat(start - (np.cumsum(n) - n), n) + np.arange(n.sum())
        return Chunk(self.x[flat], self.p4[flat], n, {k: v[idx] for k, v in self.per_jet.items()})

    @staticmethod
    def join(chunks):
        cat = lambda get: np.concatenate([get(c) for c in chunks])  # noqa: E731
        return Chunk(cat(lambda c: c.x), cat(lambda c: c.p4), cat(lambda c: c.n),
                     {k: cat(lambda c: c.per_jet[k]) for k in chunks[0].per_jet})

    def pad(self, length):
        """dict of padded arrays: x (N, length, F), p4 (N, length, 4), valid (N, length), and
        the per-jet arrays. length must be >= the longest jet."""
        N, F = len(self.n), self.x.shape[-1]
        valid = np.arange(length)[None, :] < self.n[:, None]
        slot = np.flatnonzero(valid)  # row-major: jet by jet, particle by particle, as x is
        x = np.zeros((N * length, F), dtype=np.float32)
        p4 = np.zeros((N * length, 4), dtype=np.float32)
        x[slot], p4[slot] = self.x, self.p4
        return dict(x=x.reshape(N, length, F), p4=p4.reshape(N, length, 4), valid=valid,
                    **self.per_jet)

    def to_jets(self, n_max):
        b = self.pad(n_max)
        return Jets(x=b["x"], p4=b["p4"], valid=b["valid"], y=b["y"], jet=b["jet"])

    @staticmethod
    def from_jets(jets, **per_jet):
        """Padded `Jets` (valid first) -> Chunk; per_jet: more (N, ...) arrays to carry."""
        valid = np.asarray(jets.valid)
        return Chunk(np.asarray(jets.x)[valid], np.asarray(jets.p4)[valid],
                     valid.sum(1).astype(np.int64),
                     dict(y=np.asarray(jets.y).astype(np.int64), jet=np.asarray(jets.jet), **per_jet))


# --- data: features -------------------------------------------------------------------------

def wrap_phi(phi):
    """Angle difference into [-pi, pi) (numpy arrays or torch tensors)."""
    return (phi + np.pi) % (2 * np.pi) - np.pi


def signed_deta(eta, jet_eta):
    """JetClass convention: deta flips sign for jets at negative eta (so it points away from
    the beam axis's nearer side in both hemispheres). Every source must use it."""
    return np.where(jet_eta >= 0, 1.0, -1.0).astype(np.float32) * (eta - jet_eta)


def kin_columns(pt, energy, deta, dphi, axis_pt, axis_energy):
    """The five ParT kinematic inputs, unclipped: log pT, log E, log pT/pT_axis, log E/E_axis and
    the distance to the axis, with ParT's shifts and scales. numpy arrays or torch tensors: the
    data layer (the jet's axis) and the methods' own frames (jjepa's context, the visible
    particles of MPM and diffmae) share these constants."""
    lib = torch if isinstance(pt, torch.Tensor) else np
    return [
        (lib.log(pt) - 1.7) * 0.7,
        (lib.log(energy) - 2.0) * 0.7,
        (lib.log(pt / axis_pt) + 4.7) * 0.7,
        (lib.log(energy / axis_energy) + 4.7) * 0.7,
        (lib.hypot(deta, dphi) - 0.2) * 4.0,
    ]


def features_flat(px, py, energy, deta, dphi, jet, extra=None, features="kin"):
    """ParT input recipe for M particles (1-D arrays); jet (M, 4) = (pt, eta, phi, E) of each
    particle's jet; extra: dict of part_charge, part_is*, part_d0val... (M,) for "full"
    (missing ones = not measured = 0). Returns float32 (M, F)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        pt = np.hypot(px, py)
        kin = kin_columns(pt, energy, deta, dphi, jet[:, 0], jet[:, 3])
    kin = [np.clip(v, -5, 5) for v in kin]  # NaN stays NaN here and becomes 0 below
    if features == "kin":
        cols = kin + [deta, dphi]
    elif features == "full":
        zero = np.zeros_like(pt)
        e = extra or {}
        get = lambda k: e.get(k, zero)  # noqa: E731
        cols = kin + [get("part_charge")] + [get(b) for b in PID_BRANCHES] + [
            np.tanh(get("part_d0val")), np.clip(get("part_d0err"), 0, 1),
            np.tanh(get("part_dzval")), np.clip(get("part_dzerr"), 0, 1), deta, dphi]
    else:
        raise ValueError(f"features must be one of {list(FEATURE_NAMES)}, got {features!r}")
    x = np.stack(cols, axis=-1).astype(np.float32)
    x[~np.isfinite(x)] = 0.0
    return x


def axis_of(p4):
    """(pt, eta, phi, E) of summed 4-vectors p4 (..., 4), torch: the axis of a frame."""
    pt = torch.hypot(p4[..., 0], p4[..., 1]).clamp(min=1e-8)
    eta = torch.asinh(p4[..., 2] / pt)
    phi = torch.atan2(p4[..., 1], p4[..., 0])
    return torch.stack([pt, eta, phi, p4[..., 3]], -1)


def in_frame(p4, axis):
    """(B, M, 3) (deta, dphi, log pT/pT_axis) of p4 (B, M, 4) in the frame axis (B, 4) = (pt, eta,
    phi, E), as the data layer makes them (JetClass deta sign, dphi wrapped); 0 where pT = 0."""
    pt = torch.hypot(p4[..., 0], p4[..., 1])
    dphi = wrap_phi(torch.atan2(p4[..., 1], p4[..., 0]) - axis[:, 2:3])
    eta = torch.asinh(p4[..., 2] / pt.clamp(min=1e-8))
    deta = torch.where(axis[:, 1:2] >= 0, 1.0, -1.0) * (eta - axis[:, 1:2])  # JetClass sign
    out = torch.stack([deta, dphi, torch.log(pt.clamp(min=1e-8) / axis[:, 0:1])], -1)
    return out.masked_fill((pt <= 0)[..., None], 0.0).float()


def refeature(x, p4, valid, axis):
    """x (B, L, F) as features_flat makes them, with what depends on the axis recomputed in the
    frame axis (B, 4): log pT/pT_axis, log E/E_axis, the distance to the axis, and (deta, dphi).
    The particle's own log pT, log E, charge, ID and impact parameters stay. 0 in padding."""
    p4 = p4.float()
    d = in_frame(p4, axis)  # (B, L, 3)
    pt = torch.hypot(p4[..., 0], p4[..., 1]).clamp(min=1e-8)
    energy = p4[..., 3].clamp(min=1e-8)
    rel = kin_columns(pt, energy, d[..., 0], d[..., 1], axis[:, 0:1], axis[:, 3:4])[2:]
    rel = torch.stack(rel, -1).clamp(-5, 5)
    new = torch.cat([x[..., :2].float(), rel, x[..., 5:-2].float(), d[..., :2]], -1)
    return torch.where(valid[..., None], new, 0.0).to(x.dtype)


MAX_ENERGY = 1e5     # GeV (100 TeV): beyond any collider jet; 1e20 squared overflows fp32
BAD_FRACTION = 0.1   # a file with more bad constituents than this is rejected, not cleaned


def physical_mask(px, py, pz, energy):
    """True for a physical constituent: |p| and E at most MAX_ENERGY, E >= 0 and E >= |p|
    (mass^2 >= 0) up to float32 rounding (massless particles have E == |p|; relative 1e-3 plus
    1e-4 GeV absolute). Computed in float64, so huge inputs neither overflow nor warn."""
    px, py, pz, e = (np.asarray(v, dtype=np.float64) for v in (px, py, pz, energy))
    with np.errstate(invalid="ignore", over="ignore"):
        p = np.sqrt(px * px + py * py + pz * pz)
        return (p <= MAX_ENERGY) & (e <= MAX_ENERGY) & (e >= 0) & (e + 1e-3 * p + 1e-4 >= p)


def assemble(parts, counts, jet, y, n_max, features, drops, entry=None, where="input"):
    """The one place where every reader's output becomes jets (a ragged `Chunk`).
    parts: dict of flat per-particle arrays, jet by jet (part_px, part_py, part_pz,
    part_energy, part_deta, part_dphi, optional extras), counts (N,), jet (N, 4), y (N,).
    Drops non-finite and unphysical constituents (physical_mask) and then empty jets, counting
    both in `drops`; stops when more than BAD_FRACTION of the constituents of `where` (the file
    and entries read) are bad. Sorts each jet's constituents by pT (descending) and keeps the
    first n_max. entry (N,): each jet's entry number in its file (default 0..N-1), kept for the
    jets that survive."""
    counts = np.asarray(counts, dtype=np.int64)
    row = np.repeat(np.arange(len(counts)), counts)
    finite = np.ones(len(row), dtype=bool)
    for v in parts.values():
        finite &= np.isfinite(v)
    physical = physical_mask(*(parts[k] for k in ("part_px", "part_py", "part_pz", "part_energy")))
    drops["unphysical"] = drops.get("unphysical", 0) + int((finite & ~physical).sum())
    finite &= physical
    n_bad = int((~finite).sum())
    if n_bad > BAD_FRACTION * len(row):
        raise SystemExit(f"{where}: {n_bad} of {len(row)} constituents are NaN/inf or unphysical "
                         f"(|p| or E above {MAX_ENERGY:g} GeV, E < 0 or E < |p|); the file is "
                         "corrupt or not in GeV")
    drops["constituents"] += n_bad
    if not finite.all():
        parts = {k: v[finite] for k, v in parts.items()}
        row = row[finite]
        counts = np.bincount(row, minlength=len(counts))
    keep = counts > 0
    drops["jets"] += int((~keep).sum())
    row = (np.cumsum(keep) - 1)[row]  # renumber: empty jets own no particles
    counts, jet, y = counts[keep], jet[keep].astype(np.float32), y[keep].astype(np.int64)
    # sort each jet's particles by pT, descending (awkward sorts every list in one C++ call;
    # np.lexsort on (jet, -pT) is 6x slower), then keep the first n_max of each jet
    import awkward as ak
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    pt = np.hypot(parts["part_px"], parts["part_py"])
    local = ak.argsort(ak.unflatten(pt, counts), ascending=False, stable=True)
    order = ak.to_numpy(ak.flatten(local)) + starts
    col = np.arange(len(row)) - starts           # position within the jet after sorting
    sel = order[col < n_max]
    parts = {k: v[sel] for k, v in parts.items()}
    row = row[sel]
    p4 = np.stack([parts[k] for k in ("part_px", "part_py", "part_pz", "part_energy")], -1)
    x = features_flat(parts["part_px"], parts["part_py"], parts["part_energy"], parts["part_deta"],
                      wrap_phi(parts["part_dphi"]), jet[row], parts, features)
    entry = np.arange(len(keep)) if entry is None else np.asarray(entry)
    return Chunk(x, p4.astype(np.float32), np.minimum(counts, n_max),
                 dict(y=y, jet=jet, entry=entry[keep].astype(np.int64)))


# --- data: readers --------------------------------------------------------------------------
# Each reader opens one file and yields `Jets` chunks for entries [start, stop).

KIN_BRANCHES = ["part_px", "part_py", "part_pz", "part_energy", "part_deta", "part_dphi"]
FULL_BRANCHES = KIN_BRANCHES + ["part_charge"] + PID_BRANCHES + [
    "part_d0val", "part_d0err", "part_dzval", "part_dzerr"]
JET_BRANCHES = ["jet_pt", "jet_eta", "jet_phi", "jet_energy"]


def _open_root(path):
    import uproot
    try:
        tree = uproot.open(path)["tree"]
        tree.num_entries  # noqa: B018 (forces the header to be read)
        return tree
    except Exception as e:  # uproot raises many types; the user needs the file name
        raise SystemExit(f"{path}: not a readable JetClass ROOT file with a 'tree' "
                         f"({type(e).__name__}: {e}); the file may be truncated, download it again")


@functools.lru_cache(maxsize=64)
def _open_root_cached(path, pid, mtime, size):
    """An open tree per file and process (opening costs ~20 ms; a stream reads each file in
    many chunks). The pid in the key keeps forked loader workers from sharing a parent's handle;
    mtime and size make a rewritten file a new key."""
    return _open_root(path)


def _num_entries(source, path):
    if source == "toptagging":
        f, table = _open_h5(path)
        with f:
            return table.shape[0]
    return _open_root(path).num_entries


def read_root(path, start, stop, n_max, features, drops, step=50_000):
    """JetClass layout (real files and jetgen output)."""
    import awkward as ak
    try:
        st = os.stat(path)
    except OSError as e:  # deleted or moved while the run reads it
        raise SystemExit(f"{path}: cannot be read any more ({e.strerror}); the file was moved or "
                         "deleted during the run: put it back and --resume from the last "
                         "checkpoint") from None
    tree = _open_root_cached(str(path), os.getpid(), st.st_mtime_ns, st.st_size)
    names = set(tree.keys())
    # uproot >= 5.7 writes a record "part" as an RNTuple field part.px (real JetClass files
    # are TTrees with branches part_px): accept both, addressed by the TTree names
    nested = "part_px" not in names and "part" in names
    if nested:
        names |= {f"part_{k}" for k in tree.arrays(["part"], entry_stop=1)["part"].fields}
    branches = (FULL_BRANCHES if features == "full" else KIN_BRANCHES) + JET_BRANCHES
    for b in branches:
        if b not in names:
            raise SystemExit(f"{path}: branch '{b}' is missing (expected the JetClass layout)")
    # label dtypes differ per branch in the real files (float, bool, int32): cast each one
    labels = [f"label_{c}" for c in CLASSES if f"label_{c}" in names]
    if not labels:
        raise SystemExit(f"{path}: no label_* branch found (expected label_QCD ... label_Tbl)")
    label_idx = np.array([CLASSES.index(b[6:]) for b in labels])
    for a in range(start, stop, step):
        try:
            read = [b for b in branches + labels if not (nested and b.startswith("part_"))]
            arr = tree.arrays(read + ["part"] * nested, entry_start=a,
                              entry_stop=min(a + step, stop))
        except Exception as e:
            raise SystemExit(f"{path}: cannot read entries {a}-{min(a + step, stop)} "
                             f"({type(e).__name__}: {e}); the file may be truncated or corrupt")
        col = lambda b: arr["part", b[5:]] if nested and b.startswith("part_") else arr[b]  # noqa: E731
        where = f"{path} (entries {a}-{min(a + step, stop)})"
        counts, parts = None, {}
        for b in (b for b in branches if b.startswith("part_")):
            v = col(b)
            if v.ndim != 2 or v.layout.purelist_depth != 2:
                raise SystemExit(f"{path}: branch '{b}' has type {v.type.content}, expected a "
                                 "variable-length list of numbers per jet (the JetClass layout)")
            n = ak.to_numpy(ak.num(v))
            if counts is None:
                counts = n
            elif (n != counts).any():
                raise SystemExit(f"{path}: branch '{b}' has another number of particles than "
                                 f"'{branches[0]}' in {int((n != counts).sum())} of {len(n)} jets")
            parts[b] = ak.to_numpy(ak.flatten(v)).astype(np.float32)
        for b in JET_BRANCHES + labels:
            if arr[b].ndim != 1:
                raise SystemExit(f"{path}: branch '{b}' has type {arr[b].type.content}, expected "
                                 "one number per jet")
        jet = np.stack([ak.to_numpy(arr[b]).astype(np.float32) for b in JET_BRANCHES], -1)
        onehot = np.stack([ak.to_numpy(arr[b]).astype(np.float32) for b in labels], -1)
        _check_onehot(onehot, where)
        y = label_idx[onehot.argmax(-1)]
        yield assemble(parts, counts, jet, y, n_max, features, drops,
                       np.arange(a, a + len(y)), where)


def _check_onehot(onehot, where):
    """Each jet has exactly one label set: a jet with none would silently become class 0."""
    n_set = (onehot != 0).sum(-1)
    if (n_set != 1).any():
        raise SystemExit(f"{where}: labels must be one-hot, but {int((n_set == 0).sum())} jets "
                         f"have no label_* set and {int((n_set > 1).sum())} have several "
                         f"(of {len(n_set)} jets)")


BLOSC_FILTERS = {32001: "blosc", 32026: "blosc2"}


def _open_h5(path):
    import h5py
    try:
        import hdf5plugin  # noqa: F401 (registers blosc & co. with h5py when installed)
    except ImportError:
        pass
    try:
        f = h5py.File(path, "r")
        table = f["table/table"]
    except KeyError:
        raise SystemExit(f"{path}: no dataset 'table/table' (expected the Top Tagging pandas "
                         "layout)") from None
    except Exception as e:
        raise SystemExit(f"{path}: not a readable HDF5 file ({type(e).__name__}: {e}); the "
                         "file may be truncated, download it again") from None
    plist = table.id.get_create_plist()
    for i in range(plist.get_nfilters()):
        code = plist.get_filter(i)[0]
        if code in BLOSC_FILTERS and not h5py.h5z.filter_avail(code):
            raise SystemExit(f"{path} is {BLOSC_FILTERS[code]}-compressed and h5py cannot "
                             "decompress it: pip install hdf5plugin")
    return f, table


def _h5_columns(table, block):
    """Column names of a pandas values_block (stored as a protocol-0 pickle of a list of str;
    parsed as text so that no pickle from a data file is ever executed)."""
    kind = table.attrs.get(f"{block}_kind")
    if kind is None:
        return None
    text = kind.decode() if isinstance(kind, bytes) else str(kind)
    lines = (line.lstrip("a(") for line in text.split("\n"))  # "(lp0", "VE_0", "p1", "aVPX_0"...
    return [line[1:] for line in lines if line.startswith("V")]


def read_h5(path, start, stop, n_max, features, drops, step=50_000):
    """Top Tagging reference dataset: 200 (E, px, py, pz) per jet, zero-padded."""
    f, table = _open_h5(path)
    names0 = _h5_columns(table, "values_block_0")
    names1 = _h5_columns(table, "values_block_1")
    n_const = 200 if names0 is None else sum(n.startswith("E_") for n in names0)
    if names0 is not None and names0[:4] != ["E_0", "PX_0", "PY_0", "PZ_0"]:
        raise SystemExit(f"{path}: unexpected columns {names0[:4]} (expected E_0 PX_0 PY_0 PZ_0)")
    label_col = 1 if names1 is None else names1.index("is_signal_new") \
        if "is_signal_new" in names1 else None
    if label_col is None:
        raise SystemExit(f"{path}: column 'is_signal_new' is missing in values_block_1")
    with f:
        for a in range(start, stop, step):
            b = min(a + step, stop)
            try:
                block0 = table.fields("values_block_0")[a:b]
                y = table.fields("values_block_1")[a:b][:, label_col]
            except Exception as e:
                raise SystemExit(f"{path}: cannot read rows {a}-{b} ({type(e).__name__}: {e}); "
                                 "the file may be truncated or corrupt") from None
            if block0.ndim != 2 or block0.shape[1] < 4 * n_const:
                raise SystemExit(f"{path}: values_block_0 has shape {block0.shape}, expected "
                                 f"(N, >= {4 * n_const}) for {n_const} constituents x (E, px, py, pz)")
            if not np.isin(y, (0, 1)).all():
                raise SystemExit(f"{path}: is_signal_new must be 0 or 1, but {int((~np.isin(y, (0, 1))).sum())} "
                                 f"of {len(y)} jets in rows {a}-{b} hold other values")
            const = block0[:, :4 * n_const].reshape(len(block0), n_const, 4)  # (N, 200, E/px/py/pz)
            present = const[..., 0] != 0  # zero padding; NaN rows stay and are dropped later
            counts = present.sum(1)
            e, px, py, pz = (const[..., i][present] for i in range(4))
            # the jet is the constituent sum (the file stores no jet observables)
            with np.errstate(all="ignore"):
                s = np.nansum(np.where(present[..., None], const, 0), axis=1)  # (N, 4) E,px,py,pz
                jet_pt = np.hypot(s[:, 1], s[:, 2])
                jet_eta = np.arcsinh(s[:, 3] / jet_pt)
                jet_phi = np.arctan2(s[:, 2], s[:, 1])
                pt = np.hypot(px, py)
                eta = np.arcsinh(pz / pt)
                phi = np.arctan2(py, px)
            jet = np.stack([jet_pt, jet_eta, jet_phi, s[:, 0]], -1)
            row = np.repeat(np.arange(len(counts)), counts)
            parts = {"part_px": px, "part_py": py, "part_pz": pz, "part_energy": e,
                     "part_deta": signed_deta(eta, jet_eta[row]),
                     "part_dphi": wrap_phi(phi - jet_phi[row])}
            yield assemble(parts, counts, jet, y, n_max, features, drops, np.arange(a, b),
                           f"{path} (rows {a}-{b})")


READERS = {"pythia": read_root, "jetclass": read_root, "toptagging": read_h5}


# --- data: finding files --------------------------------------------------------------------

def _missing(source, searched, root, split):
    cmd = {"pythia": f"python -m scripts.jetgen --out {root}  (or leave path=None for the default sample)",
           "jetclass": f"python -m scripts.download jetclass --split {split} --dir {root}",
           "toptagging": f"python -m scripts.download toptagging --dir {root}"}[source]
    return f"no {source} data found at {searched}; get it with: {cmd}"


def find_files(source, path=None, split="train", classes=None):
    """The files of one split, sorted; for jetclass/pythia only those of `classes`."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if split not in SPLIT_DIRS:
        raise ValueError(f"split must be one of {list(SPLIT_DIRS)}, got {split!r}")
    if path is None and source == "pythia":
        ensure_pythia()
    root = Path(path) if path is not None else default_data_dir(source)
    if source == "toptagging":
        if classes is not None:
            raise ValueError("classes= selects JetClass processes; toptagging has QCD and top only")
        f = root if root.suffix == ".h5" else root / f"{split}.h5"
        if not f.is_file():
            raise SystemExit(_missing(source, f, f.parent, split))
        return [f]
    if root.is_dir() and any(root.glob("*.root")):
        folder = root  # a split folder given directly
    else:
        found = [root / d for d in SPLIT_DIRS[split] if (root / d).is_dir()]
        if not found:
            searched = root / SPLIT_DIRS[split][source == "pythia"]
            raise SystemExit(_missing(source, searched, root, split))
        folder = found[0]
    unknown = set(classes or []) - set(CLASSES)
    if unknown:
        raise ValueError(f"unknown classes {sorted(unknown)}; choose from {CLASSES}")
    # "TTBar_" must not match "TTBarLep_000.root": match the prefix with its underscore
    prefixes = tuple(PREFIX[c] + "_" for c in (classes or CLASSES))
    files = sorted(f for f in folder.glob("*.root") if f.name.startswith(prefixes))
    if not files:
        raise SystemExit(_missing(source, folder, root, split) + f" (no files for {classes or 'any class'})")
    return files


def ensure_pythia():
    """Embedded default: generate data/pythia once (QCD vs Tbqq in the Top Tagging window)."""
    out = default_data_dir("pythia")
    done = out / ".complete"  # written last: an interrupted generation resumes next time
    if done.exists():
        return out
    try:
        from scripts.jetgen import generate
    except ImportError as e:
        raise SystemExit(f"the default data (--data pythia) is generated by scripts/jetgen.py, which is not "
                         f"importable ({e}): copy scripts/jetgen.py too, or use --data "
                         "toptagging or --data jetclass with --data-dir") from None
    print(f"generating the embedded default sample in {out} (once; a few minutes on 2 cores)")
    generate(out, classes=("QCD", "Tbqq"), jets_per_class=PYTHIA_JETS_PER_CLASS, seed=0,
                    workers=os.cpu_count(), preset="toptagging")
    done.write_text(json.dumps(dict(classes=["QCD", "Tbqq"], jets_per_class=PYTHIA_JETS_PER_CLASS,
                                    seed=0, preset="toptagging")))
    return out


def _budget(n_jets, n_files):
    """Spread n_jets over the class files so a subset stays balanced: n_jets // n_files each."""
    if n_jets is None:
        return [None] * n_files
    return [n_jets // n_files + (i < n_jets % n_files) for i in range(n_files)]


def _warn_empty(files, entries, where):
    """A file with 0 jets (a tree written empty, an interrupted copy) is skipped, and said so
    once at the start: it may hold a class the run then silently lacks."""
    empty = [str(f) for f, e in zip(files, entries) if e == 0]
    if empty:
        warnings.warn(f"{where}: {len(empty)} file(s) hold 0 jets and are skipped: "
                      f"{', '.join(empty[:3])}{' ...' if len(empty) > 3 else ''}; remove them, "
                      "or download or generate them again", stacklevel=3)


def _warn_drops(drops, where):
    if drops["constituents"] or drops["jets"]:
        unphysical = drops.get("unphysical", 0)
        warnings.warn(f"{where}: dropped {drops['constituents']} constituents with NaN/inf or "
                      f"unphysical values ({unphysical} unphysical: |p| or E above "
                      f"{MAX_ENERGY:g} GeV, E < 0 or E < |p|) and {drops['jets']} jets with no "
                      "constituents", stacklevel=3)


# --- data: cache ----------------------------------------------------------------------------
# A cache entry is a folder data/cache/<hash>/ of .npy files plus meta.json, written to a
# temporary folder and renamed, so a crash never leaves a half-written entry behind.

def cache_key(**items):
    blob = json.dumps({"version": CACHE_VERSION, **items}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _file_ids(files):
    return [(str(Path(f).resolve()), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: the process exists but is not ours
        return True
    return True


def remove_stale_tmp(folder):
    """Remove what killed writers left in `folder`: cache folders `.<key>.tmp<PID>` and files
    `<name>.<PID>.tmp` whose process is gone, and `*.tmp` files that name no process. The
    files of a writer that is still running are kept."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in folder.glob("*.tmp*"):
        m = re.search(r"\.tmp(\d+)$", p.name) or re.search(r"\.(\d+)\.tmp$", p.name)
        if m is None and not p.name.endswith(".tmp"):
            continue
        if m is not None and _pid_alive(int(m.group(1))):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _tmp_path(path):
    """A temporary name beside `path` that names this process (see remove_stale_tmp)."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def cache_load(cls, key, cache_dir=None):
    """The cached entry `key` as a `cls` of memory-mapped arrays, or None when there is none.
    An entry that fails its checks (meta.json missing or unreadable, an array missing, short
    or unreadable, a shape or dtype other than meta.json's) is removed, with a one-line
    warning, so the caller rebuilds it."""
    folder = cache_root(cache_dir) / key
    if not folder.exists():
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text())
        shapes, dtypes = meta["shapes"], meta["dtypes"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return _cache_broken(folder, f"no valid meta.json ({type(e).__name__})")
    arrays = []
    for f in fields(cls):
        try:
            a = np.load(folder / f"{f.name}.npy", mmap_mode="r")
        except Exception as e:  # short file: ValueError (mmap length), bad header: many types
            return _cache_broken(folder, f"{f.name}.npy unreadable ({type(e).__name__}: {e})")
        if list(a.shape) != shapes.get(f.name) or str(a.dtype) != dtypes.get(f.name):
            return _cache_broken(folder, f"{f.name}.npy is {a.dtype}{list(a.shape)}, meta.json "
                                         f"says {dtypes.get(f.name)}{shapes.get(f.name)}")
        arrays.append(a)
    return cls(*arrays)


def _cache_broken(folder, why):
    warnings.warn(f"cache entry {folder} is broken ({why}): rebuilding it", stacklevel=3)
    shutil.rmtree(folder, ignore_errors=True)
    return None


def cache_save(obj, key, meta, cache_dir=None):
    """Write `obj` (a dataclass of arrays) as the cache entry `key` and return it memory-mapped.
    meta.json records each array's shape and dtype, which cache_load checks."""
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(root)
    tmp = root / f".{key}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    arrays = {f.name: np.ascontiguousarray(getattr(obj, f.name)) for f in fields(obj)}
    for name, a in arrays.items():
        np.save(tmp / f"{name}.npy", a)
    meta = dict(meta, shapes={k: list(a.shape) for k, a in arrays.items()},
                dtypes={k: str(a.dtype) for k, a in arrays.items()})
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    dest = root / key
    for _ in range(2):
        try:
            os.replace(tmp, dest)
            break
        except OSError:
            # dest exists: another process finished the same entry first (keep theirs), or it
            # is a broken entry, which cache_load removes before the second try
            if (hit := cache_load(type(obj), key, cache_dir)) is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                return hit
    shutil.rmtree(tmp, ignore_errors=True)
    if (hit := cache_load(type(obj), key, cache_dir)) is None:
        raise SystemExit(f"{dest}: cannot write the cache entry; check the disk, or point "
                         "NANOJET_CACHE at another folder")
    return hit


# --- data: public entry points --------------------------------------------------------------

def load_jets(source, path=None, split="train", n_jets=None, n_max=128, features="kin",
              classes=None, cache=True, cache_dir=None):
    """Read one split into memory (or memory-map it from the cache) as `Jets`.
    source: "pythia" | "jetclass" | "toptagging"; path None -> default_data_dir(source).
    n_jets: total jets, spread evenly over the class files (None = all). classes: JetClass
    names to keep (jetclass/pythia). cache: reuse/write data/cache (or cache_dir, or
    $NANOJET_CACHE). Jets keep the file order (class by class): shuffle before training."""
    if features not in FEATURE_NAMES:
        raise ValueError(f"features must be one of {list(FEATURE_NAMES)}, got {features!r}")
    if n_jets is not None and n_jets <= 0:
        raise ValueError(f"n_jets must be positive (or None for all), got {n_jets}")
    files = find_files(source, path, split, classes)
    key = cache_key(source=source, files=_file_ids(files), split=split, n_jets=n_jets,
                    n_max=n_max, features=features, classes=classes)
    if cache and (hit := cache_load(Jets, key, cache_dir)) is not None:
        return hit
    drops = {"constituents": 0, "jets": 0}
    chunks = []
    entries = [_num_entries(source, f) for f in files]
    _warn_empty(files, entries, f"{source} {split}")
    for f, n, total in zip(files, _budget(n_jets, len(files)), entries):
        stop = total if n is None else min(n, total)
        chunks += [c.to_jets(n_max) for c in READERS[source](f, 0, stop, n_max, features, drops)]
    _warn_drops(drops, f"{source} {split}")
    if not chunks:  # every file empty (a 0-entry tree), or n_jets below the number of files
        raise SystemExit(f"{source} {split}: no jets read from {len(files)} file(s) "
                         f"({', '.join(str(f) for f in files[:3])}{' ...' if len(files) > 3 else ''})"
                         + (f" with n_jets={n_jets}" if n_jets is not None else "; the files are empty"))
    jets = concat(chunks)
    if cache:
        meta = dict(source=source, files=[str(f) for f in files], split=split, n_jets=n_jets,
                    n_max=n_max, features=features, classes=classes, n=len(jets))
        jets = cache_save(jets, key, meta, cache_dir)
    return jets


# --- data: streaming --------------------------------------------------------------------------
# Training and evaluation read every split through `JetStream`, whatever its size: files are
# read in chunks inside DataLoader workers, so memory is bounded by the shuffle buffer, never by
# the split (JetClass train is 100M jets, about 1 TB padded). One epoch is planned from the
# files' metadata alone (entry counts; nothing is decompressed):
#   1. units: each file's used entries [0, budget) cut into chunks of `chunk` jets;
#   2. order: JetClass files hold one class each, so the units are interleaved class by class
#      (each class's units in random order, spread evenly over the epoch with a random jitter):
#      any stretch of the epoch holds the classes in the split's proportions;
#   3. shards: the epoch is one long sequence of jets; rank r takes the r-th of world_size equal
#      parts (the tail smaller than one global batch is dropped), and worker w of that rank takes
#      a contiguous share of its batches; so no jet is read twice and none is skipped, and since
#      the unit order changes with the epoch, so do the shards;
#   4. mixing: each worker pours its units through a shuffle buffer of shuffle_buffer / workers
#      jets and draws its batches from it.
# Every random choice comes from (seed, epoch, rank, worker): a resumed run replays the epoch up
# to where it stopped (reading, not training) and continues bit for bit.


def seed_of(*keys):
    """One 63-bit seed from what a generator is for, e.g. seed_of(args.seed, "masks", rank):
    every random stream in nanojet is seeded this way, so no two of them can collide (as
    seed*1000+rank and seed*1000+epoch did). keys: non-negative ints and strings."""
    ints = [k if isinstance(k, int) else int.from_bytes(hashlib.sha1(str(k).encode()).digest()[:4],
                                                        "little") for k in keys]
    return int(np.random.SeedSequence(ints).generate_state(1, np.uint64)[0] >> 1)


def generator(*keys):
    """A CPU torch.Generator seeded with seed_of(*keys) (masks, augmentations, noise)."""
    return torch.Generator().manual_seed(seed_of(*keys))


def _class_of(path):
    """The class prefix of a JetClass-layout file (TTBar of TTBar_012.root): the stratum."""
    return Path(path).name.rsplit("_", 1)[0]


class JetStream(torch.utils.data.IterableDataset):
    """Padded batches (dicts of CPU tensors) of one epoch of a split, for one rank.

    data: a source name ("pythia" | "jetclass" | "toptagging", read from files under `path`) or
    a `Jets` already in memory (small labelled sets, tests). n_jets caps the jets per epoch,
    spread evenly over the class files. extra: per-jet arrays (name -> (N, ...)) added to the
    batches of an in-memory source (e.g. finetune's labels). transform(batch) -> batch runs in
    the worker on each padded numpy batch (J-JEPA clusters its subjets there). pad: "batch" cuts
    the particle axis to the batch's longest jet, rounded up to 16 (few compiled shapes);
    "n_max" keeps n_max slots (JetCLR's collinear splits fill the free ones).
    Batches hold x (B, L, F), p4 (B, L, 4), valid (B, L), y (B,), jet (B, 4) and source (B, 2)
    = (file index, entry), which names the file and entry of every jet."""

    def __init__(self, data, split="train", *, path=None, n_jets=None, n_max=128, features="kin",
                 classes=None, batch_size=256, seed=0, shuffle=True, drop_last=True, rank=0,
                 world_size=1, shuffle_buffer=100_000, workers=0, chunk=None, extra=None,
                 transform=None, pad="batch"):
        super().__init__()
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.rank, self.world_size, self.transform, self.pad = rank, world_size, transform, pad
        self.n_max, self.features, self.extra, self.workers = n_max, features, extra or {}, workers
        self.buffer = max(shuffle_buffer // max(workers, 1), 2 * batch_size) if shuffle else batch_size
        if isinstance(data, Jets):
            self.source, self.files, self.identity = None, ["memory"], None
            self.jets = data if n_jets is None else data[:n_jets]
            self.counts = [len(self.jets)]
        else:
            if features not in FEATURE_NAMES:
                raise ValueError(f"features must be one of {list(FEATURE_NAMES)}, got {features!r}")
            self.source, self.jets = data, None
            self.files = find_files(data, path, split, classes)
            entries = [_num_entries(data, f) for f in self.files]
            # what defines the data, wherever it lies: resume compares it with the checkpoint's
            self.identity = [[Path(f).name, os.stat(f).st_size, e]
                             for f, e in zip(self.files, entries)]
            _warn_empty(self.files, entries, f"{data} {split}")
            self.counts = [min(n, total) if n is not None else total for n, total in
                           zip(_budget(n_jets, len(self.files)), entries)]
        self.n = sum(self.counts)  # jets per epoch
        # units small enough that a worker's buffer holds ~16 of them (mixing), large enough
        # that a read decompresses whole baskets
        self.chunk = chunk or int(np.clip(self.buffer // 16, 256, 10_000))
        per_rank = self.n // world_size
        self.steps = per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)
        self.jets_per_rank = self.steps * batch_size if drop_last else per_rank
        if self.steps == 0:
            raise SystemExit(f"{self.n} {split} jets are fewer than one step needs (--batch-size "
                             f"{batch_size} x {world_size} processes): lower --batch-size or use "
                             "more jets")
        self.epoch, self.start = 0, 0
        if self.source is not None and split != "train":
            # evaluation reads these jets only after the first epoch: a broken val or test file
            # must cost seconds at the start, not a trained epoch
            for _ in self._reads(self.units(0), 0, self.n, {"constituents": 0, "jets": 0}):
                pass

    def __len__(self):
        return self.steps  # batches per epoch on this rank

    def set_epoch(self, epoch, start=0):
        """Plan `epoch`, skipping its first `start` batches (resume)."""
        self.epoch, self.start = epoch, start
        return self

    def units(self, epoch):
        """The epoch's reading units (file index, first entry, stop entry), in reading order."""
        if self.jets is not None:  # in memory: single jets in a random order
            return None
        units = [(i, a, min(a + self.chunk, c)) for i, c in enumerate(self.counts)
                 for a in range(0, c, self.chunk)]
        if not self.shuffle:
            return units
        rng = np.random.default_rng(seed_of(self.seed, "units", epoch))
        stratum = [_class_of(self.files[u[0]]) for u in units]
        key = np.empty(len(units))
        for s in sorted(set(stratum)):
            mine = np.flatnonzero([t == s for t in stratum])
            k = rng.permutation(len(mine))
            key[mine] = (k + rng.random(len(mine))) / len(mine)
        return [units[i] for i in np.argsort(key, kind="stable")]

    def _reads(self, units, lo, hi, drops):
        """Chunks holding jets [lo, hi) of the epoch's sequence, each tagged with its file."""
        if units is None:  # in memory: a permutation of single jets
            order = (np.random.default_rng(seed_of(self.seed, "order", self.epoch)).permutation(self.n)
                     if self.shuffle else np.arange(self.n))
            for a in range(lo, hi, self.chunk):
                idx = np.sort(order[a:min(a + self.chunk, hi)])  # sorted: reads a memmap in order
                yield Chunk.from_jets(self.jets[idx], entry=idx, file=np.zeros(len(idx), np.int64),
                                      **{k: np.asarray(v)[idx] for k, v in self.extra.items()})
            return
        ends = np.cumsum([b - a for _, a, b in units])
        for u in range(int(np.searchsorted(ends, lo, side="right")), len(units)):
            i, a, b = units[u]
            begin = ends[u] - (b - a)
            if begin >= hi:
                break
            read = READERS[self.source](self.files[i], a + max(lo - begin, 0),
                                        a + min(hi - begin, b - a), self.n_max, self.features,
                                        drops, step=self.chunk)
            while True:
                try:
                    c = next(read)
                except StopIteration:
                    break
                except Exception as e:  # noqa: BLE001  (the readers name their own errors)
                    raise SystemExit(f"{self.files[i]}: cannot be read ({type(e).__name__}: "
                                     f"{e}); the file may be truncated, corrupt or gone: replace "
                                     "it and --resume from the last checkpoint") from None
                c.per_jet["file"] = np.full(len(c), i, dtype=np.int64)
                yield c

    def __iter__(self):
        if torch.utils.data.get_worker_info() is None:
            yield from self._batches()
            return
        # in a loader worker, a reader's one-line SystemExit would kill the process and reach the
        # user as DataLoader's "worker exited unexpectedly" traceback: pass it on as a batch
        try:
            yield from self._batches()
        except SystemExit as e:
            yield {"error": str(e.code)}

    def _batches(self):
        info = torch.utils.data.get_worker_info()
        workers, w = (1, 0) if info is None else (info.num_workers, info.id)
        # the DataLoader takes batches from its workers in turn, starting with worker 0, so batch
        # k of the epoch comes from worker k % workers. After skipping `start` batches (resume)
        # worker 0 must play the part of worker start % workers.
        w = (w + self.start) % workers
        n_mine = len(range(w, self.steps, workers))
        skip = len(range(w, min(self.start, self.steps), workers))
        # this worker reads a contiguous share of the rank's jets: n_mine batches' worth
        first = sum(len(range(v, self.steps, workers)) for v in range(w)) * self.batch_size
        lo = self.rank * self.jets_per_rank + first
        hi = self.rank * self.jets_per_rank + min(first + n_mine * self.batch_size, self.jets_per_rank)
        rng = np.random.default_rng(seed_of(self.seed, "buffer", self.epoch, self.rank, w))
        drops = {"constituents": 0, "jets": 0}
        B, made = self.batch_size, 0
        keep = self.buffer // 2 if self.shuffle else 0   # jets left in the buffer after a draw

        def draw(chunks, final=False):
            """Yield batches drawn at random from the buffered chunks (emptying the list); return
            the jets that stay in the buffer. At most two copies of the buffer exist at once."""
            nonlocal made
            buf = Chunk.join(chunks)
            chunks.clear()
            idx = rng.permutation(len(buf)) if self.shuffle else np.arange(len(buf))
            k = len(buf) if final else (len(buf) - keep) // B * B
            out, rest = buf.take(idx[:k]), buf.take(idx[k:])  # one copy; batches are slices
            del buf
            ends = np.concatenate([[0], np.cumsum(out.n)])
            for a in range(0, k, B):
                b = min(a + B, k)
                if b - a < B and self.drop_last:
                    break
                made += 1
                if made > skip:  # skipped batches (resume) are read and drawn, never padded
                    yield self._collate(Chunk(out.x[ends[a]:ends[b]], out.p4[ends[a]:ends[b]],
                                              out.n[a:b], {name: v[a:b] for name, v in
                                                           out.per_jet.items()}))
            return rest

        buf, size = [], 0  # chunks read and not yet drawn from
        for chunk in self._reads(self.units(self.epoch), lo, hi, drops):
            buf.append(chunk)
            size += len(chunk)
            if size >= keep + B and size >= self.buffer:  # full: one concatenation per draw
                rest = yield from draw(buf)
                buf, size = [rest], len(rest)
        tail = list(buf)
        if size:
            yield from draw(buf, final=True)
        if drops["constituents"] or drops["jets"]:
            _warn_drops(drops, f"{self.source} (rank {self.rank}, worker {w})")
        # a reader that dropped jets (NaN, empty) leaves this worker short: repeat jets it has
        # read, so that every rank still takes the same number of steps (DDP would hang)
        last = Chunk.join(tail) if self.drop_last and made < n_mine and size else None
        while last is not None and made < n_mine:
            yield from draw([last.take(rng.integers(0, len(last), B))], final=True)

    def _collate(self, c):
        longest = max(1, math.ceil(int(c.n.max()) / 16)) * 16
        batch = c.pad(self.n_max if self.pad == "n_max" else min(self.n_max, longest))
        batch["source"] = np.stack([batch.pop("file"), batch.pop("entry")], -1)
        if self.transform is not None:
            batch = self.transform(batch)
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}

    def describe(self, source):
        """'<file> entry <e>' of a jet, from its row of a batch's `source` (B, 2)."""
        i, e = (int(v) for v in source)
        return f"{self.files[i]} entry {e}"


def loader(stream, device, epoch=0, start=0):
    """Batches of one epoch of `stream` on `device`, skipping the first `start` (resume). With
    stream.workers > 0 they are made in DataLoader worker processes (prefetched, pinned for
    CUDA); with 0, in this process."""
    stream.set_epoch(epoch, start)
    if stream.workers > 0:
        stream = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=stream.workers, pin_memory=device.type == "cuda",
            prefetch_factor=4, persistent_workers=False, multiprocessing_context="fork")
    for batch in stream:
        if "error" in batch:  # a loader worker's read error (JetStream.__iter__)
            raise SystemExit(batch["error"])
        yield {k: t.to(device, non_blocking=True) for k, t in batch.items()}


def train_batches(stream, device, epochs, *, steps=0, start_step=0):
    """(step, epoch, batch) from global step `start_step` (resume) until epochs x len(stream)
    steps, or exactly `steps` steps when steps > 0 (then epochs run on as needed)."""
    total = steps or epochs * len(stream)
    step = start_step
    while step < total:
        epoch, skip = divmod(step, len(stream))
        for batch in loader(stream, device, epoch, skip):
            yield step, epoch, batch
            step += 1
            if step == total:
                return


# --- subjets --------------------------------------------------------------------------------

@dataclass
class Subjets:
    p4: np.ndarray     # float32 (N, S, 4) subjet 4-vectors (px, py, pz, E), pT-ordered, 0 if empty
    idx: np.ndarray    # int64   (N, S, P) index of each constituent into the jet's particle axis, -1 pad
    valid: np.ndarray  # bool    (N, S, P) real constituent (pT-ordered within the subjet)

    def __len__(self):
        return len(self.p4)

    def __getitem__(self, idx):
        return type(self)(*(getattr(self, f.name)[idx] for f in fields(self)))


def cluster_subjets(p4, valid, algorithm="ca", R=0.2, n_subjets=20, n_per_subjet=30,
                    batch_size=20_000):
    """Recluster every jet's constituents into inclusive subjets (J-JEPA: C/A,
    R=0.2, 20 x 30), all jets of a batch in one fastjet call (its awkward interface), so there
    is no Python loop over jets. Every constituent lands in exactly one subjet; subjets beyond
    n_subjets and constituents beyond n_per_subjet are cut (leading ones kept)."""
    if len(p4) > batch_size:
        return concat([cluster_subjets(p4[i:i + batch_size], valid[i:i + batch_size], algorithm,
                                       R, n_subjets, n_per_subjet, batch_size)
                       for i in range(0, len(p4), batch_size)])
    import awkward as ak
    import fastjet
    algos = {"ca": fastjet.cambridge_algorithm, "kt": fastjet.kt_algorithm,
             "antikt": fastjet.antikt_algorithm}
    if algorithm not in algos:
        raise ValueError(f"algorithm must be one of {list(algos)}, got {algorithm!r}")
    p4 = np.asarray(p4, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool)
    n = len(p4)
    counts = valid.sum(1)
    flat = p4[valid]                          # (total, 4) jet by jet, in particle-axis order
    where = np.nonzero(valid)[1]              # position of each flat particle in its jet
    starts = np.cumsum(counts) - counts
    particles = ak.unflatten(ak.zip({"px": flat[:, 0], "py": flat[:, 1], "pz": flat[:, 2],
                                     "E": flat[:, 3]}), counts)
    with _quiet_fastjet():
        cs = fastjet.ClusterSequence(particles, fastjet.JetDefinition(algos[algorithm], R))
        cidx = cs.constituent_index()         # (N, var, var) index into the jet's particle list
    # flat bookkeeping: one row per subjet, one row per (subjet, constituent); a subjet's
    # 4-vector is the sum of its constituents (fastjet's default E-scheme), summed here
    sub_counts = ak.to_numpy(ak.num(cidx, axis=1))                  # (N,) subjets per jet
    c_counts = ak.to_numpy(ak.flatten(ak.num(cidx, axis=2)))        # constituents per subjet
    local = ak.to_numpy(ak.flatten(cidx, axis=None))                # index into the jet's list
    jrow = np.repeat(np.arange(n), sub_counts)                      # jet of each subjet
    subid = np.repeat(np.arange(len(jrow)), c_counts)               # subjet of each constituent
    gflat = local + starts[jrow[subid]]                             # index into `flat`
    g4 = flat[gflat]                                                # (constituents, 4)
    sub4 = np.stack([np.bincount(subid, g4[:, c], minlength=len(jrow)) for c in range(4)], -1)
    s_rank = _rank_desc(np.hypot(sub4[:, 0], sub4[:, 1]), sub_counts)  # pT rank in its jet
    c_rank = _rank_desc(np.hypot(g4[:, 0], g4[:, 1]), c_counts)        # pT rank in its subjet
    keep = (s_rank[subid] < n_subjets) & (c_rank < n_per_subjet)
    slot = (jrow[subid] * n_subjets + s_rank[subid]) * n_per_subjet + c_rank
    idx = np.full(n * n_subjets * n_per_subjet, -1, dtype=np.int64)
    idx[slot[keep]] = where[gflat[keep]]
    idx = idx.reshape(n, n_subjets, n_per_subjet)
    out = np.zeros((n, n_subjets, 4), dtype=np.float32)
    keep_s = s_rank < n_subjets
    out[jrow[keep_s], s_rank[keep_s]] = sub4[keep_s]
    ok = idx >= 0
    return Subjets(p4=out, idx=idx, valid=ok)


def _rank_desc(values, counts):
    """Rank of each element within its group (contiguous groups of `counts`), largest first."""
    import awkward as ak
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    order = ak.to_numpy(ak.flatten(ak.argsort(ak.unflatten(values, counts), ascending=False,
                                              stable=True))) + starts
    rank = np.empty(len(values), dtype=np.int64)
    rank[order] = np.arange(len(values)) - starts
    return rank


class _quiet_fastjet:
    """fastjet prints its banner to stdout on first use; keep logs clean."""
    def __enter__(self):
        sys.stdout.flush()
        self.fd = os.dup(1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)

    def __exit__(self, *exc):
        sys.stdout.flush()
        os.dup2(self.fd, 1)
        os.close(self.fd)


# --- model blocks: a "ParT-lite" particle transformer --------------------------
# Particle Transformer (ParT, arXiv 2202.03772): per-particle embedding MLP, pairwise
# features of the two 4-vectors embedded into one additive attention bias per head (computed
# once, shared by every block), pre-norm attention blocks with the extra NormFormer norms ParT
# uses, then class-attention blocks where a CLS token reads the particles. Written here from
# the paper; the "part" preset has ParT's published size.
#
# Padding: the data comes valid-first, so a batch can be cut to its longest jet. That cut
# needs a host sync (.item()), so it lives OUTSIDE forward: call trim_batch(...) in the
# training loop / collate step; forward itself only masks, and never syncs or breaks graphs.
# torch.compile then builds one static graph per length bucket (8 buckets at n_max = 128 with
# multiple = 16; measured: N is specialised, so dynamic shapes do not merge them). Train and
# eval mode are separate graphs too: 16 in all, so raise torch._dynamo.config.recompile_limit
# (default 8) or compile with fewer buckets, else dynamo silently falls back to eager.


_EPS = 1e-8          # clamp before every log: ln(1e-8) = -18.4 stays finite in fp32
_MASK = -1e4         # additive mask for padded keys: finite (no NaN for empty rows), exp() = 0


def _pair_feats(a, b):
    """ParT's pair features of 4-vectors a, b (..., 4) = (px, py, pz, E), broadcast: (..., 4)."""
    a, b = a.float(), b.float()  # logs of small differences: always fp32, also under autocast
    pt_a, pt_b = torch.hypot(a[..., 0], a[..., 1]), torch.hypot(b[..., 0], b[..., 1])

    def rapidity(v):
        return 0.5 * torch.log((v[..., 3] + v[..., 2]).clamp(min=_EPS)
                               / (v[..., 3] - v[..., 2]).clamp(min=_EPS))

    dy = rapidity(a) - rapidity(b)
    dphi = wrap_phi(torch.atan2(a[..., 1], a[..., 0]) - torch.atan2(b[..., 1], b[..., 0]))
    delta = torch.sqrt(dy ** 2 + dphi ** 2)
    pt_min = torch.minimum(pt_a, pt_b)
    s = a + b
    m2 = s[..., 3] ** 2 - (s[..., :3] ** 2).sum(-1)
    return torch.stack([torch.log(delta.clamp(min=_EPS)),                      # ln Delta
                        torch.log((pt_min * delta).clamp(min=_EPS)),          # ln kT
                        torch.log((pt_min / (pt_a + pt_b).clamp(min=_EPS)).clamp(min=_EPS)),  # ln z
                        torch.log(m2.clamp(min=_EPS))], dim=-1)                # ln m^2


def attention_bias(valid, pair=None, dtype=torch.float32):
    """Additive attention mask (B, H or 1, N, N) from valid (B, N) and an optional pair bias
    (B, N, N, H). Padded keys get -1e4 rather than -inf, so even an all-padded row has a finite
    softmax (uniform over garbage that is masked downstream) instead of NaN."""
    key = torch.where(valid, 0.0, _MASK).to(dtype)[:, None, None, :]            # (B, 1, 1, N)
    return key if pair is None else pair.permute(0, 3, 1, 2).to(dtype) + key    # (B, H, N, N)


# --- building blocks ------------------------------------------------------------
class Mlp(nn.Module):
    """Transformer feed-forward: Linear -> GELU -> LayerNorm (NormFormer, as ParT) -> Linear."""

    def __init__(self, dim, hidden, out=None, dropout=0.0):
        super().__init__()
        self.fc1, self.norm = nn.Linear(dim, hidden), nn.LayerNorm(hidden)
        self.fc2, self.drop = nn.Linear(hidden, out or dim), nn.Dropout(dropout)

    def forward(self, x):
        return self.fc2(self.norm(self.drop(F.gelu(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head attention: q_in (B, Nq, C) reads kv_in (B, Nk, C) under an additive bias
    (B, H or 1, Nq, Nk) from attention_bias(). Self-attention when q_in is kv_in."""

    def __init__(self, dim, heads, dropout=0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"EncoderConfig: dim={dim} must be divisible by heads={heads}")
        self.heads, self.dropout = heads, dropout
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, q_in, kv_in, bias):
        B, Nq, C = q_in.shape
        q = self.q(q_in).view(B, Nq, self.heads, -1).transpose(1, 2)           # (B, H, Nq, D)
        k, v = self.kv(kv_in).view(B, kv_in.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(B, Nq, C))


class Block(nn.Module):
    """Pre-norm self-attention block. bias: additive (B, H or 1, N, N) from attention_bias()."""

    def __init__(self, dim, heads, mlp_ratio=4, dropout=0.0):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.mlp, self.drop = Mlp(dim, mlp_ratio * dim, dropout=dropout), nn.Dropout(dropout)

    def forward(self, x, bias):
        h = self.norm1(x)
        x = x + self.drop(self.norm2(self.attn(h, h, bias)))  # norm2: ParT's post-attention norm
        return x + self.drop(self.mlp(self.norm3(x)))


class ClassBlock(Block):
    """Class attention (CaiT): cls (B, 1, C) attends to [cls, tokens]; tokens are not updated.
    bias (B, 1, 1, 1 + N); the CLS key is always valid, so no row is ever empty."""

    def forward(self, cls, tokens, bias):
        h = self.norm1(torch.cat([cls, tokens], dim=1))
        cls = cls + self.drop(self.norm2(self.attn(h[:, :1], h, bias)))
        return cls + self.drop(self.mlp(self.norm3(cls)))


# --- the encoder ----------------------------------------------------------------
@dataclass
class EncoderConfig:
    in_dim: int = 7                 # per-token input features (7 "kin", 17 "full")
    dim: int = 64                   # token width
    heads: int = 4
    depth: int = 4                  # particle (self-attention) blocks
    cls_depth: int = 2              # class-attention blocks giving the jet vector (0: mean of tokens)
    pair_dim: tuple = (32, 32)      # pair-bias MLP hidden widths; () = no pair bias, p4 unused
    mlp_ratio: int = 4
    dropout: float = 0.0            # attention, residual and MLP dropout of the particle blocks
    embed_hidden: tuple = (64,)     # embedding MLP: in_dim -> *embed_hidden -> dim


ENCODER_PRESETS = {
    "small": EncoderConfig(dim=64, heads=4, depth=3, cls_depth=1, pair_dim=(32, 32), embed_hidden=(64,)),
    # ParT (arXiv 2202.03772): embed (128, 512, 128), 8 heads, 8 + 2 blocks, pair embed 64 x 3,
    # dropout 0.1 in the particle blocks
    "part": EncoderConfig(in_dim=17, dim=128, heads=8, depth=8, cls_depth=2, pair_dim=(64, 64, 64),
                          embed_hidden=(128, 512), dropout=0.1),
}


def _norm_linear_gelu(dims):
    """LayerNorm -> Linear -> GELU per step (ParT's embedding): stable on unscaled inputs."""
    layers = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.LayerNorm(a), nn.Linear(a, b), nn.GELU()]
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """forward(x (B, N, in_dim), valid (B, N) bool, p4 (B, N, 4) or None) ->
    tokens (B, N, C) (final norm applied, zero at padding), valid (B, N), jet (B, C).
    Works for any token set (particles, subjets). Trim padding beforehand with trim_batch()."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = _norm_linear_gelu((cfg.in_dim, *cfg.embed_hidden, cfg.dim))
        pd = tuple(cfg.pair_dim)
        if pd:  # pointwise MLP on the 4 pair features -> one bias per head
            layers = [nn.Linear(4, pd[0])]
            for a, b in zip(pd[:-1], pd[1:]):
                layers += [nn.LayerNorm(a), nn.GELU(), nn.Linear(a, b)]
            self.pair_embed = nn.Sequential(*layers, nn.LayerNorm(pd[-1]), nn.GELU(),
                                            nn.Linear(pd[-1], cfg.heads))
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.dropout)
                                    for _ in range(cfg.depth))
        # class blocks without dropout, as ParT
        self.cls_blocks = nn.ModuleList(ClassBlock(cfg.dim, cfg.heads, cfg.mlp_ratio)
                                        for _ in range(cfg.cls_depth))
        if cfg.cls_depth:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.norm = nn.LayerNorm(cfg.dim)

    def pair_bias(self, p4, valid):
        """(B, N, N, H). The features are symmetric in (i, j): embed only the N(N+1)/2 pairs
        i <= j, then gather them back into the square (halves the dominant cost)."""
        N = valid.shape[1]
        i, j = torch.triu_indices(N, N, device=valid.device)                   # (P,)
        f = _pair_feats(p4[:, i], p4[:, j]) * (valid[:, i] & valid[:, j])[..., None]  # (B, P, 4)
        e = self.pair_embed(f)                                                  # (B, P, H)
        # index of pair (a, b), a <= b, in triu order: rows before a hold a*N - a(a-1)/2 pairs
        r = torch.arange(N, device=valid.device)
        lo, hi = torch.minimum(r[:, None], r[None]), torch.maximum(r[:, None], r[None])
        tri = lo * N - lo * (lo - 1) // 2 + (hi - lo)                            # (N, N)
        return e[:, tri.flatten()].view(e.shape[0], N, N, -1)

    def forward(self, x, valid, p4=None):
        B, N, _ = x.shape
        x = torch.where(valid[..., None], x, 0.0)  # padding may hold anything, even NaN
        x = self.embed(x)                                                       # (B, N, C)
        pair = None
        if self.cfg.pair_dim:
            if p4 is None:
                raise ValueError("Encoder: pair_dim is set, so forward needs p4 (B, N, 4)")
            pair = self.pair_bias(torch.where(valid[..., None], p4, 0.0), valid)
        bias = attention_bias(valid, pair, x.dtype)                             # (B, H|1, N, N)
        for block in self.blocks:
            x = block(x, bias)
        tokens = self.norm(x) * valid[..., None]
        if not self.cfg.cls_depth:  # no class attention: the masked mean of the tokens
            return tokens, valid, tokens.sum(1) / valid.sum(1, keepdim=True).clamp(min=1)
        cls_valid = torch.cat([valid.new_ones(B, 1), valid], dim=1)
        cls_bias = attention_bias(cls_valid, None, x.dtype)                     # (B, 1, 1, 1 + N)
        cls = self.cls_token.expand(B, -1, -1)
        for block in self.cls_blocks:
            cls = block(cls, x, cls_bias)
        return tokens, valid, self.norm(cls[:, 0])


def trim_batch(valid, *tensors, multiple=16):
    """Cut the particle axis (dim 1) of valid and tensors to the longest jet, rounded up to
    `multiple` (at least one bucket, at most N), so compile sees few shapes. Assumes valid-first
    order. Reads the length on the host (a sync): call it OUTSIDE the compiled forward."""
    n = int(valid.sum(1).max()) if valid.shape[0] else 0
    n = min(valid.shape[1], max(1, math.ceil(n / multiple)) * multiple)
    return (valid[:, :n], *(t[:, :n] for t in tensors))


# --- metrics ----------------------------------------------------------------------
SIC_MIN_BKG = 10  # background jets that must pass a threshold for it to count in sic


def _binary_roc(y, s):
    """y (N,) bool signal, s (N,) score (higher = more signal-like) -> auc, rej50, rej30, sic.
    Ties are one ROC point (the straight segment = random tie breaking); AUC from average ranks.
    sic: the best significance improvement, max of eps_S / sqrt(eps_B) over the thresholds that
    at least SIC_MIN_BKG background jets pass (fewer would let a handful of jets set it)."""
    n_s, n_b = int(y.sum()), int((~y).sum())
    if n_s == 0 or n_b == 0:
        return dict(auc=float("nan"), rej50=float("nan"), rej30=float("nan"), sic=float("nan"))
    uniq, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    rank = (np.cumsum(counts) - (counts - 1) / 2.0)[inv]        # 1-based average ranks
    auc = (rank[y].sum() - n_s * (n_s + 1) / 2.0) / (n_s * n_b)
    # ROC points, threshold sweeping from the highest score down, one point per distinct score
    sig = np.bincount(inv, weights=y, minlength=len(uniq))[::-1]
    bkg = counts[::-1] - sig
    eff_s = np.concatenate([[0.0], np.cumsum(sig) / n_s])
    eff_b = np.concatenate([[0.0], np.cumsum(bkg) / n_b])
    out = dict(auc=float(auc))
    for key, target in (("rej50", 0.5), ("rej30", 0.3)):
        # first point reaching the target: an exact hit takes the lowest eps_B at that eps_S,
        # otherwise interpolate on the segment from the last point below the target
        k = np.searchsorted(eff_s, target, side="left")
        if eff_s[k] == target:
            eb = eff_b[k]
        else:
            t = (target - eff_s[k - 1]) / (eff_s[k] - eff_s[k - 1])
            eb = eff_b[k - 1] + t * (eff_b[k] - eff_b[k - 1])
        out[key] = float("inf") if eb == 0 else float(1.0 / eb)
    counted = np.cumsum(bkg) >= SIC_MIN_BKG
    out["sic"] = float(np.max(eff_s[1:][counted] / np.sqrt(eff_b[1:][counted]))) \
        if counted.any() else float("nan")
    return out


def roc_metrics(y, score):
    """y (N,) int labels; score (N,) = P(signal), or (N, C) class probabilities (softmax).
    Binary (1-D score or C = 2): dict(acc, auc, rej50, rej30, sic), rej = 1/eps_B at eps_S = 0.5,
    0.3 interpolated linearly on the ROC curve; rej is float("inf") when no background passes at
    that signal efficiency, nan when a class is missing; sic = max eps_S / sqrt(eps_B) over the
    thresholds that >= SIC_MIN_BKG background jets pass (nan when fewer exist). A 1-D score
    counts as signal above 0.5.
    Multi-class: acc = argmax accuracy, per_class = {c: dict(auc, rej50, rej30, sic)} for class
    c >= 1 against QCD (class 0) with the discriminant P_c / (P_c + P_0) on jets of classes c
    and 0 (as ParT), and auc, rej50, rej30, sic = macro means over those classes."""
    y, score = np.asarray(y).astype(np.int64), np.asarray(score, dtype=np.float64)
    if score.ndim == 1 or score.shape[1] == 2:
        if score.ndim == 1:
            s, pred = score, (score > 0.5).astype(np.int64)
        else:  # P1 - P0 ranks like P1 for probabilities and like the softmax for logits
            s, pred = score[:, 1] - score[:, 0], score.argmax(1)
        return dict(acc=float((pred == y).mean()), **_binary_roc(y == 1, s))
    if (score < 0).any():
        raise ValueError("roc_metrics: multi-class scores must be probabilities (apply softmax)")
    out = dict(acc=float((score.argmax(1) == y).mean()), per_class={})
    for c in range(1, score.shape[1]):
        sel = (y == c) | (y == 0)
        s = score[sel, c] / np.maximum(score[sel, c] + score[sel, 0], 1e-30)
        out["per_class"][c] = _binary_roc(y[sel] == c, s)
    for key in ("auc", "rej50", "rej30", "sic"):
        out[key] = float(np.mean([m[key] for m in out["per_class"].values()]))
    return out


# --- representation diagnostics (every pretraining script ends with these) ---------------------
@torch.no_grad()
def embed_stream(encoder, stream, device, ctx=contextlib.nullcontext(), inputs=("x", "valid", "p4")):
    """Jet vectors (N, C) fp32 and labels (N,) on the CPU from one pass over `stream` (a JetStream
    made with shuffle=False, drop_last=False): encoder(**batch)[2] in eval mode. inputs: the batch
    keys the encoder takes, or a function batch -> dict of its arguments."""
    was_training = encoder.training
    encoder.eval()
    zs, ys = [], []
    for batch in loader(stream, device):
        kw = inputs(batch) if callable(inputs) else {k: batch[k] for k in inputs}
        with ctx:
            zs.append(encoder(**kw)[2].float().cpu())
        ys.append(batch["y"].cpu())
    encoder.train(was_training)
    return torch.cat(zs), torch.cat(ys)


def linear_probe(z_fit, y_fit, z_score, y_score, steps=200, l2=1e-4):
    """Multinomial logistic regression on frozen jet representations z (N, C): standardised with
    the fit set's statistics, full-batch L-BFGS in fp32 on the CPU from zero weights (so the
    result is deterministic). Labels are remapped to the classes present in y_fit, in CLASSES
    order (QCD stays first, so the binary case scores P(signal)); jets of other classes are not
    scored. Returns roc_metrics on the scored jets."""
    z_fit, z_score = (torch.as_tensor(z).detach().float().cpu() for z in (z_fit, z_score))
    y_fit, y_score = (np.asarray(y.cpu() if torch.is_tensor(y) else y) for y in (y_fit, y_score))
    classes = np.unique(y_fit)
    if len(classes) < 2:
        raise ValueError(f"linear_probe: the {len(y_fit)} jets it is fitted on hold a single "
                         "class; use more (or shuffled) jets")
    keep = np.isin(y_score, classes)
    mean, std = z_fit.mean(0), z_fit.std(0).clamp(min=1e-6)
    a, b = (z_fit - mean) / std, (z_score[torch.from_numpy(keep)] - mean) / std
    target = torch.from_numpy(np.searchsorted(classes, y_fit))
    W = torch.zeros(a.shape[1], len(classes), requires_grad=True)
    bias = torch.zeros(len(classes), requires_grad=True)
    opt = torch.optim.LBFGS([W, bias], max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(a @ W + bias, target) + l2 * (W * W).sum()
        loss.backward()
        return loss

    with torch.enable_grad():  # callers often sit under no_grad
        opt.step(closure)
    with torch.no_grad():
        probs = torch.softmax(b @ W + bias, 1).double().numpy()
    return roc_metrics(np.searchsorted(classes, y_score[keep]), probs)


@torch.no_grad()
def collapse_stats(z):
    """Collapse diagnostics of jet representations z (N, C). cos: mean pairwise cosine similarity
    (1 = every jet points the same way; J-JEPA reports 0.457). std: per-dimension std of the
    L2-normalised vectors x sqrt(C) (about 1 when spread out, 0 when collapsed). erank:
    effective rank, exp(entropy of the normalised singular values) of the centred vectors
    (RankMe, arXiv 2210.02885), which an offset shared by all jets cannot hide."""
    z = torch.as_tensor(z).float().cpu()
    zn = F.normalize(z, dim=1)
    n = len(zn)
    cos = ((zn.sum(0).pow(2).sum() - n) / max(n * (n - 1), 1))
    sv = torch.linalg.svdvals(z - z.mean(0))
    p = sv / sv.sum().clamp(min=1e-12)
    erank = torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum())
    return dict(cos=float(cos), std=float(zn.std(0).mean() * math.sqrt(z.shape[1])),
                erank=float(erank))


# --- training harness ----------------------------------------------
# Small flat helpers every script uses: the shared flags, device/DDP setup, AdamW with decay on
# matrices only, the warm-up + cosine schedule, atomic checkpoints that resume bit for bit, a
# batch iterator that shards by rank, a JSON-lines logger and a progress bar.


# --- shared flags -----------------------------------------------------------------------------


def number_type(kind, ok, what):
    """An argparse type: parse with `kind`, then check `ok`; a bad value is a one-line usage
    error, "argument --flag: 'x' is not <what>". Every script builds its numeric types here."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = number_type(int, lambda v: v > 0, "a positive integer")
nonneg_int = number_type(int, lambda v: v >= 0, "an integer >= 0")
positive_float = number_type(float, lambda v: v > 0, "a number > 0")
nonneg_float = number_type(float, lambda v: v >= 0, "a number >= 0")
fraction = number_type(float, lambda v: 0 < v <= 1, "a fraction in (0, 1]")
unit = number_type(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def add_common_args(parser, skip=()):
    """Add the flags every script shares (one argparse group). `skip` leaves out flags a script
    has no use for (a flag that is accepted but does nothing would be a bug), e.g. ("resume",).
    Scripts change defaults afterwards with parser.set_defaults(epochs=..., lr=...). Help texts
    carry no "(default: ...)": the scripts use ArgumentDefaultsHelpFormatter, which adds it."""
    g = parser.add_argument_group("data and training (shared by every script)")

    def add(name, **kw):
        if name.lstrip("-") not in skip:
            g.add_argument(name, **kw)

    add("--data", choices=["pythia", "jetclass", "toptagging"], default="pythia",
        help="pythia: jets generated by jetgen.py (made on first use, small); jetclass: the "
             "JetClass ROOT files; toptagging: the Top Tagging reference h5 files")
    add("--data-dir", default=None,
        help="folder holding the data (None: data/<data> beside common.py)")
    add("--n-jets", type=positive_int, default=None,
        help="use at most this many training jets (None: all)")
    add("--n-eval", type=positive_int, default=None,
        help="use at most this many validation/test jets (None: all)")
    add("--n-max", type=positive_int, default=128,
        help="particles kept per jet (the hardest ones); shorter jets are padded")
    add("--epochs", type=positive_int, default=10, help="passes over the training jets")
    add("--steps", type=nonneg_int, default=0,
        help="stop after this many optimizer steps, overriding --epochs (0: use --epochs)")
    add("--batch-size", type=positive_int, default=256, help="jets per step and per process")
    add("--workers", type=nonneg_int, default=0,
        help="DataLoader worker processes that read and prepare batches (0: in the main process)")
    add("--shuffle-buffer", type=positive_int, default=100_000,
        help="jets per process held for shuffling while streaming")
    add("--lr", type=positive_float, default=1e-3, help="peak learning rate (after warm-up)")
    add("--weight-decay", type=nonneg_float, default=0.01,
        help="AdamW weight decay, applied to matrices only (not biases, norms)")
    add("--warmup", type=nonneg_int, default=None,
        help="steps of linear learning-rate warm-up before the cosine decay "
             "(None: min(100 steps, 5%% of the run))")
    add("--grad-clip", type=nonneg_float, default=1.0,
        help="clip the global gradient norm to this value (0: no clipping)")
    add("--device", choices=["auto", "cpu", "cuda"], default="auto",
        help="auto: CUDA when available, else CPU")
    add("--compile", action=argparse.BooleanOptionalAction, default=None,
        help="torch.compile the model (None: on for CUDA, off for CPU)")
    add("--seed", type=nonneg_int, default=0, help="seed for weights, data order and masks")
    add("--out", default="out", help="folder for checkpoints, logs and results")
    add("--resume", default=None, metavar="CKPT",
        help="continue the run saved in this checkpoint (weights, optimizer, RNG, data order)")
    add("--overwrite", action="store_true",
        help="replace the output another run left in --out (its checkpoint and log, or "
             "finetune.py's results folder) instead of stopping")
    add("--eval-every", type=nonneg_int, default=0,
        help="evaluate every this many steps (0: at the end of each epoch)")
    add("--log-every", type=positive_int, default=10,
        help="print the loss and step time every N steps")
    return parser


def warmup_steps(warmup, total_steps):
    """The warm-up length of a run of `total_steps`: `warmup` when given (--warmup), else
    min(100, 5% of the run), so a short run still reaches its peak learning rate. An explicit
    warm-up longer than the run gets a one-line warning (the peak lr would never be reached)."""
    if warmup is None:
        return _default_warmup(total_steps)
    if warmup > total_steps:
        warnings.warn(f"--warmup {warmup} exceeds the run's {total_steps} steps: the learning "
                      "rate never reaches its peak (lower --warmup, or omit it for 5% of the run)",
                      stacklevel=2)
    return warmup


def _default_warmup(total_steps):
    return min(100, max(1, round(0.05 * total_steps)))


# --- device, seeds, DDP -------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    device: torch.device
    device_type: str          # "cuda" or "cpu", for torch.autocast and fused AdamW
    ctx: object               # autocast(bf16) on CUDA, a no-op on CPU: `with s.ctx: loss = ...`
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master: bool = True       # rank 0: the process that logs, evaluates and saves
    ddp: bool = False
    compile: bool = False


def setup(args):
    """Pick the device, seed every RNG, and join the process group when launched by torchrun
    (which sets RANK, WORLD_SIZE, LOCAL_RANK). One GPU per process, as in nanoGPT."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible; use --device cpu or auto")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if ddp:
        import torch.distributed as dist
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    # Each rank draws its own masks/augmentations; the weights still start equal because DDP
    # broadcasts rank 0's parameters, and the data order has its own (seed, epoch) generator.
    seed = args.seed + rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast use TF32
        torch.backends.cudnn.allow_tf32 = True
    device_type = "cuda" if use_cuda else "cpu"
    # bf16 needs no GradScaler; CPU stays in fp32 so runs are exact and bitwise reproducible.
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda else contextlib.nullcontext()
    do_compile = use_cuda if getattr(args, "compile", None) is None else args.compile
    return Setup(device, device_type, ctx, rank, local_rank, world_size, rank == 0, ddp, do_compile)


def wrap_model(raw_model, s):
    """torch.compile (when s.compile) then DDP (when launched by torchrun). Keep `raw_model` for
    saving and evaluation helpers; train through the returned module."""
    if s.compile:
        # trim_batch buckets the particle axis by 16: up to n_max/16 shapes, for train and eval,
        # each its own graph (dynamic shapes do not merge them); dynamo's default limit of 8
        # would silently fall back to eager
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    model = torch.compile(raw_model) if s.compile else raw_model
    if s.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[s.local_rank] if s.device_type == "cuda" else None)
    return model


def unwrap(model):
    """The plain module under DDP / torch.compile wrappers, whose state dict has clean keys
    (no `module.` or `_orig_mod.` prefixes)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def cleanup(s):
    """Leave the process group. The barrier first: a rank that tears down while another still
    talks to it makes gloo/NCCL abort the process ("terminate called without an active
    exception")."""
    _release_claims()
    if s.ddp:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


# --- optimizer and schedule ---------------------------------------------------------------------


def decay_groups(params, weight_decay, **group):
    """Two AdamW parameter groups from a module (or a list of parameters): matrices (linear and
    attention weights, embeddings) decay; biases, norm gains and other 1-D parameters do not.
    Frozen parameters are left out. `group` adds keys to both, e.g. name="head"."""
    if isinstance(params, nn.Module):
        params = params.parameters()
    params = [p for p in params if p.requires_grad]
    return [dict(params=[p for p in params if p.dim() >= 2], weight_decay=weight_decay, **group),
            dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0, **group)]


def configure_optimizer(model, lr, weight_decay, betas=None, eps=1e-8, device_type="cpu",
                        kind="adamw"):
    """AdamW with weight decay on >= 2-D parameters only. `model` is a module or a list of
    parameter groups (e.g. from decay_groups, to give a backbone its own learning rate).
    kind "schedulefree": schedule-free AdamW (the `schedulefree` package); call
    optimizer_mode(opt, "train") before stepping and evaluate inside averaged_weights(opt).
    betas None: (0.9, 0.999) for AdamW, (0.9, 0.95) for schedule-free (the diffusion-MAE
    talk's)."""
    groups = decay_groups(model, weight_decay) if isinstance(model, nn.Module) else model
    if kind == "schedulefree":
        try:
            import schedulefree
        except ImportError:
            raise SystemExit("--optimizer schedulefree needs the schedulefree package: "
                             "pip install schedulefree") from None
        # warmup_steps=0: the caller's lr_at drives the warm-up, as for AdamW (the package's
        # own warm-up would multiply it); its average weighs steps by lr^2 either way
        return schedulefree.AdamWScheduleFree(groups, lr=lr, betas=betas or (0.9, 0.95),
                                              eps=eps, warmup_steps=0)
    if kind != "adamw":
        raise ValueError(f"optimizer kind must be adamw or schedulefree, got {kind!r}")
    fused = device_type == "cuda"  # one kernel per step instead of one per tensor
    return torch.optim.AdamW(groups, lr=lr, betas=betas or (0.9, 0.999), eps=eps, fused=fused)


def optimizer_mode(optimizer, mode):
    """mode "train" or "eval". Schedule-free AdamW steps at one point (y) and evaluates at the
    average (x), swapping the parameters in place; AdamW has one point, so this does nothing."""
    if hasattr(optimizer, mode):  # torch's optimizers have no train()/eval()
        getattr(optimizer, mode)()


@contextlib.contextmanager
def averaged_weights(optimizer):
    """Inside, the model holds the weights to evaluate, save and probe (schedule-free's
    average); after, the weights training steps from. A no-op for AdamW."""
    optimizer_mode(optimizer, "eval")
    try:
        yield
    finally:
        optimizer_mode(optimizer, "train")


def lr_at(step, total_steps, warmup_steps, lr, min_lr=0.0):
    """Learning rate at `step` (0-based): linear warm-up to `lr` over `warmup_steps`, then a
    cosine decay to `min_lr` at `total_steps`. warmup_steps None: the default of
    common.warmup_steps (min(100, 5% of the run))."""
    if warmup_steps is None:
        warmup_steps = _default_warmup(total_steps)
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def check_finite(loss, step, where, grad_norm=None):
    """Stop the run (SystemExit, non-zero exit) when the loss or the gradient norm is NaN/inf,
    naming the step and `where` (the batch's data source, e.g. "pythia train"): one bad batch
    would otherwise poison the weights and every later checkpoint while the run reports
    success. Call it after backward (with the norm clip_grad_norm_ returns) and before
    optimizer.step(). It reads the values on the host (a sync): once per step is cheap."""
    values = [(name, float(v.detach()) if torch.is_tensor(v) else float(v))
              for name, v in (("loss", loss), ("grad norm", grad_norm)) if v is not None]
    bad = [f"{name} {v}" for name, v in values if not math.isfinite(v)]
    if bad:
        raise SystemExit(f"step {step}: {' and '.join(bad)} on a batch of {where}; stopping "
                         "before the weights are updated (the last checkpoint is kept). Check the "
                         "input data, or lower --lr")


def check_val_loss(value, where):
    """Return the validation loss `value`, or stop the run (SystemExit, non-zero exit) when it
    is NaN/inf: call it in the evaluation, before the checkpoint is saved, so the last good
    checkpoint stays and no result is written from a run that reports nothing real."""
    value = float(value)
    if not math.isfinite(value):
        raise SystemExit(f"validation loss {value} on {where}; stopping without a new "
                         "checkpoint (the last one is kept). Check the data and the settings "
                         "that leave nothing to score (--n-max, the mask ratio), or lower --lr")
    return value


def probe_possible(stream):
    """Whether the end-of-run linear probe can run on `stream` (the training stream): a probe
    needs two classes. One-class pretraining (QCD only) is a real use: say so in one line."""
    if stream.jets is not None:
        classes = {int(c) for c in np.unique(np.asarray(stream.jets.y))}
    elif stream.source == "toptagging":
        return True
    else:
        names = {PREFIX[c]: c for c in CLASSES}
        classes = {names.get(_class_of(f), _class_of(f))
                   for f, n in zip(stream.files, stream.counts) if n > 0}
    if len(classes) > 1:
        return True
    print(f"linear probe skipped: the training jets hold one class "
          f"({', '.join(map(str, sorted(classes)))}); a probe needs two (finetune.py scores the "
          "encoder on labelled data)")
    return False


# --- checkpoints --------------------------------------------------------------------------------


def rng_state(generators=None):
    """Every RNG a run draws from: torch (CPU and CUDA), numpy, python, and named generators."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = torch.from_numpy(np_state["state"]["key"].astype(np.int64))
    return dict(
        torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        numpy=np_state,
        python=random.getstate(),
        generators={k: g.get_state() for k, g in (generators or {}).items()},
    )


def set_rng_state(state, generators=None):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = dict(state["numpy"])
    np_state["state"] = dict(np_state["state"], key=np_state["state"]["key"].numpy().astype(np.uint32))
    np.random.set_state(np_state)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    for k, g in (generators or {}).items():
        if k not in state["generators"]:
            raise ValueError(f"checkpoint has no state for generator {k!r}; "
                             f"it has {sorted(state['generators'])}")
        g.set_state(state["generators"][k])


def git_hash():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions():
    v = dict(python=sys.version.split()[0], torch=str(torch.__version__), numpy=np.__version__)
    if torch.cuda.is_available():
        v["gpu"] = torch.cuda.get_device_name()
    return v


def _plain(value):
    """argparse values as plain python (Path -> str) so checkpoints load with weights_only."""
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def save_checkpoint(path, *, method, args, model, encoder=None, encoder_config=None,
                    optimizer=None, step=0, generators=None, data=None, **extra):
    """Write a checkpoint atomically (temporary file, then os.replace: a crash mid-write never
    leaves a truncated file under `path`). Modules are saved unwrapped (no `_orig_mod.` keys).
      method          the script that wrote it ("mpm", "jjepa", ..., "part" for supervised)
      args            the argparse Namespace (or dict) of the run
      model           the full model (all weights the run trains, for --resume)
      encoder         the backbone a fine-tuner needs; rebuilt by its script's build_encoder(cfg)
      encoder_config  dict (or dataclass) of that backbone's constructor arguments
      generators      dict name -> torch.Generator whose state resume must restore
      data            the training stream's `identity` (files' names, sizes, entries): resume
                      refuses other data
      extra           anything else the method needs back (e.g. K-means centroids)"""
    if dataclasses.is_dataclass(encoder_config):
        encoder_config = dataclasses.asdict(encoder_config)
    for name, module in (("model", model), ("encoder", encoder)):
        bad = [k for k, t in (unwrap(module).state_dict().items() if module is not None else ())
               if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise SystemExit(f"{path}: not saved, {len(bad)} {name} tensors hold NaN/inf (first: "
                             f"{bad[0]}); the previous checkpoint is kept")
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    payload = dict(
        method=method,
        args={k: _plain(v) for k, v in args.items()},
        encoder_config={k: _plain(v) for k, v in (encoder_config or {}).items()},
        encoder=unwrap(encoder).state_dict() if encoder is not None else None,
        model=unwrap(model).state_dict(),
        optimizer=optimizer.state_dict() if optimizer is not None else None,
        rng=rng_state(generators),
        step=step,
        data=data,
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        git=git_hash(),
        versions=versions(),
        **extra,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(path.parent)  # what a save killed mid-write left behind
    tmp = _tmp_path(path)
    torch.save(payload, tmp)
    os.replace(tmp, path)


def write_json_atomic(path, obj, finite=None):
    """Write obj as JSON through a temporary file and os.replace (never a truncated file).
    Refuses (SystemExit, nothing written, an older file kept) when a number that must be finite
    is NaN or inf: results from a run that diverged must not look like results. finite: the
    dict keys whose values must be finite, at any depth (e.g. ("loss", "acc", "auc"), since a
    rejection 1/eps_B is legitimately inf when no background passes); None: every number."""
    path = Path(path)
    obj = json.loads(json.dumps(obj, default=_json_number))  # numpy/torch scalars -> float
    bad = []

    def walk(value, where, key):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{where}.{k}" if where else str(k), k)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]", key)
        elif isinstance(value, float) and not math.isfinite(value) and \
                (finite is None or key in finite):
            bad.append(f"{where} = {value}")

    walk(obj, "", None)
    if bad:
        raise SystemExit(f"{path}: not written, {', '.join(bad[:4])}"
                         f"{' ...' if len(bad) > 4 else ''} (the run diverged)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


# lock-file path -> (pid, fd, claimed): the flocks this process holds (a killed process releases
# them). Kept per pid: a forked child inherits the dict but not the right to write.
_LOCKS = {}


def lock_output(path, claimed=False):
    """Check that `path`'s folder is writable (create it, write a probe file) and take an
    exclusive flock on `<path>.lock` until the process ends (or, for claim_output's locks, the
    run's cleanup), so that a second run writing the same file stops at its start, naming the
    process that holds the lock."""
    import fcntl
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".write-test.{os.getpid()}.tmp"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise SystemExit(f"--out {path.parent}: not writable ({e.strerror or e}); give a folder "
                         "you can write to") from None
    lock = str(path.with_name(path.name + ".lock"))
    if _LOCKS.get(lock, (None,))[0] == os.getpid():
        return
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)  # a raw fd: closed by exit, unwarned
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pid = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise SystemExit(f"{path}: another run (pid {pid}) is writing it; wait for that run to "
                         "end, or use another --out") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _LOCKS[lock] = (os.getpid(), fd, claimed)


def _release_claims():
    """cleanup's part: a run that ended lets the next one (in this process or another) claim
    its checkpoint; scripts/study.py's lock on its --out stays."""
    for lock, (pid, fd, claimed) in list(_LOCKS.items()):
        if pid == os.getpid() and claimed:
            os.close(fd)
            del _LOCKS[lock]


def claim_output(path, args):
    """Make `path` (out/<method>.pt, or finetune.py's results.json) this run's, at its start:
    --out must be writable, no other live run may write it (lock_output), and a file another
    run left there is replaced only when this run resumes it (--resume) or --overwrite says so.
    Only rank 0 writes, so the other ranks of torchrun claim nothing. Call it right after
    setup, before the first output."""
    if int(os.environ.get("RANK", 0)) != 0:
        return
    path = Path(path)
    lock_output(path, claimed=True)
    resume = getattr(args, "resume", None)
    if path.exists() and not getattr(args, "overwrite", False) and \
            not (resume and Path(resume).resolve() == path.resolve()):
        how = f"continue it with --resume {path}, " if hasattr(args, "resume") else ""
        raise SystemExit(f"{path} holds another run's output: {how}replace it with --overwrite, "
                         "or use another --out")


def load_checkpoint(path, map_location="cpu"):
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"checkpoint {path} not found: pass the .pt file a training script wrote")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which one, not a pickle traceback
        raise SystemExit(f"checkpoint {path} could not be read ({type(e).__name__}: {e})") from e


# the arguments that fix a run's batches: resuming with other values would silently train on
# other data (or skip it), so resume_from compares them with the checkpoint's. The loader's
# workers and shuffle buffer are among them: each worker reads its own share of the epoch
# through its own buffer, so another count reads some jets twice and others never.
RUN_ARGS = ("data", "n_jets", "n_max", "features", "batch_size", "seed", "classes", "workers",
            "shuffle_buffer")


def resume_from(path, raw_model, optimizer=None, generators=None, args=None, data=None):
    """Restore weights, optimizer, every RNG and return the step to continue from. With the data
    order derived from (seed, epoch) this continues the run bit for bit (on CPU). Stops with a
    SystemExit listing the differences when the model's parameters (names, shapes) differ from
    the checkpoint's, or, given `args`, when a RUN_ARGS value or the number of processes does.
    data: the training stream's `identity`; other files (names, sizes, entries) than the
    checkpoint's stop the run under --data-dir, a moved but identical folder only warns."""
    ckpt = load_checkpoint(path)
    model = unwrap(raw_model)
    have, saved = model.state_dict(), ckpt["model"]
    diffs = [f"{k}: checkpoint {tuple(saved[k].shape)}, model {tuple(have[k].shape)}"
             for k in have if k in saved and saved[k].shape != have[k].shape]
    diffs += [f"{k}: only in the model" for k in have if k not in saved]
    diffs += [f"{k}: only in the checkpoint" for k in saved if k not in have]
    if args is not None:
        args = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
        old = ckpt.get("args") or {}
        diffs += [f"--{k.replace('_', '-')}: checkpoint {old[k]!r}, now {_plain(args[k])!r}"
                  for k in RUN_ARGS if k in args and k in old and _plain(args[k]) != old[k]]
        diffs += _data_diffs(ckpt.get("data"), data, old.get("data_dir"),
                             _plain(args.get("data_dir")))
        world = int(os.environ.get("WORLD_SIZE", 1))
        if ckpt.get("world_size", world) != world:
            diffs.append(f"processes: checkpoint {ckpt['world_size']}, now {world}")
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise SystemExit(f"--resume {path}: the checkpoint is from another run ({shown}); "
                         "resume with the same settings, or start a new run")
    model.load_state_dict(saved)
    if optimizer is not None and ckpt["optimizer"] is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"], generators)
    return ckpt["step"]


def _data_diffs(saved, now, saved_dir, now_dir):
    """resume_from's data check. Both identities known: compare the files, and let a moved
    folder pass with a warning. Otherwise (an older checkpoint, jets in memory): the folder."""
    if saved is None or now is None:
        return [] if saved_dir == now_dir else [f"--data-dir: checkpoint {saved_dir!r}, now "
                                                f"{now_dir!r}"]
    saved = [list(f) for f in saved]
    now = [list(f) for f in now]
    if saved == now:
        if saved_dir != now_dir:
            warnings.warn(f"--data-dir {now_dir}: the checkpoint read {saved_dir}; the {len(now)} "
                          "files are the same (names, sizes, entries), resuming", stacklevel=3)
        return []
    gone = [f[0] for f in saved if f not in now]
    new = [f[0] for f in now if f not in saved]
    return [f"--data-dir: checkpoint {saved_dir!r} ({len(saved)} files), now {now_dir!r} "
            f"({len(now)} files); not in the checkpoint's data: {', '.join(new[:3]) or '-'}; "
            f"missing or changed: {', '.join(gone[:3]) or '-'}"]


# --- logging ------------------------------------------------------------------------------------


class JsonlLogger:
    """One JSON object per line (`out/<run>.jsonl`). A new run starts the file afresh (an older
    run's records are not this run's). resume_step: the step a resumed run continues from; the
    file is kept up to that step, whose record the checkpoint was saved after, and the records
    of later steps (logged after the checkpoint by the interrupted run, and about to be logged
    again) are dropped, atomically. Only the master process should log."""

    def __init__(self, path, resume_step=None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.is_file():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:  # a line cut by the kill
                    continue
                if not (isinstance(record, dict) and record.get("step", -1) > resume_step):
                    keep.append(line + "\n")
            tmp = _tmp_path(self.path)
            tmp.write_text("".join(keep))
            os.replace(tmp, self.path)

    def log(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=_json_number) + "\n")


def _json_number(value):
    """numpy / torch scalars (np.float32, 0-d tensors) -> python numbers for json."""
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def progress_bar(total_steps, jets_per_step, start_step=0, master=True, desc="train"):
    """tqdm bar counted in jets, so its rate reads jets/s; update with
    bar.update(jets_per_step) and bar.set_postfix(loss=...). Silent on ranks other than 0.
    When the output is not a terminal (a log file, a batch job) it writes a line at most every
    30 s instead of redrawing, so a log file holds a few lines, not thousands."""
    from tqdm import tqdm
    tty = sys.stderr.isatty()
    return tqdm(total=total_steps * jets_per_step, initial=start_step * jets_per_step,
                unit="jet", unit_scale=True, desc=desc, disable=not master, dynamic_ncols=tty,
                mininterval=0.1 if tty else 30, maxinterval=10 if tty else 300)

