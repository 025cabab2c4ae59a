"""nanojet common: data, features, subjets, encoder blocks, metrics and training helpers
shared by every method script.

Data in one paragraph: `load_jets(source, ...)` reads one of three sources into padded numpy
arrays (`Jets`): "pythia" (our jetgen.py output, generated on first use), "jetclass" (the real
JetClass ROOT files) and "toptagging" (the Top Tagging reference HDF5 files). Constituents are
sorted by pT, valid first, padded to n_max; features follow ParT's recipes. The result is cached
as memory-mapped .npy files, so a second load costs milliseconds. `iter_jets` streams data
larger than memory file by file; `cluster_subjets` / `load_subjets` recluster jets into subjets
with fastjet's vectorised interface. `python common.py download ...` fetches the real datasets.
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

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


# --- data: features -------------------------------------------------------------------------

def wrap_phi(phi):
    """Angle difference into [-pi, pi)."""
    return (phi + np.pi) % (2 * np.pi) - np.pi


def signed_deta(eta, jet_eta):
    """JetClass convention: deta flips sign for jets at negative eta (so it points away from
    the beam axis's nearer side in both hemispheres). Every source must use it."""
    return np.where(jet_eta >= 0, 1.0, -1.0).astype(np.float32) * (eta - jet_eta)


def features_flat(px, py, energy, deta, dphi, jet, extra=None, features="kin"):
    """ParT input recipe for M particles (1-D arrays); jet (M, 4) = (pt, eta, phi, E) of each
    particle's jet; extra: dict of part_charge, part_is*, part_d0val... (M,) for "full"
    (missing ones = not measured = 0). Returns float32 (M, F)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        pt = np.hypot(px, py)
        kin = [
            (np.log(pt) - 1.7) * 0.7,
            (np.log(energy) - 2.0) * 0.7,
            (np.log(pt / jet[:, 0]) + 4.7) * 0.7,
            (np.log(energy / jet[:, 3]) + 4.7) * 0.7,
            (np.hypot(deta, dphi) - 0.2) * 4.0,
        ]
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


def particle_features(p4, valid, jet, deta, dphi, extra=None, features="kin"):
    """features_flat on padded arrays: p4 (N, M, 4), valid (N, M), jet (N, 4), deta/dphi and
    the extra arrays (N, M). Returns float32 (N, M, F), zero in padding."""
    row = np.nonzero(valid)[0]
    flat_extra = {k: v[valid] for k, v in (extra or {}).items()}
    x = np.zeros(valid.shape + (len(FEATURE_NAMES[features]),), dtype=np.float32)
    x[valid] = features_flat(p4[..., 0][valid], p4[..., 1][valid], p4[..., 3][valid],
                             deta[valid], dphi[valid], jet[row], flat_extra, features)
    return x


def assemble(parts, counts, jet, y, n_max, features, drops):
    """The one place where every reader's output becomes `Jets`.
    parts: dict of flat per-particle arrays, jet by jet (part_px, part_py, part_pz,
    part_energy, part_deta, part_dphi, optional extras), counts (N,), jet (N, 4), y (N,).
    Drops non-finite constituents and then empty jets, counting both in `drops`; sorts each
    jet's constituents by pT (descending), keeps the first n_max and pads."""
    counts = np.asarray(counts, dtype=np.int64)
    row = np.repeat(np.arange(len(counts)), counts)
    finite = np.ones(len(row), dtype=bool)
    for v in parts.values():
        finite &= np.isfinite(v)
    drops["constituents"] += int((~finite).sum())
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
    flat = row * n_max + col[col < n_max]        # scatter into (N * n_max, ...) views
    n, n_feat = len(counts), len(FEATURE_NAMES[features])
    valid = np.arange(n_max)[None, :] < counts[:, None]
    p4 = np.zeros((n, n_max, 4), dtype=np.float32)
    p4.reshape(-1, 4)[flat] = np.stack(
        [parts[k] for k in ("part_px", "part_py", "part_pz", "part_energy")], -1)
    x = np.zeros((n, n_max, n_feat), dtype=np.float32)
    x.reshape(-1, n_feat)[flat] = features_flat(
        parts["part_px"], parts["part_py"], parts["part_energy"], parts["part_deta"],
        wrap_phi(parts["part_dphi"]), jet[row], parts, features)
    return Jets(x=x, p4=p4, valid=valid, y=y, jet=jet)


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


def _num_entries(source, path):
    if source == "toptagging":
        f, table = _open_h5(path)
        with f:
            return table.shape[0]
    return _open_root(path).num_entries


def read_root(path, start, stop, n_max, features, drops, step=50_000):
    """JetClass layout (real files and jetgen output)."""
    import awkward as ak
    tree = _open_root(path)
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
        counts = ak.to_numpy(ak.num(col("part_px")))
        parts = {b: ak.to_numpy(ak.flatten(col(b))).astype(np.float32)
                 for b in branches if b.startswith("part_")}
        jet = np.stack([ak.to_numpy(arr[b]).astype(np.float32) for b in JET_BRANCHES], -1)
        onehot = np.stack([ak.to_numpy(arr[b]).astype(np.float32) for b in labels], -1)
        y = label_idx[onehot.argmax(-1)]
        yield assemble(parts, counts, jet, y, n_max, features, drops)


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
            yield assemble(parts, counts, jet, y, n_max, features, drops)


READERS = {"pythia": read_root, "jetclass": read_root, "toptagging": read_h5}


# --- data: finding files --------------------------------------------------------------------

def _missing(source, searched, root, split):
    cmd = {"pythia": f"python jetgen.py --out {root}  (or leave path=None for the default sample)",
           "jetclass": f"python common.py download jetclass --split {split} --dir {root}",
           "toptagging": f"python common.py download toptagging --dir {root}"}[source]
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
    import jetgen
    print(f"generating the embedded default sample in {out} (once; a few minutes on 2 cores)")
    jetgen.generate(out, classes=("QCD", "Tbqq"), jets_per_class=PYTHIA_JETS_PER_CLASS, seed=0,
                    workers=os.cpu_count(), preset="toptagging")
    done.write_text(json.dumps(dict(classes=["QCD", "Tbqq"], jets_per_class=PYTHIA_JETS_PER_CLASS,
                                    seed=0, preset="toptagging")))
    return out


def _budget(n_jets, n_files):
    """Spread n_jets over the class files so a subset stays balanced: n_jets // n_files each."""
    if n_jets is None:
        return [None] * n_files
    return [n_jets // n_files + (i < n_jets % n_files) for i in range(n_files)]


def _warn_drops(drops, where):
    if drops["constituents"] or drops["jets"]:
        warnings.warn(f"{where}: dropped {drops['constituents']} constituents with NaN/inf and "
                      f"{drops['jets']} jets with no constituents", stacklevel=3)


# --- data: cache ----------------------------------------------------------------------------
# A cache entry is a folder data/cache/<hash>/ of .npy files plus meta.json, written to a
# temporary folder and renamed, so a crash never leaves a half-written entry behind.

def cache_key(**items):
    blob = json.dumps({"version": CACHE_VERSION, **items}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _file_ids(files):
    return [(str(Path(f).resolve()), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]


def cache_load(cls, key, cache_dir=None):
    folder = cache_root(cache_dir) / key
    if not (folder / "meta.json").is_file():
        return None
    return cls(*(np.load(folder / f"{f.name}.npy", mmap_mode="r") for f in fields(cls)))


def cache_save(obj, key, meta, cache_dir=None):
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{key}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for f in fields(obj):
        np.save(tmp / f"{f.name}.npy", np.ascontiguousarray(getattr(obj, f.name)))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    try:
        os.replace(tmp, root / key)
    except OSError:  # another process finished the same entry first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return cache_load(type(obj), key, cache_dir)


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
    files = find_files(source, path, split, classes)
    key = cache_key(source=source, files=_file_ids(files), split=split, n_jets=n_jets,
                    n_max=n_max, features=features, classes=classes)
    if cache and (hit := cache_load(Jets, key, cache_dir)) is not None:
        return hit
    drops = {"constituents": 0, "jets": 0}
    chunks = []
    for f, n in zip(files, _budget(n_jets, len(files))):
        total = _num_entries(source, f)
        stop = total if n is None else min(n, total)
        chunks += list(READERS[source](f, 0, stop, n_max, features, drops))
    _warn_drops(drops, f"{source} {split}")
    jets = concat(chunks)
    if cache:
        meta = dict(source=source, files=[str(f) for f in files], split=split, n_jets=n_jets,
                    n_max=n_max, features=features, classes=classes, n=len(jets))
        jets = cache_save(jets, key, meta, cache_dir)
    return jets


def iter_jets(source, path=None, split="train", n_max=128, features="kin", rank=0, world_size=1,
              classes=None, chunk_size=50_000):
    """Stream a split as `Jets` chunks, file by file, never holding more than one chunk.
    The work units (file, entry range of chunk_size) are sharded by rank so that each of
    world_size processes reads a disjoint part (a single big .h5 file is split by rows)."""
    files = find_files(source, path, split, classes)
    units = [(f, a, min(a + chunk_size, n)) for f in files
             for n in [_num_entries(source, f)] for a in range(0, n, chunk_size)]
    drops = {"constituents": 0, "jets": 0}
    for f, a, b in units[rank::world_size]:
        yield from READERS[source](f, a, b, n_max, features, drops, step=chunk_size)
    _warn_drops(drops, f"{source} {split} (rank {rank})")


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


def _array_digest(*arrays, block=1 << 24):
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        flat = a.reshape(-1)
        step = max(1, block // max(a.itemsize, 1))
        for i in range(0, len(flat), step):
            h.update(np.ascontiguousarray(flat[i:i + step]).tobytes())
        h.update(str(a.shape).encode())
    return h.hexdigest()


def load_subjets(jets, algorithm="ca", R=0.2, n_subjets=20, n_per_subjet=30, cache=True,
                 cache_dir=None):
    """cluster_subjets on `jets` (a Jets), cached like load_jets. The cache key is a digest of
    jets.p4 and jets.valid plus the options, so any change of the jets or options misses."""
    key = cache_key(kind="subjets", jets=_array_digest(jets.p4, jets.valid), algorithm=algorithm,
                    R=R, n_subjets=n_subjets, n_per_subjet=n_per_subjet)
    if cache and (hit := cache_load(Subjets, key, cache_dir)) is not None:
        return hit
    sub = cluster_subjets(jets.p4, jets.valid, algorithm, R, n_subjets, n_per_subjet)
    if cache:
        meta = dict(kind="subjets", algorithm=algorithm, R=R, n_subjets=n_subjets,
                    n_per_subjet=n_per_subjet, n=len(sub))
        sub = cache_save(sub, key, meta, cache_dir)
    return sub


# --- data: download -------------------------------------------------------------------------
# `python common.py download jetclass --split val --dir data/JetClass`   (5M jets, one tarball)
# `python common.py download toptagging --dir data/toptagging`           (train/val/test .h5)

ZENODO_JETCLASS = "https://zenodo.org/record/6619768/files/"
ZENODO_TOPTAG = "https://zenodo.org/record/2603256/files/"
# (url, md5); md5 sums as published with particle_transformer's get_datasets.py
DOWNLOADS = {
    ("jetclass", "train"): [(ZENODO_JETCLASS + f"JetClass_Pythia_train_100M_part{i}.tar", md5)
                            for i, md5 in enumerate([
                                "de4fd2dca2e68ab3c85d5cfd3bcc65c3", "9722a359c5ef697bea0fbf79bf50f003",
                                "1e9f66cd1f915f9d10e90ae1d7761720", "47348fc8985319fa4806da87500482fa",
                                "6b0ce16bd93b442a8d51914466990279", "416e347512e716de51d392bee327b8e9",
                                "e9b9c1557b1b39bf0a16e4ab631ae451", "5bfc6cb285ccb7680cefa9ac82ad1a2e",
                                "540c1a0d66dfad78d2b363c5740ccf86", "668f40b3275167ff7104c48317c0ae2a"])],
    ("jetclass", "val"): [(ZENODO_JETCLASS + "JetClass_Pythia_val_5M.tar",
                           "7235ccb577ed85023ea3ab4d5e6160cf")],
    ("jetclass", "test"): [(ZENODO_JETCLASS + "JetClass_Pythia_test_20M.tar",
                            "64e5156d26d101adeb43b8388207d767")],
    # no published md5 for these: each file is checked by opening it with the reader instead
    ("toptagging", None): [(ZENODO_TOPTAG + f"{s}.h5", None) for s in ("train", "val", "test")],
}


def _md5(path, block=1 << 22):
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def fetch(url, dest, md5=None, progress=True):
    """Download url to dest: resumes dest.part with an HTTP Range request, checks md5, then
    renames. A checksum mismatch removes the partial file (it cannot be trusted to resume)."""
    from tqdm import tqdm
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code != 416:  # 416: the part file is already complete
            raise SystemExit(f"{url}: HTTP {e.code} {e.reason}") from None
        resp = None
    except (urllib.error.URLError, OSError) as e:
        raise SystemExit(f"{url}: cannot connect ({e}); check the network and run again") from None
    if resp is not None:
        with resp:
            if have and resp.status != 206:  # server ignored the Range header: start over
                have = 0
            total = int(resp.headers.get("Content-Length", 0)) + have or None
            with open(part, "ab" if have else "wb") as f, \
                    tqdm(total=total, initial=have, unit="B", unit_scale=True,
                         desc=dest.name, disable=not progress) as bar:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    if md5 is not None and (got := _md5(part)) != md5:
        part.unlink()
        raise SystemExit(f"{dest}: md5 {got} does not match the published {md5}; the download "
                         "was removed, run the command again")
    os.replace(part, dest)
    return dest


def extract_root_tar(tar_path, out_dir, split_dir):
    """Extract a JetClass tarball and move its .root files into out_dir/split_dir/ (whatever
    folders the tarball uses inside), each with an atomic rename."""
    out_dir = Path(out_dir)
    tmp = out_dir / f".extract-{Path(tar_path).stem}"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(tar_path) as tar:
        tar.extractall(tmp, filter="data")
    (out_dir / split_dir).mkdir(parents=True, exist_ok=True)
    moved = 0
    for f in sorted(tmp.rglob("*.root")):
        os.replace(f, out_dir / split_dir / f.name)
        moved += 1
    shutil.rmtree(tmp)
    if not moved:
        raise SystemExit(f"{tar_path}: the archive holds no .root files")
    return moved


def download(dataset, split="val", out_dir=None, progress=True):
    out_dir = Path(out_dir or default_data_dir(dataset))
    out_dir.mkdir(parents=True, exist_ok=True)
    if dataset == "toptagging":
        for url, md5 in DOWNLOADS[("toptagging", None)]:
            dest = out_dir / url.rsplit("/", 1)[1]
            if not dest.exists():
                fetch(url, dest, md5, progress)
            n = _num_entries("toptagging", dest)  # opens the table: fails loudly if corrupt
            print(f"{dest}: {n} jets")
        return out_dir
    for url, md5 in DOWNLOADS[("jetclass", split)]:
        tar = out_dir / url.rsplit("/", 1)[1]
        done = out_dir / f".{tar.name}.done"  # the tarball is deleted after extraction
        if done.exists():
            continue
        if not tar.exists():
            fetch(url, tar, md5, progress)
        n = extract_root_tar(tar, out_dir, SPLIT_DIRS[split][0])
        done.touch()
        tar.unlink()
        print(f"{tar.name}: {n} files into {out_dir / SPLIT_DIRS[split][0]}")
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(prog="common.py", description="nanojet data tools")
    sub = parser.add_subparsers(dest="cmd", required=True)
    dl = sub.add_parser("download", help="download a public dataset (resumable, md5-checked)")
    dl.add_argument("dataset", choices=["jetclass", "toptagging"])
    dl.add_argument("--split", choices=list(SPLIT_DIRS), default="val",
                    help="JetClass split: train (10 tarballs, 100M jets), val (5M), test (20M)")
    dl.add_argument("--dir", default=None, help="target folder (default data/JetClass or "
                    "data/toptagging)")
    dl.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.cmd == "download":
        download(args.dataset, args.split, args.dir, progress=not args.no_progress)


# (development: the parts below are merged into this file by the lead)
from nn_part import *  # noqa: E402,F401,F403
from harness_part import *  # noqa: E402,F401,F403

if __name__ == "__main__":
    main()
