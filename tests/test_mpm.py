"""mpm.py: masking, K-means targets, inputs, v1 (bert) and the pT order, the visible frame,
degenerate jets, determinism, DDP masks, the probe protocol, the paper presets. Training runs
stream synthetic in-memory jets (common.Jets through common.JetStream, via
train(args, data=...)), so the file runs in seconds."""
import os
import shutil
import socket

import numpy as np
import pytest
import torch

import common
import finetune
import mpm
from forked import run_forked

N_MAX = 24
TINY = ["--n-jets", "96", "--n-eval", "48", "--n-max", str(N_MAX), "--epochs", "2",
        "--batch-size", "32", "--dim", "16", "--depth", "1", "--heads", "2", "--n-registers", "1",
        "--dec-dim", "16", "--dec-depth", "1", "--dec-heads", "2", "--k", "8",
        "--kmeans-jets", "64", "--kmeans-steps", "5", "--warmup", "2",
        "--device", "cpu", "--log-every", "2"]


def fake_jets(n, n_max=N_MAX, seed=0):
    """Jets with the "full" column layout: PID one-hot, charge, IPs, pT-sorted, valid first."""
    rng = np.random.default_rng(seed)
    F = len(common.FEATURE_NAMES["full"])
    counts = rng.integers(2, n_max + 1, n)
    valid = np.arange(n_max)[None] < counts[:, None]
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, n_max, F)).astype(np.float32)
    x[..., 0] = -np.sort(-rng.normal(size=(n, n_max)), 1) + y[:, None]  # pt_log, descending
    kind = rng.integers(0, 5, (n, n_max))
    x[..., 6:11] = np.eye(5, dtype=np.float32)[kind]
    charged = (kind == 0) | (kind >= 3)
    x[..., 5] = np.where(charged, rng.choice([-1.0, 1.0], (n, n_max)), 0.0)
    x[~valid] = 0.0
    p4 = np.abs(rng.normal(size=(n, n_max, 4))).astype(np.float32)
    p4[~valid] = 0.0
    return common.Jets(x=x, p4=p4, valid=valid, y=y.astype(np.int64),
                       jet=np.zeros((n, 4), np.float32))


def data(n_train=96, n_val=48):
    return dict(train=fake_jets(n_train, seed=0), val=fake_jets(n_val, seed=1))


def batch_of(jets):
    return dict(x=torch.from_numpy(jets.x), valid=torch.from_numpy(jets.valid),
                p4=torch.from_numpy(jets.p4))


def tiny_cfg(args):  # the encoder config train() would store for TINY's sizes
    return dict(features="full", input_cols=mpm.input_cols("full", args.drop_features), dim=16,
                heads=2, depth=1, n_registers=1, n_rank=N_MAX * (args.order == "input"))


def tiny_model(seed=0, argv=()):
    args = mpm.get_args(TINY + list(argv))
    cfg = tiny_cfg(args)
    torch.manual_seed(seed)
    fit = dict(centroids=torch.randn(8, 7), mean=torch.zeros(7), std=torch.ones(7))
    return mpm.MPM(args, cfg, fit).eval(), args


def split(jets, seed=0, argv=()):
    args = mpm.get_args(TINY + list(argv))
    b, _ = mpm.masked_batch(batch_of(jets), args, torch.Generator().manual_seed(seed), mpm.CPU)
    return b


# --- masking ------------------------------------------------------------------------------------

@pytest.mark.parametrize("frac", [0.05, 0.4, 0.95])
def test_mask_never_padding_and_keeps_one_of_each(frac):
    valid = torch.from_numpy(fake_jets(300).valid)
    mask = mpm.make_mask(valid, frac, torch.Generator().manual_seed(0))
    n, n_mask = valid.sum(1), mask.sum(1)
    assert not (mask & ~valid).any()
    assert (n_mask >= 1).all() and (n - n_mask >= 1).all()
    expected = torch.minimum((frac * n.double()).floor().long().clamp(min=1), n - 1)
    assert torch.equal(n_mask, expected)
    again = mpm.make_mask(valid, frac, torch.Generator().manual_seed(0))
    other = mpm.make_mask(valid, frac, torch.Generator().manual_seed(1))
    assert torch.equal(mask, again) and not torch.equal(mask, other)


def test_masked_batch_lists_masked_and_visible_particles_in_pt_order():
    jets = fake_jets(50)
    b = batch_of(jets)
    mask = mpm.make_mask(b["valid"], 0.4, torch.Generator().manual_seed(0))
    s = split(jets, argv=["--frame", "jet"])          # draws the same mask from the same seed
    for i in range(50):
        assert torch.equal(s["x_m"][i][s["valid_m"][i]], b["x"][i][mask[i]])
        assert torch.equal(s["x"][i][s["valid"][i]], b["x"][i][b["valid"][i] & ~mask[i]])


def test_encoder_never_sees_masked_particles():
    model, args = tiny_model()
    jets = fake_jets(16)
    changed = fake_jets(16)
    mask = mpm.make_mask(torch.from_numpy(jets.valid), 0.4, torch.Generator().manual_seed(0))
    changed.x[mask.numpy()] = np.random.default_rng(5).normal(size=(int(mask.sum()), 17)) * 5
    s1, s2 = split(jets), split(changed)
    with torch.no_grad():
        out1, out2 = model.encoder(s1["x"], s1["valid"]), model.encoder(s2["x"], s2["valid"])
        assert all(torch.equal(a, c) for a, c in zip(out1, out2))
        assert torch.equal(model.predict(s1), model.predict(s2))
        assert not torch.equal(s1["x_m"], s2["x_m"]) and model(s1)[0] != model(s2)[0]


def test_null_tokens_differ_only_by_rank():
    model, _ = tiny_model()
    b1, b2 = batch_of(fake_jets(8, seed=3)), batch_of(fake_jets(8, seed=4))
    M = 5
    valid_m = torch.ones(8, M, dtype=torch.bool)
    with torch.no_grad():
        h1, _ = model.decoder_input(*model.encoder(b1["x"], b1["valid"]), valid_m)
        h2, _ = model.decoder_input(*model.encoder(b2["x"], b2["valid"]), valid_m)
    q1, q2 = h1[:, -M:], h2[:, -M:]
    assert torch.equal(q1, q2)                                     # nothing from the jet
    assert torch.equal(q1, model.null[:M].expand(8, M, -1))        # query k = learned vector k
    assert len({tuple(r.tolist()) for r in q1[0]}) == M            # and ranks differ


# --- v1 (bert) and where the pT order enters (issue 20 item 1) --------------------------------

def test_bert_encoder_sees_mask_tokens_at_the_masked_slots():
    model, _ = tiny_model(argv=["--style", "bert", "--order", "none"])
    jets = fake_jets(16)
    changed = fake_jets(16)
    s1 = split(jets, argv=["--style", "bert"])
    mask = s1["mask"]
    changed.x[mask.numpy()] = 5.0                                  # features and ID of masked
    s2 = split(changed, argv=["--style", "bert"])
    seen = []
    model.encoder.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0][:, 1:]))
    with torch.no_grad():
        p1, p2 = model.predict(s1), model.predict(s2)
    h = seen[0]                                                    # (B, N, C), registers cut
    assert torch.equal(h[mask], model.mask_token.expand(int(mask.sum()), -1))
    assert not (h[s1["valid"] & ~mask] == model.mask_token).all(-1).any()
    assert torch.equal(p1, p2) and not torch.equal(s1["x_m"], s2["x_m"])


@pytest.mark.parametrize("order", ["none", "input", "head"])
def test_the_orders_differ_in_where_the_rank_enters(order):
    """Two mask tokens of one jet are identical inputs: without order they stay identical through
    the encoder and the head; the input rank separates them in the encoder; the head rank only
    after it. Every parameter gets a gradient (DDP needs no find_unused_parameters)."""
    model, _ = tiny_model(argv=["--style", "bert", "--order", order])
    b = split(fake_jets(16), argv=["--style", "bert"])
    tokens = model.encoder(b["x"], b["valid"], b["mask"], model.mask_token)[0]
    at = lambda t, j: t.gather(1, b["mask_idx"][:, j, None, None].expand(-1, 1, t.shape[-1]))
    pred = model.predict(b)
    two = b["valid_m"][:, 1]                                       # jets with >= 2 masked
    same_tokens = torch.allclose(at(tokens, 0)[two], at(tokens, 1)[two], atol=1e-6)
    same_pred = torch.allclose(pred[two, 0], pred[two, 1], atol=1e-6)
    assert (same_tokens, same_pred) == {"none": (True, True), "input": (False, False),
                                        "head": (True, False)}[order]
    assert (model.encoder.rank is not None) == (order == "input")  # finetune.py keeps it
    enc = mpm.build_encoder(tiny_cfg(mpm.get_args(TINY + ["--style", "bert", "--order", order])))
    enc.load_state_dict(model.encoder.state_dict())                # strict: the rank travels
    model.train()
    model(b)[0].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_mae_uses_every_parameter_and_refuses_other_orders():
    model, _ = tiny_model()
    model.train()
    model(split(fake_jets(16)))[0].backward()
    assert all(p.grad is not None for p in model.parameters())
    assert not hasattr(model, "mask_token")
    with pytest.raises(SystemExit):
        mpm.get_args(["--order", "input"])                         # mae ranks at its decoder


# --- the visible particles' frame (issue 20 item 5) --------------------------------------------

def physical_jets(n, seed=0):
    """fake_jets with four-vectors around an axis and their features in the jet's own frame,
    as the data layer makes them (common.refeature from the summed four-vector)."""
    jets = fake_jets(n, seed=seed)
    rng = np.random.default_rng(seed)
    pt = np.exp(rng.normal(size=jets.valid.shape)) * 10
    eta = 0.7 + 0.2 * rng.normal(size=pt.shape)
    phi = 3.0 + 0.2 * rng.normal(size=pt.shape)                   # wraps at pi
    p4 = np.stack([pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta), pt * np.cosh(eta)], -1)
    jets.p4 = np.where(jets.valid[..., None], p4, 0.0).astype(np.float32)
    return jet_frame(jets)


def jet_frame(jets):
    p4, valid = torch.from_numpy(jets.p4), torch.from_numpy(jets.valid)
    axis = common.axis_of(p4.double().sum(1)).float()
    jets.x = common.refeature(torch.from_numpy(jets.x), p4, valid, axis).numpy()
    return jets


@pytest.mark.parametrize("style", ["mae", "bert"])
def test_visible_frame_hides_the_masked_particles_from_the_visible_features(style):
    jets = physical_jets(32)
    mask = mpm.make_mask(torch.from_numpy(jets.valid), 0.4, torch.Generator().manual_seed(0))
    changed = physical_jets(32)
    changed.p4[mask.numpy()] = 3 * changed.p4[mask.numpy()][:, [1, 0, 2, 3]]  # moved, harder
    changed = jet_frame(changed)                                   # the data layer's jet axis
    model, _ = tiny_model(argv=["--style", style])
    for frame, equal in (("visible", True), ("jet", False)):
        argv = ["--style", style, "--frame", frame]
        s1, s2 = split(jets, argv=argv), split(changed, argv=argv)
        assert torch.equal(s1["x"], s2["x"]) == equal, frame
        assert not torch.equal(s1["x_m"], s2["x_m"])               # the targets did change
        with torch.no_grad():
            assert torch.equal(model.predict(s1), model.predict(s2)) == equal, frame
    # the targets' angles are measured from the visible axis: they change with the frame
    assert not torch.equal(s1["x_m"], split(jets, argv=["--style", style])["x_m"])


# --- degenerate settings (issue 22 item 4) -------------------------------------------------------

def test_too_short_jets_are_refused_at_start_or_dropped_and_counted(capsys):
    with pytest.raises(SystemExit):
        mpm.get_args(["--n-max", "1"])
    assert "--n-max 1: MPM hides at least one particle" in capsys.readouterr().err
    with pytest.raises(SystemExit):                                # issue 19 item 4
        mpm.get_args(["--data", "toptagging", "--features", "full"])
    assert mpm.get_args(["--data", "toptagging"]).features == "kin"
    jets = fake_jets(20)
    jets.valid[:3, 1:] = False                                     # three one-particle jets
    args = mpm.get_args(TINY)
    b, n_short = mpm.masked_batch(batch_of(jets), args, torch.Generator().manual_seed(0), mpm.CPU)
    assert n_short == 3 and len(b["valid_m"]) == 17 and b["valid_m"].any(1).all()
    assert (b["valid"].sum(1) >= 1).all()


# --- inputs (issue 12 item 14) ------------------------------------------------------------------

def test_default_inputs_drop_the_relative_logs_that_leak_the_jet_energy():
    args = mpm.get_args([])
    assert args.drop_features == "logptrel,logerel"
    names = [common.FEATURE_NAMES["full"][c] for c in mpm.input_cols("full", args.drop_features)]
    assert "logptrel" not in names and "logerel" not in names and "pt_log" in names
    assert len(mpm.input_cols("full", "")) == len(names) + 2       # '' gives the old inputs
    model, _ = tiny_model()                                        # built with the default
    b = batch_of(fake_jets(8))
    other = {k: v.clone() for k, v in b.items()}
    other["x"][..., 2:4] += 3.0                                    # logptrel, logerel
    jet = lambda b: model.encoder(b["x"], b["valid"])[2]          # noqa: E731
    with torch.no_grad():
        assert torch.equal(jet(b), jet(other))
        other["x"][..., 0] += 3.0                                  # pt_log is still an input
        assert not torch.equal(jet(b), jet(other))
    with pytest.raises(SystemExit):                                # an ID flag is not an input
        mpm.get_args(["--drop-features", "isPhoton"])


# --- targets ------------------------------------------------------------------------------------

def test_kmeans_assign_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    points, centroids = torch.randn(700, 7, generator=g), torch.randn(33, 7, generator=g)
    brute = ((points[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(mpm.kmeans_assign(points, centroids), brute)


def test_kmeans_labels_exact_where_fp32_and_tf32_math_would_differ():
    """Issue 12 item 17. Far from the origin, |c|^2 - 2 p.c cancels: in fp32 (and worse in TF32,
    10-bit mantissa, which common.setup enables on the GPU) close centroids swap. The labels
    must equal a float64 reference; on a GPU this runs with TF32 switched on."""
    g = torch.Generator().manual_seed(0)
    centroids = 300 + torch.randn(512, 7, generator=g)
    noise = torch.randn(4000, 7, generator=g)
    points = centroids[torch.randint(512, (4000,), generator=g)] + noise
    ref = ((points.double()[:, None] - centroids.double()[None]) ** 2).sum(-1).argmin(1)
    fp32 = ((centroids * centroids).sum(1) - 2 * points @ centroids.T).argmin(1)
    assert (fp32 != ref).float().mean() > 0.01                     # the data exposes it
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            got = mpm.kmeans_assign(points.to(device), centroids.to(device)).cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert torch.equal(got, ref)


def test_kmeans_fit_finds_blobs():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = centres.repeat(300, 1) + 0.1 * torch.randn(900, 2, generator=g)
    fitted = mpm.fit_kmeans(points, 3, 20, torch.Generator().manual_seed(1), batch_size=128)
    assert torch.allclose(fitted[mpm.kmeans_assign(centres, fitted)], centres, atol=0.05)


def test_targets_fitted_on_a_bounded_random_sample_of_real_particles(capsys):
    """Issue 11 item 5: the first --kmeans-jets jets of a shuffled epoch, never the first jets of
    the split (files hold one class each), never padding."""
    jets = fake_jets(400)
    order = np.argsort(jets.y, kind="stable")                      # class 0 first, like files
    jets = jets[order]
    jets.x[..., 0] = np.where(jets.y[:, None] == 0, -5.0, 5.0)     # pt_log tells the class
    dirty = jets[np.arange(400)]
    dirty.x[~dirty.valid] = 1e6                                    # garbage in padding
    args = mpm.get_args(TINY + ["--kmeans-jets", "40"])
    fits = [mpm.fit_targets(common.JetStream(j, batch_size=32, seed=7, drop_last=False), args,
                            mpm.CPU) for j in (jets, dirty)]
    assert "of 40 jets" in capsys.readouterr().out                 # bounded
    assert abs(float(fits[0]["mean"][0])) < 3                      # both classes drawn
    assert all(torch.equal(fits[0][k], fits[1][k]) for k in fits[0])


def test_neutral_impact_parameters_are_not_targets():
    x = torch.zeros(2, 17)
    x[:, 11:15] = 0.7                                   # an IP value on both
    x[0, 5], x[0, 6] = 1.0, 1.0                         # charged hadron
    x[1, 8] = 1.0                                       # photon
    t = mpm.raw_targets(x, "full")
    assert torch.equal(t[0, 1:5], torch.full((4,), 0.7)) and torch.equal(t[1, 1:5], torch.zeros(4))
    assert mpm.pid_class(x).tolist() == [2, 0]


# --- training -----------------------------------------------------------------------------------

def test_tiny_model_overfits_one_batch():
    model, _ = tiny_model()
    model.train()
    s = split(fake_jets(16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(100):
        loss, stats = model(s)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(stats["token_loss"]))
    assert np.isfinite(losses).all() and losses[-1] < 0.4 * losses[0]
    assert float(stats["token_acc"]) == 1.0  # label smoothing keeps the loss above 0


def test_same_seed_runs_are_bitwise_equal_and_resume_continues_exactly(tmp_path, monkeypatch):
    real_save = common.save_checkpoint

    def save_and_keep_step3(path, **kw):  # keep the mid-run checkpoint (after epoch 1 of 2)
        real_save(path, **kw)
        if kw["step"] == 3 and not (tmp_path / "step3.pt").exists():
            shutil.copy(path, tmp_path / "step3.pt")

    monkeypatch.setattr(common, "save_checkpoint", save_and_keep_step3)
    out = []
    resume = ["--resume", str(tmp_path / "step3.pt")]
    for run, extra in (("a", []), ("b", []), ("resumed", resume)):
        result = mpm.train(mpm.get_args(TINY + ["--out", str(tmp_path / run)] + extra), data())
        out.append((result, torch.load(tmp_path / run / "mpm.pt", weights_only=True)))
    (r1, c1), (r2, c2), (r3, c3) = out
    assert c1["step"] == 6 and c3["step"] == 6 and np.isfinite(r1["loss"])
    for r, c in ((r2, c2), (r3, c3)):
        assert r1["loss"] == r["loss"] and r1["val"] == r["val"] and r1["probe"] == r["probe"]
        assert all(torch.equal(c1["model"][k], c["model"][k]) for k in c1["model"])
    # checkpoint round trip: finetune.py's path rebuilds the encoder from the checkpoint alone
    enc = mpm.build_encoder(c1["encoder_config"])
    enc.load_state_dict(c1["encoder"])
    assert all(torch.equal(v, c1["model"][f"encoder.{k}"]) for k, v in enc.state_dict().items())
    assert mpm.batch_transform(c1["encoder_config"]) is None
    tokens, valid, jet = enc(**mpm.encoder_inputs(batch_of(fake_jets(4)), c1["encoder_config"]))
    assert tokens.shape[:2] == valid.shape and jet.shape == (4, 16) and torch.isfinite(jet).all()
    assert c1["model"]["centroids"].shape == (8, 7)                # the targets travel with it


def test_probe_fits_on_train_and_scores_on_val(tmp_path, monkeypatch, capsys):
    """Issue 12 item 18: one protocol, common.linear_probe fitted on a bounded sample of the
    train split and scored on the val split (bounded by --n-eval), and the line says so."""
    calls, real_probe = [], common.linear_probe
    monkeypatch.setattr(common, "linear_probe",
                        lambda zf, yf, zs, ys: calls.append((yf, ys))
                        or real_probe(zf, yf, zs, ys))
    jets = data(96, 60)
    mpm.train(mpm.get_args(TINY + ["--steps", "2", "--n-eval", "40", "--out", str(tmp_path)]),
              jets)
    (y_fit, y_score), = calls
    assert np.array_equal(np.asarray(y_fit), jets["train"].y[:40])
    assert np.array_equal(np.asarray(y_score), jets["val"].y[:40])
    assert "fitted on 40 train jets, scored on 40 val jets" in capsys.readouterr().out


def _ddp_run(rank, port, argv, jets, out):
    """One torchrun-like rank (forked): records every training mask and its generator state."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    seen, make_mask, real_save = [], mpm.make_mask, common.save_checkpoint

    def record(valid, frac, generator):
        if torch.is_grad_enabled():                                # training, not evaluation
            seen.append((generator.get_state(), make_mask(valid, frac, generator)))
        return make_mask(valid, frac, generator)

    def save(path, **kw):
        real_save(path, **kw)
        if kw["step"] == 3:
            shutil.copy(path, out / "step3.pt")
    def leave(s):  # the rank's results, then out at once: see tests/forked.py
        torch.save(seen, out / f"masks{rank}.pt")
        torch.distributed.barrier()
        os._exit(0)
    mpm.make_mask, common.save_checkpoint, common.cleanup = record, save, leave
    mpm.train(mpm.get_args(argv), jets)


def test_ddp_ranks_draw_their_own_masks_after_resume(tmp_path):
    """Issue 12 item 15: on resume, every rank must not continue rank 0's mask stream; each rank
    draws what its uninterrupted run drew."""
    jets = data(192, 32)
    masks = {}
    for run in ("straight", "resumed"):
        (tmp_path / run).mkdir()
        argv = TINY + ["--n-jets", "192", "--eval-every", "3", "--out", str(tmp_path / run)]
        argv += ["--resume", str(tmp_path / "straight" / "step3.pt")] if run == "resumed" else []
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        codes = run_forked(_ddp_run, [(r, port, argv, jets, tmp_path / run) for r in (0, 1)])
        assert codes == [0, 0], "a rank failed or hung (its traceback is above)"
        masks[run] = [torch.load(tmp_path / run / f"masks{r}.pt") for r in (0, 1)]
    for r in (0, 1):
        straight, resumed = masks["straight"][r], masks["resumed"][r]
        assert len(straight) == 6 and len(resumed) == 3
        for (g1, m1), (g2, m2) in zip(straight[3:], resumed):
            assert torch.equal(g1, g2) and torch.equal(m1, m2)
    for (g0, _), (g1, _) in zip(*masks["resumed"]):
        assert not torch.equal(g0, g1)                             # ranks differ after resume


def test_paper_preset_runs_20_steps(tmp_path):
    """The mpm-v2 recipe with only steps, jets and the K-means step count shrunk, plus, for a CPU
    test, the encoder/decoder width and depth (512 x 8 would take minutes) and the batch size."""
    args = mpm.get_args(["--preset", "mpm-v2"])
    assert (args.dim, args.depth, args.heads, args.n_registers) == (512, 8, 8, 8)
    assert (args.dec_dim, args.dec_depth, args.k, args.mask_frac) == (128, 4, 16384, 0.4)
    assert (args.lr, args.weight_decay, args.warmup, args.batch_size) == (1e-3, 1e-5, 50_000, 1000)
    assert (args.label_smoothing, args.id_weight, args.steps) == (0.1, 0.3, 1_000_000)
    names = [common.FEATURE_NAMES["full"][c] for c in mpm.input_cols("full", args.drop_features)]
    assert names == ["pt_log", "tanh_d0val", "d0err", "tanh_dzval", "dzerr", "deta", "dphi"]
    assert mpm.get_args(["--preset", "mpm-v2", "--lr", "5e-4"]).lr == 5e-4   # a flag still wins
    small = ["--dim", "32", "--depth", "1", "--heads", "2", "--dec-dim", "32", "--dec-depth", "1",
             "--dec-heads", "2", "--batch-size", "16"]
    argv = ["--preset", "mpm-v2", "--steps", "20", "--n-jets", "1500", "--n-eval", "32",
            "--n-max", str(N_MAX), "--kmeans-steps", "1", "--device", "cpu",
            "--out", str(tmp_path)]
    with pytest.warns(UserWarning, match="warmup 50000 exceeds"):  # the recipe's warm-up is kept
        result = mpm.train(mpm.get_args(argv + small), data(1500, 32))
    assert result["steps"] == 20 and np.isfinite(result["loss"])
    ckpt = torch.load(tmp_path / "mpm.pt", weights_only=True)
    assert ckpt["model"]["centroids"].shape == (16384, 7)


def test_v1_preset_runs_20_steps_and_finetune_loads_it(tmp_path):
    """The mpm-v1 recipe (K-means row) with steps, jets and sizes shrunk for a CPU test; the
    checkpoint goes through finetune.py's loader (bert style: the mask token stays behind)."""
    args = mpm.get_args(["--preset", "mpm-v1"])
    assert (args.style, args.order, args.mask_frac, args.k) == ("bert", "head", 0.3, 512)
    assert (args.label_smoothing, args.id_weight) == (0.0, 0.0)
    assert mpm.get_args(["--preset", "mpm-v1", "--order", "none"]).order == "none"
    small = ["--dim", "16", "--depth", "1", "--heads", "2", "--batch-size", "16", "--steps", "20",
             "--n-jets", "320", "--n-eval", "32", "--n-max", str(N_MAX), "--kmeans-steps", "1",
             "--device", "cpu", "--out", str(tmp_path)]
    result = mpm.train(mpm.get_args(["--preset", "mpm-v1"] + small), data(320, 32))
    assert result["steps"] == 20 and np.isfinite(result["loss"])
    ckpt = torch.load(tmp_path / "mpm.pt", weights_only=True)
    assert ckpt["model"]["centroids"].shape == (512, 7) and "mask_token" in ckpt["model"]
    spec = finetune.load_spec(finetune.get_args(["--ckpt", str(tmp_path / "mpm.pt")]))
    enc = spec["module"].build_encoder(spec["cfg"])
    enc.load_state_dict(spec["state"])                             # strict: nothing missing
    jet = enc(**mpm.encoder_inputs(batch_of(fake_jets(4)), spec["cfg"]))[2]
    assert torch.isfinite(jet).all() and spec["features"] == "full"


def test_forward_compiles_without_graph_breaks():
    model, _ = tiny_model()
    explained = torch._dynamo.explain(model)(split(fake_jets(8)))
    assert explained.graph_break_count == 0, explained.break_reasons
