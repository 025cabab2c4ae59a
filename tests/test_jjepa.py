"""jjepa.py: masking, leakage (both context frames), positions, loss, presets, jet selection,
refused settings, seeding, collapse measures, EMA, padding, determinism, resume, overfitting,
graph breaks, the probe and finetune.py's subjet settings. Synthetic jets (1-prong vs 3-prong)
stand in for the data, given to train(args, data=DATA) and streamed from memory through
common.JetStream exactly as train() streams files: fast, and trivially separable."""
import json
import math
import pickle
import re

import numpy as np
import pytest
import torch

import common
import helpers
import jjepa

TINY = ["--n-jets", "128", "--n-eval", "64", "--epochs", "2", "--batch-size", "32",
        "--dim", "32", "--depth", "2", "--heads", "4", "--pred-dim", "16", "--pred-depth", "1",
        "--warmup", "2", "--eval-every", "3", "--log-every", "2", "--device", "cpu",
        "--no-compile"]


def from_p4(p4, valid, y):
    """Jets with the data layer's own feature recipe, the jet being the sum of its particles."""
    p4 = (p4 * valid[..., None]).astype(np.float32)
    s = p4.sum(1).astype(np.float64)
    jpt = np.hypot(s[:, 0], s[:, 1])
    jet = np.stack([jpt, np.arcsinh(s[:, 2] / jpt), np.arctan2(s[:, 1], s[:, 0]), s[:, 3]], -1)
    pt = np.maximum(np.hypot(p4[..., 0], p4[..., 1]), 1e-8)
    deta = common.signed_deta(np.arcsinh(p4[..., 2] / pt), jet[:, 1:2])
    dphi = common.wrap_phi(np.arctan2(p4[..., 1], p4[..., 0]) - jet[:, 2:3])
    x = helpers.particle_features(p4, valid, jet.astype(np.float32), deta, dphi)
    return common.Jets(x=x, p4=p4, valid=valid, y=y.astype(np.int64), jet=jet.astype(np.float32))


def make_jets(n, seed, n_max=32):
    """Half 1-prong (y=0), half 3-prong (y=1) jets; prongs 0.4 apart in (eta, phi), so C/A
    R=0.2 finds them as separate subjets."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    n_prongs = np.where(y == 1, 3, 1)
    eta0, phi0 = rng.uniform(-1.5, 1.5, n), rng.uniform(-np.pi, np.pi, n)
    prong = rng.integers(0, 3, (n, n_max)) % n_prongs[:, None]  # prong of each particle
    angle = 2 * np.pi * prong / 3 + rng.uniform(0, 2 * np.pi, (n, 1))
    spread = 0.4 * (n_prongs[:, None] > 1)
    eta = eta0[:, None] + spread * np.cos(angle) + rng.normal(0, 0.03, (n, n_max))
    phi = phi0[:, None] + spread * np.sin(angle) + rng.normal(0, 0.03, (n, n_max))
    pt = np.sort(rng.exponential(20.0, (n, n_max)) + 1.0, axis=1)[:, ::-1]
    valid = np.arange(n_max) < rng.integers(n_max // 2, n_max + 1, n)[:, None]
    p4 = np.stack([pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta), pt * np.cosh(eta)], -1)
    return from_p4(p4, valid, y)


DATA = {"train": make_jets(256, 0), "val": make_jets(128, 1)}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """The folder of the module's runs (their data: train(args, data=DATA))."""
    return tmp_path_factory.mktemp("jjepa")


def run(*argv):
    return jjepa.train(jjepa.get_args(TINY + list(argv)), data=DATA)


@pytest.fixture(scope="module")
def tiny_run(synthetic):
    """One tiny run (2 epochs x 4 steps, checkpoints at steps 3, 6 and 8), shared by tests."""
    return run("--out", str(synthetic / "tiny"))


def tiny(*extra):
    args = jjepa.get_args(TINY + list(extra))
    return args, jjepa.encoder_config(args)


def batch_of(jets, cfg):
    """A padded batch as the stream's worker makes it (batch_transform adds idx and pos)."""
    b = dict(x=jets.x, p4=jets.p4, valid=jets.valid, y=jets.y, jet=jets.jet)
    return {k: torch.from_numpy(np.ascontiguousarray(v))
            for k, v in pickle.loads(pickle.dumps(jjepa.batch_transform(cfg)))(b).items()}


def model_and_batch(*extra, n=32, seed=5):
    args, cfg = tiny(*extra)
    torch.manual_seed(0)
    b = batch_of(make_jets(n, seed), cfg)
    masks = jjepa.sample_targets(b["idx"], args, torch.Generator().manual_seed(1))
    return jjepa.JJEPA(cfg, args), b, masks


def loss_of(model, b, masks, **change):
    inputs = dict(jjepa.encoder_inputs(b, None), p4=b["p4"], valid=b["valid"], **masks)
    with torch.no_grad():
        return model(**dict(inputs, **change))


def test_targets_are_nonempty_with_right_count():
    gen = torch.Generator().manual_seed(0)
    n = torch.arange(21).repeat(10)  # every count of non-empty subjets, 0..20
    nonempty = torch.arange(20) < n[:, None]
    nonempty = nonempty[:, torch.randperm(20, generator=gen)]  # empties anywhere, not only last
    idx = torch.where(nonempty[..., None], 0, -1).expand(-1, -1, 3)  # (B, S, P)
    m = jjepa.sample_targets(idx, tiny()[0], gen)
    tgt_idx, tgt_valid, context = m["tgt_idx"], m["tgt_valid"], m["context"]
    assert tgt_idx.shape == (len(n), 6)
    expected = torch.clamp(torch.minimum(torch.floor(0.3 * n + 0.5).clamp(min=1), n - 1), min=0)
    assert torch.equal(tgt_valid.sum(1), expected)
    assert torch.gather(nonempty, 1, tgt_idx)[tgt_valid].all(), "a target at an empty subjet"
    assert (context.sum(1) == n - expected).all()
    assert (context.sum(1)[n > 0] >= 1).all(), "a jet lost its whole context"
    target = torch.zeros_like(nonempty).scatter_(1, tgt_idx, tgt_valid)
    assert not (target & context).any()
    assert len({tuple(r.tolist()) for r in tgt_idx[n == 20]}) > 1  # not one fixed pattern


def test_context_never_sees_target_tokens():
    """Scrambling target subjets' particles and positions leaves every context token unchanged."""
    model, b, m = model_and_batch()
    enc = model.encoder.eval()
    target = torch.zeros_like(m["context"]).scatter_(1, m["tgt_idx"], m["tgt_valid"])
    assert target.any()
    x2, pos2 = b["x"].clone(), b["pos"].clone()
    for j, s in target.nonzero().tolist():
        p = b["idx"][j, s].long()
        x2[j, p[p >= 0]] += 5 * torch.randn(int((p >= 0).sum()), x2.shape[-1])
    pos2[target] += 3.0
    with torch.no_grad():
        a, va, _ = enc(b["x"], b["idx"], b["pos"], keep=m["context"])
        c, vc, _ = enc(x2, b["idx"], pos2, keep=m["context"])
        full_a, full_c = enc(b["x"], b["idx"], b["pos"])[0], enc(x2, b["idx"], pos2)[0]
    assert torch.equal(va, m["context"]) and torch.equal(vc, m["context"])
    assert torch.equal(a[m["context"]], c[m["context"]])
    assert not torch.allclose(full_a[m["context"]], full_c[m["context"]]), "no effect at all"


def prediction(model, b, m, pos):
    tokens, ctx_valid, _ = model.encoder(b["x"], b["idx"], pos, keep=m["context"])
    return model.predictor(tokens, ctx_valid, pos, m["tgt_idx"], m["tgt_valid"])


@pytest.mark.parametrize("pos_pt", ["log", "fraction", "none"])
def test_encoders_read_the_subjet_pt_the_predictor_never_the_targets(pos_pt):
    """Issue 20 item 6: a subjet's pT is in the encoders' positions (unless --pos-pt none); the
    predictor's output does not change when the targets' pT changes, but does when the
    context's does; the target encoder sees the targets' pT, so the loss moves."""
    model, b, m = model_and_batch("--pos-pt", pos_pt)
    target = torch.zeros_like(m["context"]).scatter_(1, m["tgt_idx"], m["tgt_valid"])
    tgt_pos, ctx_pos = b["pos"].clone(), b["pos"].clone()
    tgt_pos[..., 2] -= 1.0 * target  # the targets a factor e softer
    ctx_pos[..., 2] -= 1.0 * m["context"]
    with torch.no_grad():
        pred = prediction(model.eval(), b, m, b["pos"])
        assert torch.equal(pred, prediction(model, b, m, tgt_pos))
        moved = (pred - prediction(model, b, m, ctx_pos)).abs().max()
    assert (moved > 1e-4) == (pos_pt != "none")
    assert (loss_of(model, b, m) != loss_of(model, b, m, pos=tgt_pos)) == (pos_pt != "none")
    enc = jjepa.build_encoder(tiny("--pos-pt", pos_pt)[1])
    assert enc.pos_embed.fc1.in_features == (2 if pos_pt == "none" else 3)
    assert model.predictor.pos_embed.fc1.in_features == 2
    # checkpoints written before --pos-pt took a value stored a bool, or nothing (pT was in)
    assert [jjepa.pos_pt_of(c) for c in ({"pos_pt": True}, {"pos_pt": False}, {})] == \
        ["log", "none", "log"]


def with_target_particles_scaled(b, m, cfg, factor):
    """The same jets (same subjets) but the particles of the target subjets `factor` x harder;
    x, jet and pos remade from p4 as the data layer makes them."""
    B, S, P = b["idx"].shape
    target = torch.zeros_like(m["context"]).scatter_(1, m["tgt_idx"], m["tgt_valid"])
    hit = torch.zeros(B, b["x"].shape[1] + 1, dtype=torch.bool)
    hit.scatter_(1, torch.where(b["idx"] >= 0, b["idx"].long(), hit.shape[1] - 1).view(B, -1),
                 target[..., None].expand(B, S, P).reshape(B, -1))
    p4 = b["p4"] * torch.where(hit[:, :-1, None], factor, 1.0)
    jets = from_p4(p4.numpy(), b["valid"].numpy(), b["y"].numpy())
    parts = torch.gather(p4, 1, b["idx"].long().clamp(min=0).view(B, -1, 1).expand(-1, -1, 4))
    sub_p4 = (parts.view(B, S, P, 4) * (b["idx"] >= 0)[..., None]).sum(2)
    pos = common.in_frame(sub_p4, torch.from_numpy(jets.jet))
    return dict(b, x=torch.from_numpy(jets.x), p4=p4, jet=torch.from_numpy(jets.jet), pos=pos)


def test_context_frame_context_hides_the_targets():
    """Item 2: with --context-frame context, the context tokens' inputs (and so the tokens) do
    not change when the target particles change; with the jet frame they do (the leak)."""
    seen = {}
    for frame in ("jet", "context"):
        model, b, m = model_and_batch("--context-frame", frame, "--n-per-subjet", "32")
        args, cfg = tiny("--n-per-subjet", "32")
        b2 = with_target_particles_scaled(b, m, cfg, 3.0)
        enc, ctx = model.encoder.eval(), m["context"]
        out = []
        for batch in (b, b2):
            x, pos = batch["x"], batch["pos"]  # what forward() gives the context encoder
            if frame == "context":
                x, pos = jjepa.context_frame(x, batch["p4"], batch["valid"], batch["idx"], ctx)
            with torch.no_grad():
                out.append((x, pos, enc(x, batch["idx"], pos, keep=ctx)[0]))
        member = torch.zeros_like(b["valid"])  # particles of context subjets
        for j, s in ctx.nonzero().tolist():
            p = b["idx"][j, s].long()
            member[j, p[p >= 0]] = True
        seen[frame] = (torch.equal(out[0][0][member], out[1][0][member])
                       and torch.equal(out[0][1][ctx], out[1][1][ctx])
                       and torch.equal(out[0][2][ctx], out[1][2][ctx]))
    assert seen == {"jet": False, "context": True}


def test_context_frame_of_the_whole_jet_is_the_jet_frame():
    """With every subjet (and particle) in the context, the recomputed features are the data
    layer's: the torch formulas match common.features_flat."""
    args, cfg = tiny("--n-per-subjet", "32")
    b = batch_of(make_jets(16, 7), cfg)
    x, pos = jjepa.context_frame(b["x"], b["p4"], b["valid"], b["idx"], (b["idx"] >= 0).any(-1))
    torch.testing.assert_close(x, b["x"], atol=2e-4, rtol=0)
    torch.testing.assert_close(pos, b["pos"], atol=2e-4, rtol=0)


def test_paper_presets_carry_the_paper_optimisation():
    """Item 3: lr 1e-4, EMA from 0.99, no warm-up (official code); flags win over a preset,
    wherever they stand on the command line."""
    for preset in ("SjT-T", "AE-SjT-T"):
        args = jjepa.get_args(["--preset", preset])
        assert (args.lr, args.ema_start, args.warmup) == (1e-4, 0.99, 0)
        assert (args.dim, args.depth, args.heads, args.pred_dim, args.pred_depth) == \
            (96, 24, 16, 64, 12)
        args = jjepa.get_args(["--lr", "3e-4", "--preset", preset, "--warmup", "5"])
        assert (args.lr, args.warmup) == (3e-4, 5)
        assert (args.var_weight, args.cov_weight) == (0.0, 0.0)  # the paper's loss
    small = jjepa.get_args([])
    assert (small.preset, small.lr, small.ema_start, small.warmup) == (None, 1e-3, 0.99, None)
    assert (small.dim, small.sel, small.sel_dim, small.pred_dim) == (64, "attn", 32, 32)


def test_min_subjets_weights_jets_out_of_the_loss():
    """Item 4: jets below --min-subjets stay in the batch (fixed shapes, equal DDP steps) but the
    loss, VICReg terms included, equals the loss of the passing jets alone; n_subjets gives
    finetune.py the same selection from a batch or its idx, numpy or torch."""
    model, b, _ = model_and_batch("--min-subjets", "3", "--var-weight", "1", "--cov-weight", "1")
    b["idx"][1:9:2, 2] = -1  # four 3-prong jets lose a subjet: 2 left, so they have a target
    gen = torch.Generator().manual_seed(1)
    m = jjepa.sample_targets(b["idx"], tiny("--min-subjets", "3")[0], gen)
    n = jjepa.n_subjets(b)
    assert torch.equal(n, jjepa.n_subjets(b["idx"]))
    assert np.array_equal(jjepa.n_subjets(b["idx"].numpy()), n.numpy())
    assert torch.equal(n, (b["idx"] >= 0).any(-1).sum(-1))
    use = n >= 3
    assert 0 < use.sum() < len(use)
    assert torch.equal(m["tgt_valid"].any(1), use)
    sub = {k: v[use] for k, v in b.items()}
    full, alone = loss_of(model, b, m), loss_of(model, sub, {k: v[use] for k, v in m.items()})
    torch.testing.assert_close(full, alone, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(full, loss_of(model, b, jjepa.sample_targets(
        b["idx"], tiny()[0], torch.Generator().manual_seed(1))))


def test_ema_update_exact():
    """Momentum cosine from --ema-start to 1 at the last step; one exact lerp per call."""
    torch.manual_seed(0)
    online, target = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    for step, m in ((3, 1 - 0.004 * (math.cos(math.pi * 0.3) + 1) / 2), (0, 0.996), (10, 1.0)):
        before = [p.detach().clone() for p in target.parameters()]
        jjepa.ema_update(target, online, step, 10, 0.996)
        for t, b, o in zip(target.parameters(), before, online.parameters()):
            torch.testing.assert_close(t, m * b + (1 - m) * o, rtol=0, atol=1e-7)


@pytest.mark.parametrize("sel", ["mlp", "attn"])
def test_all_padded_subjets_finite(sel):
    args, cfg = tiny("--sel", sel)
    torch.manual_seed(0)
    enc = jjepa.build_encoder(cfg)
    inp = jjepa.encoder_inputs(batch_of(make_jets(4, 4), cfg), cfg)
    inp["idx"][0] = -1  # a jet with no particle at all
    assert (inp["idx"][1:] == -1).all(-1).any(), "fixture should also have empty subjets"
    tokens, valid, jet = enc(**inp)
    assert torch.isfinite(tokens).all() and torch.isfinite(jet).all()
    assert not valid[0].any() and (tokens[~valid] == 0).all()
    jet.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)


@pytest.mark.parametrize("sel,frame", [("attn", "context"), ("mlp", "jet")])
def test_forward_compiles_without_graph_breaks(sel, frame):
    model, b, m = model_and_batch("--sel", sel, "--context-frame", frame, n=8)
    inputs = dict(jjepa.encoder_inputs(b, None), p4=b["p4"], valid=b["valid"], **m)
    explained = torch._dynamo.explain(model)(**inputs)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_bitwise_determinism_and_one_seeding_rule(synthetic, tiny_run, monkeypatch):
    """Same seed, same run bit for bit. Item 6: every mask generator is common.generator(seed,
    "masks", rank, step) (validation: (seed, "val-masks")), so no two streams can collide."""
    keys, real = [], common.generator
    monkeypatch.setattr(common, "generator", lambda *k: keys.append(k) or real(*k))
    again = run("--out", str(synthetic / "again"))
    assert again == tiny_run  # losses, diagnostics, probe
    wa = torch.load(synthetic / "tiny" / "jjepa.pt", weights_only=True)["model"]
    wb = torch.load(synthetic / "again" / "jjepa.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [k for k in keys if k[1] == "masks"] == [(0, "masks", 0, s) for s in range(8)]
    assert keys.count((0, "val-masks")) == 3  # one per evaluation (steps 3, 6, 8)
    idx = torch.zeros(64, 20, 1, dtype=torch.int16)  # 20 non-empty subjets per jet
    draw = lambda *k: jjepa.sample_targets(idx, tiny()[0], real(*k))["tgt_idx"]  # noqa: E731
    assert not torch.equal(draw(0, "masks", 0, 0), draw(0, "masks", 1, 0))  # ranks differ


def test_resume_mid_epoch_matches_uninterrupted(synthetic, tiny_run, monkeypatch):
    save = common.save_checkpoint

    def save_then_crash(*a, **kw):  # the run dies right after its first checkpoint (step 3 of 4)
        save(*a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "save_checkpoint", save_then_crash)
    cut = TINY + ["--out", str(synthetic / "cut")]
    with pytest.raises(KeyboardInterrupt):
        jjepa.train(jjepa.get_args(cut), data=DATA)
    monkeypatch.setattr(common, "save_checkpoint", save)
    ckpt = str(synthetic / "cut" / "jjepa.pt")
    assert torch.load(ckpt, weights_only=True)["step"] == 3
    assert jjepa.train(jjepa.get_args(cut + ["--resume", ckpt]), data=DATA) == tiny_run
    wa = torch.load(synthetic / "tiny" / "jjepa.pt", weights_only=True)["model"]
    wb = torch.load(ckpt, weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoint_round_trip_gives_the_collapse_measures(synthetic, tiny_run):
    """Item 5 and the checkpoint: the rebuilt EMA encoder reproduces the run's last evaluation:
    the paper's cosine (flattened subjet tokens of 128 jets; here all 64 val jets) and the
    pooled-vector stats beside it."""
    ckpt = torch.load(synthetic / "tiny" / "jjepa.pt", weights_only=True)
    cfg = ckpt["encoder_config"]
    enc = jjepa.build_encoder(cfg)
    enc.load_state_dict(ckpt["encoder"])
    val = common.JetStream(DATA["val"], n_jets=64, batch_size=32, shuffle=False, drop_last=False,
                           transform=jjepa.batch_transform(cfg))
    tokens, z = [], []
    with torch.no_grad():
        for batch in common.loader(val, torch.device("cpu")):
            t, _, j = enc.eval()(**jjepa.encoder_inputs(batch, cfg))
            tokens.append(t.flatten(1))
            z.append(j)
    tokens, z = torch.cat(tokens), torch.cat(z)
    zn = torch.nn.functional.normalize(tokens, dim=1)
    cos = (zn @ zn.T)[~torch.eye(len(zn), dtype=torch.bool)].mean()
    assert tiny_run["paper_cos"] == pytest.approx(float(cos), abs=1e-5)
    stats = common.collapse_stats(z)
    assert all(tiny_run[k] == pytest.approx(stats[k], rel=1e-4) for k in ("cos", "std", "erank"))
    assert abs(tiny_run["paper_cos"] - tiny_run["cos"]) > 1e-3  # two different measures


def test_tiny_run_overfits(synthetic, capsys):
    """30 steps on the same 32 jets: the prediction loss falls far below its early value."""
    out = synthetic / "overfit"
    run("--n-jets", "32", "--epochs", "30", "--lr", "1e-2", "--var-weight", "0",
        "--cov-weight", "0", "--eval-every", "10", "--n-eval", "32", "--out", str(out))
    log = [json.loads(line) for line in open(out / "jjepa.jsonl")]
    assert log[-1]["step"] == 30
    assert log[-1]["loss"] < 0.5 * log[0]["loss"] and log[-1]["loss"] < 0.2
    counted = re.search(r"jjepa: (\d+) of the 960 training jets drawn", capsys.readouterr().out)
    assert counted and 0 < int(counted[1]) < 960  # the 1-prong jets, one subjet each


def test_probe_beats_chance(tiny_run):
    """1-prong vs 3-prong: even a briefly trained encoder separates them."""
    assert tiny_run["probe_acc"] > 0.8 and tiny_run["probe_auc"] > 0.9
    assert 0.0 < tiny_run["cos"] < 1.0 and tiny_run["std"] > 0


def test_loss_flags_change_the_loss():
    """The optional variance/covariance terms are wired in (not ignored); --loss smooth-l1 is
    F.smooth_l1_loss (beta 1) on the same predictions and targets: below MSE, above 0."""
    losses = {}
    for name, extra in {"mse": ("0", "0"), "var": ("1", "0"), "cov": ("0", "1")}.items():
        model, b, m = model_and_batch("--sel", "mlp", "--var-weight", extra[0],
                                      "--cov-weight", extra[1])
        losses[name] = loss_of(model, b, m).item()
    assert all(math.isfinite(v) for v in losses.values())
    assert losses["var"] > losses["mse"] and losses["cov"] > losses["mse"]
    model, b, m = model_and_batch("--sel", "mlp", "--var-weight", "0", "--cov-weight", "0",
                                  "--context-frame", "jet")  # the inputs as given
    mse = loss_of(model, b, m)
    model.loss = "smooth-l1"  # the same weights: only the distance changes
    smooth = loss_of(model, b, m)
    with torch.no_grad():
        t = model.target_encoder(b["x"], b["idx"], b["pos"])[0]
        t = torch.nn.functional.layer_norm(t, t.shape[-1:])
        t = torch.gather(t, 1, m["tgt_idx"][..., None].expand(-1, -1, t.shape[-1]))
        pred = prediction(model, b, m, b["pos"])
    valid = m["tgt_valid"]
    torch.testing.assert_close(mse, (pred - t).pow(2).mean(-1)[valid].mean())
    huber = torch.nn.functional.smooth_l1_loss(pred, t, reduction="none").mean(-1)
    torch.testing.assert_close(smooth, huber[valid].mean())
    assert 0 < smooth < mse
    assert jjepa.JJEPA(tiny("--loss", "smooth-l1")[1], tiny("--loss", "smooth-l1")[0]).loss == \
        "smooth-l1"


def test_paper_presets_train(synthetic):
    """Each paper preset trains 20 steps at its recipe (lr, EMA, no warm-up, SEL, plain loss),
    shrunk in width and depth for a CPU test."""
    for preset in ("SjT-T", "AE-SjT-T"):
        args = jjepa.get_args(["--preset", preset, "--steps", "20", "--batch-size", "8",
                               "--n-jets", "16", "--n-eval", "16", "--device", "cpu",
                               "--no-compile", "--dim", "32", "--depth", "2", "--heads", "4",
                               "--pred-depth", "1", "--sel-dim", "32", "--sel-depth", "1",
                               "--eval-every", "20", "--out", str(synthetic / preset)])
        assert (args.lr, args.warmup, args.var_weight, args.sel) == \
            (1e-4, 0, 0.0, "mlp" if preset == "SjT-T" else "attn")
        stats = jjepa.train(args, data=DATA)
        assert stats["step"] == 20 and math.isfinite(stats["val_loss"])


@pytest.mark.parametrize("argv,says", [
    (["--n-subjets", "1"], "--n-subjets 1 keeps fewer than 2"),
    (["--n-max", "1"], "--n-max 1 leaves at most one subjet"),
    (["--min-subjets", "21"], "--min-subjets 21 exceeds --n-subjets 20"),
])
def test_degenerate_settings_are_refused_in_one_line(argv, says, capsys):
    """Issue 22 item 4: a jet needs a context and a target subjet; settings that leave no jet
    both stop at start, in argparse's one error line."""
    with pytest.raises(SystemExit):
        jjepa.get_args(argv)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: " in last and says in last


def test_jets_without_a_target_are_counted(tiny_run):
    """1-prong jets make one C/A R=0.2 subjet: not both a context and a target, so no loss
    weight. The evaluation logs their fraction (the run prints their count: overfit test)."""
    args, cfg = tiny()
    val = batch_of(DATA["val"][:64], cfg)
    n = jjepa.n_subjets(val)
    assert 0 < (n < 2).sum() < len(n)
    assert tiny_run["no_target"] == pytest.approx(float((n < 2).float().mean()))
    model, b, m = model_and_batch()
    assert torch.equal(m["tgt_valid"].any(1), jjepa.n_subjets(b) >= 2)


def test_small_preset_defaults_against_collapse():
    """Item 20: the default recipe carries the anti-collapse fix measured on generated jets
    (EMA from 0.99, VICReg variance 2 and covariance 0.1 on the context jet vectors)."""
    args = jjepa.get_args([])
    assert (args.ema_start, args.var_weight, args.cov_weight) == (0.99, 2.0, 0.1)
    # issue 19: the leak-free frame by default (the study runs J-JEPA with its defaults)
    assert args.context_frame == jjepa.get_args(["--preset", "SjT-T"]).context_frame == "context"
    assert jjepa.get_args(["--var-weight", "0"]).var_weight == 0.0


def test_finetune_selects_with_the_checkpoints_subjets(tmp_path):
    """Issue 21: finetune.py's --min-subjets reclusters with the J-JEPA checkpoint's own subjet
    settings (here C/A R=0.8, which merges a 3-prong jet's prongs), not hard-coded ones; any
    other method's checkpoint gets the paper's (jjepa.SUBJETS)."""
    import finetune
    args, cfg = tiny("--subjet-r", "0.8", "--n-subjets", "10")
    encoder = jjepa.build_encoder(cfg)
    ckpt = tmp_path / "jjepa.pt"
    common.save_checkpoint(ckpt, method="jjepa", args=args, model=encoder, encoder=encoder,
                           encoder_config=cfg)
    spec = finetune.load_spec(finetune.get_args(["--ckpt", str(ckpt), "--min-subjets", "2"]))
    assert spec["subjets"] == dict(subjet_r=0.8, n_subjets=10, n_per_subjet=30)
    jets = DATA["val"][:16]
    batch = dict(x=jets.x, p4=jets.p4, valid=jets.valid, y=jets.y, jet=jets.jet)
    keep = {r: finetune.prepare_batch(dict(batch), np.array([0, 1]), 2, None,
                                      dict(spec["subjets"], subjet_r=r))["keep"]
            for r in (0.2, 0.8)}
    assert keep[0.2].sum() > keep[0.8].sum()  # R=0.2 sees three prongs where 0.8 sees one
    assert jjepa.SUBJETS == dict(subjet_r=0.2, n_subjets=20, n_per_subjet=30)
