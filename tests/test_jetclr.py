"""JetCLR: augmentation invariants, the loss against a naive loop and across ranks, pooling,
determinism, resume and tiny runs through the streaming data path (common.JetStream) on a small
JetClass-layout folder of synthetic one-prong (QCD) and three-prong (top) jets."""
import math
import shutil

import numpy as np
import pytest
import torch

import common
import jetclr
from forked import run_forked

NO_AUG = dict(rotate=False, translate=0.0, smear=0.0, split=0.0)
CPU = torch.device("cpu")


def fake_batch(seed=0, B=8, N=32):
    """Jets at varied (eta, phi), including one with no free slot and one with one particle."""
    g = torch.Generator().manual_seed(seed)
    n = torch.tensor([3, 10, N, 20, 1, 15, 7, 28])[:B]
    valid = torch.arange(N)[None] < n[:, None]
    pt = 0.05 + 50 * torch.rand(B, N, generator=g) ** 3  # down to 50 MeV: smearing stays finite
    eta = torch.linspace(-2, 2, B)[:, None] + 0.3 * torch.randn(B, N, generator=g)
    phi = torch.linspace(-3, 3, B)[:, None] + 0.3 * torch.randn(B, N, generator=g)
    return p4_of(pt, eta, phi) * valid[..., None], valid


def p4_of(pt, eta, phi, m=0.14):
    return torch.stack([pt * torch.cos(phi), pt * torch.sin(phi), pt * torch.sinh(eta),
                        torch.sqrt(m ** 2 + (pt * torch.cosh(eta)) ** 2)], -1)


def pt_of(p4):
    return torch.hypot(p4[..., 0], p4[..., 1])


def view(p4, valid, axis, seed, **only):
    """One view with only the augmentations named in `only` (NO_AUG otherwise)."""
    return jetclr.augment(p4, valid, axis, torch.Generator().manual_seed(seed),
                          **dict(NO_AUG, **only))


# --- a tiny JetClass-layout folder ---------------------------------------------------------------

def write_jets(path, n, prongs, rng, label):
    import awkward as ak
    import uproot
    counts = rng.integers(8, 28, n)
    cols = {k: [] for k in ("px", "py", "pz", "energy", "deta", "dphi")}
    jets = []
    for c in counts:
        eta0, phi0 = rng.uniform(-1.5, 1.5), rng.uniform(-np.pi, np.pi)
        centre = rng.normal(0, 0.25, (prongs, 2)) * (prongs > 1)
        which = rng.integers(0, prongs, c)
        eta = eta0 + centre[which, 0] + rng.normal(0, 0.04, c)
        phi = phi0 + centre[which, 1] + rng.normal(0, 0.04, c)
        pt = 600 * rng.dirichlet(np.full(c, 0.7))
        px, py, pz, e = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta), pt * np.cosh(eta)
        j = np.array([px.sum(), py.sum(), pz.sum(), e.sum()])
        jpt = np.hypot(j[0], j[1])
        jeta, jphi = np.arcsinh(j[2] / jpt), np.arctan2(j[1], j[0])
        jets.append([jpt, jeta, jphi, j[3]])
        for k, v in dict(px=px, py=py, pz=pz, energy=e, deta=common.signed_deta(eta, jeta),
                         dphi=common.wrap_phi(phi - jphi)).items():
            cols[k].append(v)
    d = {f"part_{k}": ak.unflatten(np.concatenate(v).astype(np.float32), counts)
         for k, v in cols.items()}
    jets = np.array(jets, dtype=np.float32)
    d.update({f"jet_{k}": jets[:, i] for i, k in enumerate(("pt", "eta", "phi", "energy"))})
    d.update({f"label_{c}": np.full(n, c == label, dtype=np.int32) for c in common.CLASSES})
    with uproot.recreate(path) as f:
        f.mktree("tree", d)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("jc2")
    rng = np.random.default_rng(0)
    for split, n in (("train_100M", 128), ("val_5M", 48)):
        (root / split).mkdir()
        write_jets(root / split / "ZJetsToNuNu_000.root", n, 1, rng, "QCD")
        write_jets(root / split / "TTBar_000.root", n, 3, rng, "Tbqq")
    return root


TINY = ["--data", "jetclass", "--epochs", "2", "--batch-size", "32", "--dim", "16", "--depth", "1",
        "--heads", "2", "--n-eval", "64", "--warmup", "2", "--device", "cpu", "--n-jets", "128",
        "--n-max", "32", "--log-every", "2"]


@pytest.fixture
def tiny_args(folder, tmp_path):
    return lambda out, *extra: jetclr.get_args(TINY + ["--data-dir", str(folder),
                                                       "--out", str(tmp_path / out), *extra])


# --- augmentations ---------------------------------------------------------------------------

def test_rotation_and_translation_keep_pt():
    p4, valid = fake_batch()
    axis = jetclr.jet_axis(p4, valid)
    for kw in (dict(NO_AUG, rotate=True), dict(NO_AUG, translate=1.0)):
        out, v = jetclr.augment(p4, valid, axis, torch.Generator().manual_seed(1), **kw)
        assert torch.equal(v, valid)
        torch.testing.assert_close(pt_of(out), pt_of(p4), rtol=1e-5, atol=1e-5)  # each particle
        assert (out - p4).abs().max() > 1e-2  # the augmentation did move something
    # a translation moves every particle by the same (deta, dphi): the jet's vector pT is kept too
    out, _ = view(p4, valid, axis, 2, translate=1.0)
    torch.testing.assert_close(pt_of(out.sum(1)), pt_of(p4.sum(1)), rtol=1e-5, atol=1e-3)
    # a rotation keeps each particle's distance to the jet axis
    def dist(q):
        c = jetclr.to_centred(q, valid, axis)
        return torch.hypot(c[..., 1], c[..., 2])
    out, _ = view(p4, valid, axis, 3, rotate=True)
    torch.testing.assert_close(dist(out), dist(p4), rtol=1e-4, atol=1e-4)


def test_translation_range_is_the_public_codes_measured_before_rotation():
    """Issue 12 item 8: shift ~ U(+-w x extent), extent = max - min of the un-augmented jet."""
    B = 400
    deta = torch.tensor([-0.1, 0.1]).expand(B, 2)  # extent 0.2 in eta, 0 in phi
    p4 = p4_of(torch.full((B, 2), 50.0), deta, torch.full((B, 2), 1.0))  # axis (0, 1)
    valid = torch.ones(B, 2, dtype=torch.bool)
    axis = jetclr.jet_axis(p4, valid)
    centre = jetclr.to_centred(p4, valid, axis)[..., 1:3].mean(1)  # (B, 2)
    for rotate in (False, True):
        out, _ = jetclr.augment(p4, valid, axis, torch.Generator().manual_seed(0),
                                **dict(NO_AUG, rotate=rotate, translate=1.0))
        # (B, 2) the jet's move (a rotation about the axis keeps the centre: it is the axis)
        shift = jetclr.to_centred(out, valid, axis)[..., 1:3].mean(1) - centre
        assert shift[:, 0].abs().max() <= 0.2 + 1e-4  # within w x extent
        assert shift[:, 0].abs().max() > 0.18  # and filling it (half the extent: <= 0.1)
        # the phi extent is 0 before the rotation, whatever the rotation makes of it
        assert shift[:, 1].abs().max() < 1e-4
    # width 0.5 halves the range
    out, _ = jetclr.augment(p4, valid, axis, torch.Generator().manual_seed(0),
                            **dict(NO_AUG, translate=0.5))
    shift = jetclr.to_centred(out, valid, axis)[..., 1].mean(1) - centre[:, 0]
    assert 0.09 < shift.abs().max() <= 0.1 + 1e-4


def test_smearing_keeps_pt_and_stays_finite():
    p4, valid = fake_batch()
    axis = jetclr.jet_axis(p4, valid)
    out, v = view(p4, valid, axis, 1, smear=0.1)
    assert torch.equal(v, valid) and torch.isfinite(out).all()
    torch.testing.assert_close(pt_of(out), pt_of(p4), rtol=1e-5, atol=1e-5)
    # soft particles move more than hard ones (width 0.1 GeV / pT)
    c0, c1 = jetclr.to_centred(p4, valid, axis), jetclr.to_centred(out, valid, axis)
    shift = (c1[..., 1] - c0[..., 1]).abs()
    soft, hard = valid & (pt_of(p4) < 1), valid & (pt_of(p4) > 20)
    assert shift[soft].mean() > 10 * shift[hard].mean()


def test_a_split_child_with_zero_pt_keeps_the_features_finite():
    """A split that draws z = 0 leaves a real particle with a zero 4-vector (about once in
    2,000 steps of 128 jets: a CPU study's pretraining stopped on it with a NaN loss)."""
    p4, valid = fake_batch()
    p4[0, 1] = 0.0  # a real particle with pT 0
    assert valid[0, 1]
    assert torch.isfinite(jetclr.kin_features(p4, valid)).all()


def test_collinear_split_keeps_four_momentum_and_adds_one_slot_per_split():
    p4, valid = fake_batch()
    axis = jetclr.jet_axis(p4, valid)
    out, v = view(p4, valid, axis, 1, split=0.5)
    torch.testing.assert_close(out.sum(1), p4.sum(1), rtol=1e-5, atol=2e-3)
    # every split leaves a lighter parent in its slot and puts one child into a free slot
    parents = valid & (pt_of(out) < pt_of(p4) * (1 - 1e-6))
    assert parents.sum() > 0
    assert torch.equal(v.sum(1) - valid.sum(1), parents.sum(1))
    assert torch.equal(v[:, :1], valid[:, :1]) and (v | ~valid).all()
    # valid-first order survives (the encoder's trimming relies on it)
    assert torch.equal(v, torch.arange(v.shape[1])[None] < v.sum(1, keepdim=True))
    # split everything: each jet doubles, or fills up when there are fewer free slots
    out, v = view(p4, valid, axis, 2, split=1.0)
    assert torch.equal(v.sum(1), torch.minimum(2 * valid.sum(1), torch.tensor(valid.shape[1])))
    torch.testing.assert_close(out.sum(1), p4.sum(1), rtol=1e-5, atol=2e-3)
    # a child is collinear with its parent: the directions after the split are those before
    c, c0 = jetclr.to_centred(out, v, axis), jetclr.to_centred(p4, valid, axis)
    for b in range(len(v)):
        d = torch.cdist(c[b, v[b], 1:3], c0[b, valid[b], 1:3]).amin(1)
        assert d.max() < 2e-3  # fp32 round trip through (px, py, pz, E)


def test_padding_never_becomes_a_particle():
    p4, valid = fake_batch()
    axis = jetclr.jet_axis(p4, valid)
    # garbage in the padding must neither leak out nor be moved into the jet
    dirty = torch.where(valid[..., None], p4, torch.full_like(p4, 7.0))
    gen = torch.Generator().manual_seed(4)
    out, v = jetclr.augment(dirty, valid, axis, gen, rotate=True, translate=1.0, smear=0.1,
                            split=0.0)
    assert torch.equal(v, valid)
    assert (out[~valid] == 0).all()
    out, v = jetclr.augment(p4, valid, axis, gen, rotate=True, translate=1.0, smear=0.1, split=0.5)
    assert (out[~v] == 0).all() and (pt_of(out)[v] > 0).all()
    assert v[2].all() and torch.equal(v[2], valid[2])  # a full jet has no slot to split into
    # a jet's translation range comes from its particles alone: a single particle is not moved
    c0, c1 = jetclr.to_centred(p4, valid, axis), jetclr.to_centred(
        jetclr.augment(p4, valid, axis, gen, **dict(NO_AUG, translate=1.0))[0], valid, axis)
    torch.testing.assert_close(c1[4, 0], c0[4, 0], rtol=1e-5, atol=1e-5)


def test_features_match_common_recipe_on_unaugmented_jets(folder):
    jets = common.load_jets("jetclass", folder, "val", n_jets=64, n_max=32, cache=False)
    p4, valid = torch.from_numpy(np.array(jets.p4)), torch.from_numpy(np.array(jets.valid))
    f = jetclr.kin_features(p4, valid).numpy()
    # same standardisation and deta sign convention as common's reader
    assert np.abs(f - jets.x)[jets.valid].max() < 2e-3
    assert (f[~jets.valid] == 0).all()


# --- loss, pooling, encoder ----------------------------------------------------------------------

def test_nt_xent_equals_naive_loop():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    t = 0.1
    z = torch.cat([z1, z2])
    zn = z / z.norm(dim=1, keepdim=True)
    total = 0.0
    for i in range(10):
        num = math.exp(float(zn[i] @ zn[(i + 5) % 10]) / t)
        den = sum(math.exp(float(zn[i] @ zn[k]) / t) for k in range(10) if k != i)
        total += -math.log(num / den)
    assert jetclr.nt_xent(z, t).item() == pytest.approx(total / 10, rel=1e-5)
    # without a process group, gathering is a no-op
    assert jetclr.nt_xent(z, t, gather=True).item() == pytest.approx(total / 10, rel=1e-5)


def _ddp_rank(rank, world, init, x, out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    n = len(x) // 2 // world  # jets per rank; x = [view 1 of all jets; view 2 of all jets]
    v1, v2 = x.chunk(2)
    model = DDP(lin)  # held: its gradient hooks must outlive the forward
    mine = torch.cat([v1[rank * n:][:n], v2[rank * n:][:n]])  # this rank's jets, both views
    loss = jetclr.nt_xent(model(mine), 0.1, gather=True)
    (loss * world).backward()  # as train() does
    torch.save((rank, loss.item(), lin.weight.grad.numpy().copy()), out / f"rank{rank}.pt")
    dist.barrier()
    return model  # kept alive until the rank exits: see tests/forked.py


def test_nt_xent_negatives_span_all_ranks(tmp_path):
    """Issue 12 item 10: 2 gloo ranks x 3 jets give the loss and the gradient of one process on
    the 6 jets (SimCLR's global batch)."""
    x = torch.randn(12, 4, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    ref = jetclr.nt_xent(lin(x), 0.1)
    ref.backward()
    local = jetclr.nt_xent(lin(torch.cat([x[:3], x[6:9]])), 0.1)
    assert abs(local.item() - ref.item()) > 1e-3  # per-rank negatives would be another task
    codes = run_forked(_ddp_rank, [(r, 2, f"file://{tmp_path / 'store'}", x, tmp_path)
                                   for r in range(2)])
    assert codes == [0, 0], "a rank failed or hung (its traceback is above)"
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for rank, loss, grad in results:
        assert loss == pytest.approx(ref.item(), rel=1e-6)
        np.testing.assert_allclose(grad, lin.weight.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_default_pooling_is_ptsum_and_infrared_safe():
    """Issue 12 item 9: the default pools tokens weighted by pT, so a particle of vanishing pT
    does not change the jet vector; class attention gives it a weight of its own."""
    assert jetclr.get_args([]).pooling == "ptsum"
    p4, valid = fake_batch()
    soft_p4, soft_valid = p4.clone(), valid.clone()
    soft_p4[0, 3] = p4_of(torch.tensor(1e-6), torch.tensor(-2.2), torch.tensor(-2.8), m=0.0)
    soft_valid[0, 3] = True
    for pooling, safe in (("ptsum", True), ("cls", False)):
        args = jetclr.get_args(["--dim", "16", "--heads", "2", "--depth", "0", "--cls-depth", "1",
                                "--pooling", pooling])
        torch.manual_seed(0)
        enc = jetclr.build_encoder(jetclr.encoder_config(args)).eval()
        diff = (enc(valid, p4)[2][0] - enc(soft_valid, soft_p4)[2][0]).abs().max()
        assert (diff < 1e-4) if safe else (diff > 1e-2), (pooling, diff)


def test_forward_has_no_graph_breaks():
    args = jetclr.get_args(["--dim", "16", "--heads", "2", "--depth", "1", "--pair-bias"])
    model = jetclr.JetCLR(jetclr.encoder_config(args), 16)
    views = jetclr.two_views(*fake_batch(), torch.Generator().manual_seed(0), args)
    explained = torch._dynamo.explain(model)(*views)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_tiny_model_overfits_one_batch():
    p4, valid = fake_batch(N=16)
    args = jetclr.get_args(["--dim", "16", "--depth", "1", "--heads", "2"])
    torch.manual_seed(0)
    model = jetclr.JetCLR(jetclr.encoder_config(args), 16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    views = jetclr.two_views(p4, valid, torch.Generator().manual_seed(0), args)
    losses = []
    for _ in range(60):
        loss = jetclr.nt_xent(model(*views), 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 2.0 and losses[-1] < 0.3 * losses[0]


# --- tiny runs through the streaming path ------------------------------------------------------

def test_tiny_run_is_bitwise_deterministic_and_loads_for_finetuning(tiny_args, tmp_path, folder):
    r1 = jetclr.train(tiny_args("a", "--no-lct"))
    r2 = jetclr.train(tiny_args("b", "--no-lct"))
    assert np.isfinite(r1["loss"]) and r1["loss"] == r2["loss"]
    assert r1["val_loss"] == r2["val_loss"]
    a, b = (common.load_checkpoint(tmp_path / d / "jetclr.pt") for d in "ab")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # finetune.py's path: the module's interface on a stream batch
    assert a["method"] == "jetclr" and jetclr.batch_transform(a["encoder_config"]) is None
    enc = jetclr.build_encoder(a["encoder_config"])
    enc.load_state_dict(a["encoder"])
    stream = common.JetStream("jetclass", "val", path=folder, n_jets=16, n_max=32, batch_size=16,
                              shuffle=False, drop_last=False, pad=jetclr.PAD)
    batch = next(common.loader(stream, CPU))
    tokens, tok_valid, jet = enc(**jetclr.encoder_inputs(batch, a["encoder_config"]))
    assert jet.shape == (16, 16) and torch.isfinite(tokens).all()


def test_resume_continues_bit_for_bit(tiny_args, tmp_path, monkeypatch):
    save = common.save_checkpoint  # keep the checkpoint written after the first epoch

    def keep_first(path, **kw):
        save(path, **kw)
        if kw["step"] == 4:
            shutil.copy(path, tmp_path / "epoch1.pt")

    monkeypatch.setattr(common, "save_checkpoint", keep_first)
    full = jetclr.train(tiny_args("full", "--no-lct"))
    resumed = jetclr.train(tiny_args("res", "--no-lct", "--resume", str(tmp_path / "epoch1.pt")))
    assert full["loss"] == resumed["loss"] and full["val_loss"] == resumed["val_loss"]


def test_validation_with_fewer_jets_than_a_batch_uses_them_all(tiny_args, folder, capsys):
    """Issue 12 item 7: 20 val jets, batches of 32: one short batch, never "val 0.0000". The
    jets come in memory (train(args, data=...)): the folder's val split holds 96."""
    data = {split: common.load_jets("jetclass", folder, split, n_jets=n, n_max=32, cache=False)
            for split, n in (("train", 128), ("val", 20))}
    r = jetclr.train(tiny_args("few", "--no-lct", "--epochs", "1"), data=data)
    assert np.isfinite(r["val_loss"]) and r["val_loss"] > 1.0  # chance: log(39) = 3.7
    out = capsys.readouterr().out
    assert "step 4/4 (epoch 0): val loss" in out and "over 20 val jets" in out


def test_tiny_run_learns_and_reports_lct_fitted_on_train_scored_on_val(tiny_args, monkeypatch,
                                                                        capsys):
    splits = []
    embed = common.embed_stream

    def record(encoder, stream, *a, **kw):
        splits.append(stream.files[0].parent.name)
        return embed(encoder, stream, *a, **kw)

    monkeypatch.setattr(common, "embed_stream", record)
    r = jetclr.train(tiny_args("lct", "--epochs", "3"))
    assert splits == ["train_100M", "val_5M"]
    assert r["loss"] < math.log(63)  # chance level for 2 x 32 views
    assert 0.5 < r["lct_repr_auc"] <= 1 and 0.5 < r["lct_head1_auc"] <= 1
    out = capsys.readouterr().out
    assert "fitted on 64 train jets, scored on 64 val jets" in out
    config = [line for line in out.splitlines() if line.startswith("jetclr:")]
    assert len(config) == 1 and len(config[0]) < 300  # the full config goes to the log
    assert "step 6/12: loss" in out and "dt" in out and "step 12/12 (epoch 2): val loss" in out


def test_flags_one_way_each_and_validated():
    for bad in (["--split-prob", "1.5"], ["--translate-width", "-1"], ["--no-translate"],
                ["--no-smear"], ["--no-split"], ["--temperature", "0.1"], ["--scaling", "100"],
                ["--profile"], ["--nt-xent-temperature", "0"], ["--dim", "15", "--heads", "4"]):
        with pytest.raises(SystemExit):
            jetclr.get_args(bad)
    args = jetclr.get_args(["--translate-width", "0", "--smear-gev", "0", "--split-prob", "0",
                            "--no-rotate", "--nt-xent-temperature", "0.2"])
    p4, valid = fake_batch()
    views = jetclr.two_views(p4, valid, torch.Generator().manual_seed(0), args)
    trimmed = common.trim_batch(valid, p4)
    torch.testing.assert_close(views[1], torch.cat([trimmed[1]] * 2), rtol=1e-5, atol=1e-3)


def test_paper_preset_runs_20_steps(tiny_args):
    """--preset paper sets the paper's recipe; flags given still win. The run shrinks the width
    and batch (1000 wide does not fit a CPU test) but keeps the rest of the recipe."""
    args = jetclr.get_args(["--preset", "paper"])
    assert (args.dim, args.depth, args.heads, args.lr, args.batch_size, args.n_max,
            args.pooling, args.nt_xent_temperature) == (1000, 4, 4, 5e-5, 128, 50, "ptsum", 0.1)
    args = tiny_args("paper", "--preset", "paper", "--steps", "20", "--dim", "16",
                     "--batch-size", "16")
    assert (args.dim, args.batch_size, args.lr, args.n_max, args.depth) == (16, 16, 5e-5, 32, 1)
    result = jetclr.train(args)
    assert result["step"] == 20 and math.isfinite(result["loss"])
