"""Data-layer throughput on this machine: jet generation, ROOT read + features, Top Tagging
HDF5 read, subjet reclustering, cached loading, and the streaming loader (common.JetStream).
One process per figure; set OMP_NUM_THREADS=1 for per-core numbers.

    python -m scripts.bench_data                 # about a minute on a 2-core CPU
    python -m scripts.bench_data --n-jets 100000 --gen-jets 0
    # streaming: a JetClass-layout folder (real split names) of >= 1M jets, made by hard-linking
    # generated files under JetClass names (no extra disk), then the loader's figures
    python -m scripts.jetgen --out data/jc10 --classes all --preset jetclass \
        --jets-per-class 20000 --workers 2
    python -m scripts.bench_data --make-folder data/jc_bench --from data/jc10 --copies 7
    python -m scripts.bench_data --stream data/jc_bench
    # GPU node: >= 50k jets/s?
    python -m scripts.bench_data --stream data/jc_bench --workers 8 --n-jets 1000000
    python -m scripts.bench_data --peak-rss jjepa.py --data jetclass --data-dir data/jc_bench \
        --steps 50 --workers 2
"""
import argparse
import functools
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import awkward as ak
import h5py
import numpy as np
import uproot

import common


def write_jetclass_like(path, n, seed=0):
    """A JetClass-layout ROOT file (TTree, part_* branches) with realistic multiplicities."""
    rng = np.random.default_rng(seed)
    counts = np.clip(rng.normal(70, 20, n).astype(int), 5, 200)
    m = counts.sum()
    pt = rng.exponential(15, m) + 0.5
    eta = rng.normal(0, 0.3, m)
    phi = rng.normal(0, 0.3, m)
    px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
    e = np.sqrt(px ** 2 + py ** 2 + pz ** 2)
    jag = lambda a, t=np.float32: ak.unflatten(a.astype(t), counts)  # noqa: E731
    d = {f"part_{k}": jag(v) for k, v in dict(
        px=px, py=py, pz=pz, energy=e, deta=eta, dphi=phi, d0val=rng.normal(0, .1, m),
        d0err=rng.random(m), dzval=rng.normal(0, .1, m), dzerr=rng.random(m),
        charge=rng.integers(-1, 2, m)).items()}
    for b in common.PID_BRANCHES:
        d[b] = jag(rng.integers(0, 2, m), np.int32)
    for k in ("pt", "eta", "phi", "energy"):
        d[f"jet_{k}"] = rng.uniform(500, 1000, n).astype(np.float32)
    for c in common.CLASSES:
        d[f"label_{c}"] = np.full(n, c == "Tbqq", dtype=np.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with uproot.recreate(path) as f:
        f.mktree("tree", d)  # a TTree, as the real files (f["tree"] = ... may give an RNTuple)


def timed(fn, n, label):
    """Prints jets per wall-clock second and per CPU second of this process (the second is
    the per-core figure and is less disturbed when other jobs share the machine)."""
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    dt, dc = time.perf_counter() - t, time.process_time() - c
    print(f"{label:<60s} {n / dt:>11,.0f} jets/s wall {n / max(dc, 1e-9):>11,.0f} jets/CPU-s"
          f"   ({n} jets, {dt:.2f} s)")
    return out


# --- streaming ---------------------------------------------------------------------------------


def make_folder(src, out, copies):
    """A JetClass-layout folder (train_100M/, val_5M/, test_20M/) holding every jetgen file of
    `src` `copies` times under JetClass names (ZJetsToNuNu_000.root ...), as hard links."""
    out = Path(out)
    for split, real in (("train", "train_100M"), ("val", "val_5M"), ("test", "test_20M")):
        files = sorted((Path(src) / split).glob("*.root"))
        (out / real).mkdir(parents=True, exist_ok=True)
        by_class = {}
        for f in files:
            by_class.setdefault(f.name.rsplit("_", 1)[0], []).append(f)
        for prefix, fs in by_class.items():
            for c in range(copies):
                for i, f in enumerate(fs):
                    dst = out / real / f"{prefix}_{c * len(fs) + i:03d}.root"
                    if not dst.exists():
                        os.link(f, dst)
        n = sum(common._num_entries("jetclass", f) for f in (out / real).glob("*.root"))
        print(f"{out / real}: {len(list((out / real).glob('*.root')))} files, {n:,} jets")


def subjets(batch):
    """J-JEPA's per-batch work in the loader workers: C/A R=0.2, 20 x 30 subjets."""
    sub = common.cluster_subjets(batch["p4"], batch["valid"], "ca", 0.2, 20, 30)
    return dict(batch, idx=np.where(sub.valid, sub.idx, -1).astype(np.int16), sub_p4=sub.p4)


def stream_rate(folder, features, workers, n, with_subjets, batch_size):
    """Jets/s of the loader alone (batches consumed and dropped): wall clock after the first batch,
    and per CPU-second of the main process plus its workers, buffer filling included."""
    import torch
    s = common.JetStream("jetclass", "train", path=folder, features=features,
                         batch_size=batch_size, workers=workers,
                         transform=subjets if with_subjets else None)
    c = time.process_time()
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    seen, t = 0, None
    for batch in common.loader(s, torch.device("cpu")):
        if t is None:  # the wall clock starts at the first batch: filling the buffer is not timed
            t = time.perf_counter()
            continue
        seen += len(batch["y"])
        if seen >= n:
            break
    dt = time.perf_counter() - t
    del batch
    import gc
    gc.collect()  # ends the DataLoader, so its workers are reaped and their CPU time counted
    kids2 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = time.process_time() - c + (kids2.ru_utime + kids2.ru_stime
                                     - kids.ru_utime - kids.ru_stime)
    label = f"stream '{features}'{' + subjets' if with_subjets else ''}, {workers} worker(s)"
    print(f"{label:<60s} {seen / dt:>11,.0f} jets/s wall "
          f"{seen / max(cpu, 1e-9):>11,.0f} jets/CPU-s   ({seen} jets, {dt:.2f} s)")


def rss_child(folder, n_jets, steps, workers):
    """A whole small training process on the stream: ParT-lite encoder ("small"), AdamW, `steps`
    steps over a split capped at n_jets. Prints the peak RSS of the process and of its workers."""
    import torch
    torch.set_num_threads(1)
    s = common.JetStream("jetclass", "train", path=folder, n_jets=n_jets, features="full",
                         batch_size=256, workers=workers)
    model = common.Encoder(common.EncoderConfig(in_dim=17, dim=64, heads=4, depth=2, cls_depth=1))
    head = torch.nn.Linear(64, 10)
    opt = common.configure_optimizer(torch.nn.ModuleList([model, head]), 1e-3, 0.01)
    for step, epoch, b in common.train_batches(s, torch.device("cpu"), 1, steps=steps):
        loss = torch.nn.functional.cross_entropy(head(model(b["x"], b["valid"], b["p4"])[2]),
                                                 b["y"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"training process, split capped at {s.n:>9,} jets ({len(s)} steps/epoch), "
          f"{steps} steps, {workers} workers: peak RSS {me:,.0f} MB (main), "
          f"{kids:,.0f} MB (largest worker)")


def peak_rss(argv):
    """Run argv[0] (a nanojet script) as __main__ with argv[1:], print its peak memory at exit."""
    import atexit
    import runpy

    def report():
        me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        kid = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"peak RSS: {me:,.0f} MB (main process), {kid:,.0f} MB (largest worker)", flush=True)
    atexit.register(report)
    sys.argv = list(argv)
    runpy.run_path(argv[0], run_name="__main__")


def bench_stream(args):
    folder = Path(args.stream)
    for feats, sub in (("kin", False), ("full", False), ("full", True)):
        for workers in (int(w) for w in args.workers.split(",")):
            stream_rate(folder, feats, workers, args.n_jets, sub, args.batch_size)
    for n in (250_000, 1_000_000_000):  # the second: the whole folder
        subprocess.run([sys.executable, "-m", "scripts.bench_data", "--rss-child", str(folder),
                        str(n)], check=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-jets", type=int, default=20_000,
                    help="jets for read/subjet/cache figures")
    ap.add_argument("--gen-jets", type=int, default=100,
                    help="jets per class to generate (0: skip)")
    ap.add_argument("--batch-size", type=int, default=512, help="batch size for the cached epoch")
    ap.add_argument("--stream", metavar="DIR",
                    help="benchmark the streaming loader on this JetClass-layout folder")
    ap.add_argument("--workers", default="1,2",
                    help="--stream: comma-separated loader worker counts")
    ap.add_argument("--make-folder", metavar="OUT",
                    help="build a JetClass-layout folder from --from by hard links")
    ap.add_argument("--from", dest="src", metavar="DIR",
                    help="a jetgen output folder (train/ val/ test/)")
    ap.add_argument("--copies", type=int, default=7,
                    help="times each generated file appears in --make-folder")
    ap.add_argument("--rss-child", nargs=2, metavar=("DIR", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--peak-rss", nargs=argparse.REMAINDER, metavar="SCRIPT ...",
                    help="run a script with its flags in this process, then print the peak RSS "
                         "of the process and of its largest child (loader workers)")
    args = ap.parse_args()
    if args.peak_rss:
        return peak_rss(args.peak_rss)
    if args.rss_child:
        return rss_child(Path(args.rss_child[0]), int(args.rss_child[1]), steps=50, workers=2)
    if args.make_folder:
        return make_folder(args.src, args.make_folder, args.copies)
    print(f"cores: {os.cpu_count()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"load average {os.getloadavg()[0]:.1f}")
    if args.stream:
        return bench_stream(args)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        if args.gen_jets:
            try:
                from scripts import jetgen
                for c in ("QCD", "Tbqq"):
                    timed(lambda: jetgen.generate(tmp / f"gen{c}", classes=(c,), seed=0, workers=1,
                                                  jets_per_class=args.gen_jets, progress=False),
                          args.gen_jets, f"generation, {c}, toptagging preset, 1 process")
            except ImportError:
                print("generation: scripts/jetgen.py not found, skipped")

        write_jetclass_like(tmp / "jc/val_5M/TTBar_000.root", args.n_jets)
        for feats in ("kin", "full"):
            jets = timed(lambda: common.load_jets("jetclass", tmp / "jc", split="val",
                                                 features=feats, cache=False),
                         args.n_jets, f"ROOT read + '{feats}' features (uncached)")

        # Top Tagging layout: the 300-jet fixture repeated to n_jets rows, zlib as the original
        fixture = Path(__file__).resolve().parents[2] / "shared/fixtures/toptagging_sample.h5"
        if fixture.exists():
            with h5py.File(fixture) as f:
                rows = f["table/table"][...]
                attrs = dict(f["table/table"].attrs)
            rows = np.resize(rows, args.n_jets)
            with h5py.File(tmp / "tt.h5", "w") as f:
                d = f.create_dataset("table/table", data=rows, chunks=(1000,), compression="gzip")
                d.attrs.update(attrs)
            top = timed(lambda: common.load_jets("toptagging", tmp / "tt.h5", cache=False),
                        args.n_jets, "Top Tagging HDF5 read + 'kin' features (uncached)")
            jets = top  # realistic constituent distributions for the subjets below
        for algo in ("ca", "kt"):
            timed(lambda: common.cluster_subjets(jets.p4, jets.valid, algorithm=algo, R=0.2),
                  len(jets), f"subjets {algo} R=0.2, 20 x 30 (fastjet awkward, 1 process)")

        common.load_jets("jetclass", tmp / "jc", split="val", features="full", cache_dir=cache)
        hit = timed(lambda: common.load_jets("jetclass", tmp / "jc", split="val", features="full",
                                             cache_dir=cache),
                    args.n_jets, "cache hit: open (memory-mapped)")

        timed(lambda: [np.array(a) for a in (hit.x, hit.p4, hit.valid, hit.y, hit.jet)],
              args.n_jets, "cache hit: copy every array into memory (sequential)")

        def epoch():
            order = np.random.default_rng(0).permutation(len(hit))
            total = 0.0
            for i in range(0, len(hit), args.batch_size):
                idx = np.sort(order[i:i + args.batch_size])
                total += float(hit.x[idx].sum() + hit.p4[idx, :, 3].sum()) + hit.valid[idx].sum()
            return total
        timed(epoch, args.n_jets,
              f"cached epoch, 'full', shuffled numpy batches of {args.batch_size}")
        import torch
        memory = common.JetStream(common.Jets(*(np.asarray(a) for a in (hit.x, hit.p4, hit.valid,
                                                                        hit.y, hit.jet))),
                                  batch_size=args.batch_size, n_max=hit.x.shape[1])
        timed(lambda: sum(len(b["valid"]) for b in common.loader(memory, torch.device("cpu"))),
              args.n_jets, "in-memory epoch via common.JetStream (torch, padded per batch)")


if __name__ == "__main__":
    main()
