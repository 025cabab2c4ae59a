"""The streaming data path (common.JetStream): class mixing, sharding across ranks and workers,
resume mid-epoch, and agreement with the in-memory reader."""
from contextlib import nullcontext

import numpy as np
import pytest
import torch

import common
from forked import run_forked

CPU = torch.device("cpu")


def write_folder(root, n_per_file, files_per_class=1, classes=common.CLASSES, seed=0, nan_jets=0):
    """A JetClass-layout split folder of synthetic jets (fast; physics does not matter here);
    the first nan_jets jets of each file have only NaN constituents (the reader drops them)."""
    import awkward as ak
    import uproot
    rng = np.random.default_rng(seed)
    folder = root / "val_5M"
    folder.mkdir(parents=True)
    for c in classes:
        for k in range(files_per_class):
            n = n_per_file
            counts = rng.integers(3, 40, n)
            m = counts.sum()
            pt, eta, phi = rng.exponential(10, m) + 0.5, rng.normal(0, .2, m), rng.normal(0, .2, m)
            px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
            px[:counts[:nan_jets].sum()] = np.nan
            d = {f"part_{k2}": ak.unflatten(v.astype(np.float32), counts) for k2, v in dict(
                px=px, py=py, pz=pz, energy=np.sqrt(px ** 2 + py ** 2 + pz ** 2), deta=eta,
                dphi=phi).items()}
            d.update({f"jet_{k2}": rng.uniform(500, 1000, n).astype(np.float32)
                      for k2 in ("pt", "eta", "phi", "energy")})
            d.update({f"label_{c2}": np.full(n, c2 == c, dtype=np.int32) for c2 in common.CLASSES})
            with uproot.recreate(folder / f"{common.PREFIX[c]}_{k:03d}.root") as f:
                f.mktree("tree", d)
    return root


@pytest.fixture(scope="module")
def folder10(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("jc10"), 300)


def stream(folder, **kw):
    kw = dict(dict(split="val", path=folder, batch_size=64, shuffle_buffer=2000, seed=1), **kw)
    return common.JetStream("jetclass", **kw)


def ids(batch):
    return [tuple(r) for r in batch["source"].tolist()]


def test_batches_mix_the_classes(folder10):
    """Files hold one class each; every batch of 256 must still hold at least 8 of 10 classes."""
    s = stream(folder10, batch_size=256, shuffle_buffer=4000, chunk=200)
    for epoch in range(2):
        for batch in common.loader(s, CPU, epoch):
            assert len(np.unique(batch["y"].numpy())) >= 8


@pytest.mark.parametrize("workers", [0, 2])
def test_epoch_reads_each_jet_once_and_changes(folder10, workers):
    s = stream(folder10, workers=workers, chunk=150)
    seen = [sum((ids(b) for b in common.loader(s, CPU, e)), []) for e in range(2)]
    assert len(seen[0]) == len(s) * 64 == 3000 // 64 * 64
    assert len(set(seen[0])) == len(seen[0])       # no jet twice
    assert seen[0] != seen[1]                      # a new order each epoch
    again = sum((ids(b) for b in common.loader(s, CPU, 0)), [])
    assert again == seen[0]                        # a pure function of (seed, epoch)


def _rank_ids(rank, world, folder, epoch, out):
    s = stream(folder, rank=rank, world_size=world, workers=2, chunk=150)
    ids_ = sum((ids(b) for b in common.loader(s, CPU, epoch)), [])
    torch.save((len(s), ids_), out / f"rank{rank}-epoch{epoch}.pt")


def test_two_ranks_two_workers_read_every_jet_once(folder10, tmp_path):
    """2 ranks x 2 workers (the sharding torchrun uses: rank and world size) over one epoch:
    disjoint, and together everything but a tail smaller than one global batch."""
    for epoch in range(2):
        assert run_forked(_rank_ids,
                          [(r, 2, folder10, epoch, tmp_path) for r in range(2)]) == [0, 0]
        (n0, a), (n1, b) = (torch.load(tmp_path / f"rank{r}-epoch{epoch}.pt") for r in range(2))
        assert n0 == n1 == len(a) // 64 == len(b) // 64    # the same number of steps
        assert not set(a) & set(b)
        assert 3000 - len(set(a) | set(b)) < 2 * 64


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_continues_exactly(folder10, workers):
    s = stream(folder10, workers=workers, chunk=150)
    full = [(step, ids(b)) for step, _, b in common.train_batches(s, CPU, 2)]
    assert len(full) == 2 * len(s)
    for start in (5, len(s) + 3):
        resumed = [(step, ids(b))
                   for step, _, b in common.train_batches(s, CPU, 2, start_step=start)]
        assert resumed == full[start:]


def test_steps_overrides_epochs(folder10):
    s = stream(folder10, chunk=150)
    steps = [step for step, _, _ in common.train_batches(s, CPU, 1, steps=len(s) + 4)]
    assert steps == list(range(len(s) + 4))


def test_stream_and_memory_give_the_same_features(folder10):
    """The streaming path and load_jets (in memory) compute identical features for a jet."""
    mem = common.load_jets("jetclass", folder10, split="val", n_max=32, features="kin",
                           cache=False)
    s = stream(folder10, n_max=32, shuffle=False, drop_last=False)
    files = s.files
    seen = 0
    offsets = np.cumsum([0] + s.counts)
    for batch in common.loader(s, CPU):
        row = offsets[batch["source"][:, 0].numpy()] + batch["source"][:, 1].numpy()
        L = batch["x"].shape[1]
        np.testing.assert_array_equal(batch["x"].numpy(), mem.x[row, :L])
        np.testing.assert_array_equal(batch["valid"].numpy(), mem.valid[row, :L])
        assert not mem.valid[row, L:].any()
        assert L % 16 == 0 or L == 32
        seen += len(row)
    assert seen == len(mem) == 3000 and len(files) == 10


def test_n_jets_is_spread_over_the_class_files(folder10):
    s = stream(folder10, n_jets=1000)
    assert s.counts == [100] * 10 and s.n == 1000


def test_in_memory_source_and_extra_arrays():
    rng = np.random.default_rng(0)
    n, L = 300, 8
    valid = np.arange(L)[None] < rng.integers(1, L + 1, n)[:, None]
    jets = common.Jets(x=rng.normal(size=(n, L, 3)).astype(np.float32) * valid[..., None],
                       p4=np.zeros((n, L, 4), np.float32), valid=valid, y=np.arange(n) % 2,
                       jet=np.zeros((n, 4), np.float32))
    s = common.JetStream(jets, batch_size=32, extra={"label": np.arange(n) * 10}, n_max=L)
    got = []
    for b in common.loader(s, CPU):
        assert (b["label"].numpy() == b["source"][:, 1].numpy() * 10).all()
        i = b["source"][:, 1].numpy()
        np.testing.assert_array_equal(b["x"].numpy(), jets.x[i, :b["x"].shape[1]])
        got += i.tolist()
    assert len(got) == len(set(got)) == 300 // 32 * 32


def test_transform_runs_on_each_batch(folder10):
    def count(batch):
        return dict(batch, n=batch["valid"].sum(1))
    s = stream(folder10, transform=count, workers=0)
    b = next(iter(common.loader(s, CPU)))
    assert (b["n"] == b["valid"].sum(1)).all()


def test_seed_of_separates_purposes():
    assert common.seed_of(0, "masks", 1) != common.seed_of(0, "order", 1)
    assert common.seed_of(1, "masks", 0) != common.seed_of(0, "masks", 1000)
    assert common.seed_of(3, "x") == common.seed_of(3, "x")


def test_dropped_jets_never_change_the_step_count(tmp_path):
    """Jets the reader drops (here: NaN constituents) leave a worker short; it repeats jets it
    read, so every rank still takes len(stream) steps of full batches (DDP would hang)."""
    folder = write_folder(tmp_path, 100, classes=["QCD", "Tbqq"], nan_jets=6)
    for workers in (0, 2):
        s = stream(folder, batch_size=16, workers=workers)
        assert len(s) == 200 // 16                  # counted from metadata: 12 steps
        with pytest.warns(UserWarning, match="dropped") if workers == 0 else nullcontext():
            sizes = [len(b["y"]) for b in common.loader(s, CPU)]
        assert sizes == [16] * 12                   # 188 readable jets make only 11 batches
