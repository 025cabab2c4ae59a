import math
import types
import warnings
from pathlib import Path

import pytest
import torch

from scripts import bench_gen
import common
import diffmae

TINY = ["--size", "tiny", "--epochs", "2", "--batch-size", "16", "--n-jets", "48", "--n-max", "64",
        "--diff-mul", "2", "--n-eval", "32", "--device", "cpu", "--no-compile", "--log-every", "2"]


def unit_args(*flags):
    """Arguments for the unit tests: tiny sizes, a quarter of each jet hidden and decoded."""
    return diffmae.get_args(["--size", "tiny", "--n-max", "24", "--diff-mul", "3",
                             "--mask-ratio", "0.25", "--pred-ratio", "0.25", *flags])


def tiny_model(*flags):
    args = unit_args(*flags)
    torch.manual_seed(0)
    return diffmae.DiffMAE(diffmae.encoder_config(args), args), args


def fake_p4(B, N, seed=0):
    """Massless (px, py, pz, E) of a narrow jet at eta 0.7, phi 1.0: pT-ordered, 1-100 GeV."""
    g = torch.Generator().manual_seed(seed)
    pt = (torch.rand(B, N, generator=g) * 99 + 1).sort(1, descending=True)[0]
    eta = 0.7 + 0.3 * torch.randn(B, N, generator=g)
    phi = 1.0 + 0.3 * torch.randn(B, N, generator=g)
    pz = pt * torch.sinh(eta)
    return torch.stack([pt * torch.cos(phi), pt * torch.sin(phi), pz, torch.hypot(pt, pz)], -1)


def fake_jets(B=6, N=24, F_=17, seed=0):
    """x (B, N, F), p4 (B, N, 4), valid (B, N): jets of N, N - 3, 17, 9, 2 and 0 particles."""
    g = torch.Generator().manual_seed(seed)
    n = torch.tensor([N, N - 3, 17, 9, 2, 0][:B])
    valid = torch.arange(N)[None] < n[:, None]
    x = torch.randn(B, N, F_, generator=g) * valid[..., None]
    return x, fake_p4(B, N, seed) * valid[..., None], valid


def jet_frame(x, p4, valid):
    """x with the axis-dependent columns made as the data layer does, from all particles."""
    p4 = p4 * valid[..., None]
    return common.refeature(x, p4, valid, common.axis_of(p4.sum(1)))


def memory_jets(n, seed, n_short=0, N=24):
    """common.Jets for train(args, data=...): fake_p4 kinematics, the first n_short jets with one
    particle; labels alternate."""
    counts = torch.randint(8, N + 1, (n,), generator=torch.Generator().manual_seed(seed))
    counts[:n_short] = 1
    valid = torch.arange(N)[None] < counts[:, None]
    p4 = fake_p4(n, N, seed) * valid[..., None]
    x = jet_frame(torch.randn(n, N, 17, generator=torch.Generator().manual_seed(seed + 1)),
                  p4, valid)
    return common.Jets(x=x.numpy(), p4=p4.numpy(), valid=valid.numpy(),
                       y=(torch.arange(n) % 2).numpy(), jet=torch.zeros(n, 4).numpy())


MEMORY = ["--size", "tiny", "--n-max", "24", "--batch-size", "16", "--n-eval", "16", "--device",
          "cpu", "--no-compile", "--log-every", "2"]


def memory_run(out, *flags, n_short=0):
    """A tiny run on in-memory jets (train(args, data=...)): 48 train jets, 3 steps an epoch."""
    args = diffmae.get_args(MEMORY + ["--out", str(out), *flags])
    return diffmae.train(args, data=dict(train=memory_jets(48, 0, n_short),
                                         val=memory_jets(16, 1)))


def run(tmp_path, data, *extra):
    return diffmae.train(diffmae.get_args(TINY + ["--data", "pythia", "--data-dir", str(data),
                                                  "--out", str(tmp_path)] + list(extra)))


# --- the blocks and the method ------------------------------------------------------------------
def test_gqa_equals_mha_with_repeated_kv():
    torch.manual_seed(0)
    blk = diffmae.Block(32, 4, 2)
    x, mem = torch.randn(3, 5, 32), torch.randn(3, 7, 32)
    valid = torch.rand(3, 7) > 0.3
    valid[:, 0] = True
    # full multi-head attention written out, with group g's K/V copied to query heads 2g, 2g+1
    q = blk.q(x).view(3, 5, 4, 8).transpose(1, 2)
    k, v = blk.kv(mem).view(3, 7, 2, 2, 8).permute(2, 0, 3, 1, 4)
    k, v = k[:, [0, 0, 1, 1]], v[:, [0, 0, 1, 1]]
    s = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    ref = blk.proj((s.softmax(-1) @ v).transpose(1, 2).reshape(3, 5, 32))
    torch.testing.assert_close(blk.attend(x, mem, diffmae.key_mask(valid)), ref,
                               rtol=1e-5, atol=1e-6)


def test_rmsnorm_in_fp32_under_autocast():
    torch.manual_seed(0)
    norm = diffmae.RMSNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 16) * 30
    # without autocast: nn.RMSNorm to the bit (checkpoints and CPU runs unchanged)
    ref = torch.nn.RMSNorm(16)
    ref.load_state_dict(norm.state_dict())
    assert torch.equal(norm(x), ref(x))
    # under bf16 autocast: bf16 out, computed from the fp32 mean square, and no dtype warning
    xb = x.bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = norm(xb)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, ref(xb.float()).bfloat16())


def test_masks_disjoint_and_sized():
    x, p4, valid = fake_jets()
    vis_idx, vis_valid, pred_idx, pred_valid, _ = diffmae.make_masks(
        valid, 0.25, "1tok", torch.Generator().manual_seed(0))
    n = valid.sum(1)
    # n - round(0.25 n), >= 1 hidden
    assert vis_valid.sum(1).tolist() == [18, 16, 13, 7, 1, 0]
    assert pred_valid.sum(1).tolist() == [1, 1, 1, 1, 1, 0]
    for b in range(len(n)):
        seen, pred = (set(vis_idx[b][vis_valid[b]].tolist()),
                      set(pred_idx[b][pred_valid[b]].tolist()))
        assert not seen & pred and all(i < n[b] for i in seen | pred)


def test_masks_and_noise_per_rank_and_step():
    ("""Masks and noise are a pure function of (seed, rank, step): a resumed rank draws what """
     """it would
    have drawn, and two ranks never draw the same (on resume every rank once took rank 0's """
     """state).""")
    x, p4, valid = fake_jets()
    args = unit_args()
    a, again = (diffmae.make_batch(x, p4, valid, args, "cpu", 0, 5) for _ in range(2))
    other_rank = diffmae.make_batch(x, p4, valid, args, "cpu", 1, 5)
    other_step = diffmae.make_batch(x, p4, valid, args, "cpu", 0, 6)
    assert all(torch.equal(a[k], again[k]) for k in a)
    for b in (other_rank, other_step):
        assert not torch.equal(a["noise"], b["noise"]) and not torch.equal(a["x_vis"], b["x_vis"])


def test_encoder_never_sees_masked_particles():
    model, args = tiny_model()
    x, p4, valid = fake_jets()
    b1 = diffmae.make_batch(x, p4, valid, args, "cpu", 0, 1)
    # make_batch's masks for (rank 0, step 1), drawn again: which slots the encoder sees
    vis_idx, vis_valid, *_ = diffmae.make_masks(valid, 0.25, "0.25",
                                                common.generator(args.seed, "masks", 0, 1))
    seen = torch.zeros_like(valid)
    for row in range(6):
        seen[row, vis_idx[row][vis_valid[row]]] = True
    x2 = x.clone()
    x2[~seen] = 100.0                                 # hidden particles and padding: large numbers
    b2 = diffmae.make_batch(x2, p4, valid, args, "cpu", 0, 1)
    enc = lambda b: model.encoder(b["x_vis"], b["vis_valid"])[0][b["vis_valid"]]  # noqa: E731
    torch.testing.assert_close(enc(b1), enc(b2), rtol=0, atol=0)
    assert not torch.equal(b1["x_pred"], b2["x_pred"])              # the targets did change
    x2[0, vis_idx[0, 0], 0] += 1.0                       # a visible particle does matter
    assert not torch.allclose(enc(b1), enc(diffmae.make_batch(x2, p4, valid, args, "cpu", 0, 1)))


@pytest.mark.parametrize("feature_mix", [False, True])
def test_decoder_queries_do_not_attend_to_each_other(feature_mix):
    model, _ = tiny_model(*(["--feature-mix"] if feature_mix else []))
    torch.manual_seed(1)
    x, valid = torch.randn(2, 10, 17), torch.ones(2, 10, dtype=torch.bool)
    rank = torch.tensor([[1, 4, 7], [2, 3, 9]])
    z1 = model.condition(x, valid, rank)
    rank2 = rank.clone()
    rank2[:, 0] = 0
    z2 = model.condition(x, valid, rank2)
    torch.testing.assert_close(z1[:, 1:], z2[:, 1:], rtol=0, atol=0)
    assert not torch.allclose(z1[:, 0], z2[:, 0])


def test_diffusion_loss_hand_computed():
    ab = diffmae.cosine_alpha_bar(1000)
    x0 = torch.tensor([[[1.0, -2.0]], [[0.5, 0.0]]])                  # (B=2, P=1, F=2)
    z = torch.zeros(2, 1, 3)
    valid = torch.tensor([[True], [False]])                          # second jet's token ignored
    t = torch.tensor([[[0, 999]], [[500, 500]]])                    # (B, P, M=2)
    noise = torch.tensor([[[[0.3, 0.1], [-1.0, 2.0]]], [[[5.0, 5.0], [5.0, 5.0]]]])
    # a fixed, known predictor
    net = lambda xt, t_, z_: 0.5 * xt                               # noqa: E731
    # by hand: x_t = sqrt(ab) x0 + sqrt(1 - ab) eps ; loss = mean over the 2 draws x 2 features
    total = 0.0
    for m, tt in enumerate([0, 999]):
        a = float(ab[tt])
        for f in range(2):
            xt = math.sqrt(a) * float(x0[0, 0, f]) + math.sqrt(1 - a) * float(noise[0, 0, m, f])
            total += (0.5 * xt - float(noise[0, 0, m, f])) ** 2
    assert abs(float(diffmae.diffusion_loss(net, x0, z, valid, t, noise, ab)) - total / 4) < 1e-5
    # the zero-initialised MLP predicts eps = 0, so its loss is the mean squared noise
    mlp = tiny_model()[0].diff
    with torch.no_grad():
        got = diffmae.diffusion_loss(mlp, torch.randn(2, 1, 17), torch.randn(2, 1, 32), valid, t,
                                     torch.ones(2, 1, 2, 17) * 0.7, ab)
    assert abs(got.item() - 0.49) < 1e-6


def gaussian_eps(ab, mu, sig):
    """E[eps | x_t] for x0 ~ N(mu, sig^2): the exact noise predictor, net(x, t, z)."""
    def net(x, t, z):
        a = ab[t][..., None]
        m = mu(z) if callable(mu) else mu
        return (1 - a).sqrt() * (x - a.sqrt() * m) / (a * sig ** 2 + 1 - a)
    return net


def test_sampler_recovers_gaussian_with_true_noise_predictor():
    ab = diffmae.cosine_alpha_bar(1000)
    mu, sig = torch.tensor([1.5, -2.0, 0.0]), torch.tensor([0.5, 2.0, 1.0])
    s = bench_gen.ddpm_sample(gaussian_eps(ab, mu, sig), torch.zeros(8000, 1), 3, ab, steps=100,
                              gen=torch.Generator().manual_seed(0))
    torch.testing.assert_close(s.mean(0), mu, atol=0.06, rtol=0)
    torch.testing.assert_close(s.std(0), sig, rtol=0.05, atol=0)
    cold = bench_gen.ddpm_sample(gaussian_eps(ab, mu, sig), torch.zeros(100, 1), 3, ab,
                                 temperature=0.0)
    assert float(cold.std(0).max()) < 1e-3              # temperature scales only the noise
    # an untrained (eps = 0) predictor explodes by 1/sqrt(alpha_bar) ~ 1e4 unless x0 is clipped
    zero = lambda x, t, z: torch.zeros_like(x)                      # noqa: E731
    assert float(bench_gen.ddpm_sample(zero, torch.zeros(50, 1), 3, ab).abs().max()) > 1e3
    assert float(bench_gen.ddpm_sample(zero, torch.zeros(50, 1), 3, ab, lo=-5.0, hi=5.0)
                 .abs().max()) < 6


def test_all_padded_rows_finite():
    model, args = tiny_model()
    x = torch.full((2, 16, 17), float("nan"))
    valid = torch.zeros(2, 16, dtype=torch.bool)
    valid[1, :3] = True
    x[1, :3] = torch.randn(3, 17)
    tokens, _, jet = model.encoder(x, valid)
    assert torch.isfinite(tokens).all() and torch.isfinite(jet).all() and (jet[0] == 0).all()
    loss = model(**diffmae.make_batch(x.nan_to_num(), torch.zeros(2, 16, 4), valid, args,
                                      "cpu", 0, 0))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all()
                                        for p in model.parameters() if p.grad is not None)


def test_overfits_one_batch():
    model, args = tiny_model()
    b = diffmae.make_batch(*fake_jets(), args, "cpu", 0, 0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = model(**b).item()
    for _ in range(40):
        loss = model(**b)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.15 * first


def test_no_graph_breaks():
    model, args = tiny_model("--feature-mix")
    explained = torch._dynamo.explain(model)(**diffmae.make_batch(*fake_jets(), args, "cpu", 0, 0))
    assert explained.graph_count == 1 and explained.graph_break_count == 0


# --- issue 12's items ---------------------------------------------------------------------------
def test_targets_standardised_and_unstandardised_by_the_sampler():
    """Item 11: the loss sees (x - mean) / std; sampling maps back to input units."""
    model, args = tiny_model()
    mean, std = torch.linspace(-2, 2, 17), torch.linspace(0.04, 1.2, 17)
    b = diffmae.make_batch(*fake_jets(), args, "cpu", 0, 0)
    loss_unit = model(**b)
    model.t_mean[:], model.t_std[:] = mean, std
    moved = dict(b, x_pred=b["x_pred"] * std + mean)     # the same targets in input units
    torch.testing.assert_close(model(**moved), loss_unit, rtol=1e-5, atol=1e-6)
    ab = model.alpha_bar                                 # a denoiser that knows N(0, 1)
    exact = types.SimpleNamespace(t_mean=mean, t_std=std, alpha_bar=ab,
                                  diff=gaussian_eps(ab, torch.zeros(17), torch.ones(17)))
    s = bench_gen.sample(exact, torch.zeros(6000, 32), torch.Generator().manual_seed(0),
                         steps=50, clip=0)
    torch.testing.assert_close(s.mean(0), mean, atol=0.05 * 1.2, rtol=0)
    torch.testing.assert_close(s.std(0), std, rtol=0.06, atol=0)


def test_conditioning_control_on_a_toy():
    """Item 12: two toy generators of x = z + 0.3 noise, one conditioned on z and one that draws
    from the marginal N(0, 1.09) whatever z. Both pass the marginal check; only the first beats
    the control (samples from another particle's z)."""
    ab = diffmae.cosine_alpha_bar(1000)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3000, 3, generator=g)
    true = z + 0.3 * torch.randn(3000, 3, generator=g)
    other = z.roll(1, 0)
    names = ["a", "b", "c"]
    results = {}
    for name, net in [("conditional", gaussian_eps(ab, lambda c: c, torch.full((3,), 0.3))),
                      ("marginal", gaussian_eps(ab, torch.zeros(3),
                                                torch.full((3,), math.sqrt(1.09))))]:
        draw = lambda c: bench_gen.ddpm_sample(  # noqa: E731
            net, c, 3, ab, steps=50, gen=torch.Generator().manual_seed(1))
        results[name] = bench_gen.compare(true, draw(z), draw(other), names, torch.ones(3))
    for r in results.values():       # the marginal check: as close as other true particles are
        assert all(r[f"w1_{n}"] < 2 * r[f"w1_other_{n}"] + 0.05 for n in names)
    assert results["conditional"]["conditional"] and results["conditional"]["gap"] > 0.5
    assert not results["marginal"]["conditional"]


def test_feature_mix_gives_every_parameter_a_gradient():
    """Item 13: DDP fails at step 2 ("Expected to have finished reduction") if a parameter gets no
    gradient; with --feature-mix the encoder's final norm used to be unused."""
    for flags in ([], ["--feature-mix"]):
        model, args = tiny_model(*flags)
        model(**diffmae.make_batch(*fake_jets(), args, "cpu", 0, 0)).backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, missing


def test_drop_features_default_closes_the_energy_shortcut():
    """Item 14: the relative logs stay out of the encoder by default (the same flag and default as
    mpm.py); '' restores every input; an unknown name is a usage error."""
    assert diffmae.get_args([]).drop_features == "logptrel,logerel"
    names = common.FEATURE_NAMES["full"]
    cols = diffmae.encoder_config(diffmae.get_args([]))["input_cols"]
    assert [names[c] for c in cols] == [n for n in names if n not in ("logptrel", "logerel")]
    assert len(diffmae.encoder_config(diffmae.get_args(["--drop-features", ""]))
               ["input_cols"]) == 17
    model, _ = tiny_model()
    x, _, valid = fake_jets()
    x2 = x.clone()
    x2[..., [2, 3]] += 3.0                                           # logptrel, logerel
    x2[..., [2, 3]] *= valid[..., None]
    torch.testing.assert_close(model.encoder(x, valid)[2], model.encoder(x2, valid)[2],
                               rtol=0, atol=0)
    with pytest.raises(SystemExit):
        diffmae.get_args(["--drop-features", "logptrel,nonsense"])


def test_features_auto_is_kin_on_toptagging():
    ("""Item 16: Top Tagging files carry no ID / impact parameters; their 10 columns would """
     """be zeros.""")
    assert diffmae.get_args(["--data", "toptagging"]).features == "kin"
    assert diffmae.get_args(["--data", "jetclass"]).features == "full"
    assert diffmae.get_args(["--data", "toptagging", "--features", "full"]).features == "full"


def test_sizes_follow_the_talk():
    """Item 19: head dim 32 and 2 KV groups at every published size; 47m has about 47M parameters
    in the encoder (counted on the meta device, nothing allocated)."""
    for size in ("1m", "8m", "47m"):
        depth, dim, heads, kv_heads, *_ = diffmae.SIZES[size]
        assert dim // heads == 32 and kv_heads == 2
    with torch.device("meta"):
        enc = diffmae.Encoder(diffmae.encoder_config(diffmae.get_args(["--size", "47m"])))
    assert 40e6 < sum(p.numel() for p in enc.parameters()) < 50e6


def test_flags_validated():
    for bad in (["--mask-ratio", "1.5"], ["--pred-ratio", "0"], ["--pred-ratio", "two"],
                ["--diff-mul", "0"]):
        with pytest.raises(SystemExit):
            diffmae.get_args(bad)
    args = diffmae.get_args(["--preset", "paper", "--mask-ratio", "0.25"])   # explicit flags win
    assert (args.mask_ratio, args.size, args.drop_features, args.pred_ratio, args.optimizer) == \
        (0.25, "8m", "", "1tok", "schedulefree")


# --- whole runs on generated jets ----------------------------------------------------------------
def test_tiny_run_bitwise_deterministic_checkpoint_and_probe_on_val(tmp_path, tiny_pythia,
                                                                     monkeypatch, capsys):
    streams = []
    embed = common.embed_stream

    def spy(encoder, stream, *a, **kw):       # which split the end-of-run probe embeds
        streams.append({Path(f).parent.name for f in stream.files})
        return embed(encoder, stream, *a, **kw)
    monkeypatch.setattr(common, "embed_stream", spy)
    r1 = run(tmp_path / "a", tiny_pythia, "--feature-mix", "--eval-every", "2")
    out = capsys.readouterr().out
    r2 = run(tmp_path / "b", tiny_pythia, "--feature-mix", "--eval-every", "2")
    assert r1 == r2 and math.isfinite(r1["loss"]) and 0 <= r1["probe_acc"] <= 1
    # item 18: fitted on train, scored on val; a validation line per eval (steps 2, 4, 6)
    # and dt lines
    assert streams[:2] == [{"train"}, {"val"}]
    assert out.count("val loss") == 3 and out.count(" ms") == 3 and "scored on 10 val jets" in out
    c1, c2 = (common.load_checkpoint(tmp_path / d / "diffmae.pt") for d in "ab")
    assert all(torch.equal(c1["model"][k], c2["model"][k]) for k in c1["model"])
    # item 11: the mean/std of a training sample's targets (in their frame) are buffers
    args = diffmae.get_args(TINY + ["--feature-mix"])
    sample = common.JetStream("pythia", "train", path=tiny_pythia, n_jets=48, n_max=64,
                              features="full", batch_size=16, shuffle=False, drop_last=False)
    torch.testing.assert_close(c1["model"]["t_mean"],
                               diffmae.target_stats(sample, args)[0].float())
    assert c1["model"]["t_std"].min() < 0.5 < c1["model"]["t_std"].max()      # not left at 1
    model = diffmae.DiffMAE(c1["encoder_config"], args)
    model.load_state_dict(c1["model"])
    assert torch.equal(model.t_std, c1["model"]["t_std"])
    # the method-module interface: finetune.py rebuilds the encoder from the checkpoint alone
    enc = diffmae.build_encoder(c1["encoder_config"])
    enc.load_state_dict(c1["encoder"])
    assert diffmae.PAD == "batch" and diffmae.batch_transform(c1["encoder_config"]) is None
    val = common.JetStream("pythia", "val", path=tiny_pythia, n_max=64, features="full",
                           batch_size=4, shuffle=False, drop_last=False)
    batch = next(common.loader(val, torch.device("cpu")))
    tokens, tok_valid, jet = enc(**diffmae.encoder_inputs(batch, c1["encoder_config"]))
    assert (tokens.shape[:2] == tok_valid.shape and jet.shape == (4, 32)
            and torch.isfinite(jet).all())


def test_paper_preset_runs_20_steps(tmp_path, tiny_pythia):
    ("""The talk's recipe on generated jets, 20 steps on CPU. The test shrinks it to --size """
     """tiny (the
    preset's 8m would take minutes here); everything else is the preset's.""")
    r = diffmae.train(diffmae.get_args(["--preset", "paper", "--size", "tiny", "--steps", "20",
                                        "--batch-size", "16", "--n-jets", "48", "--n-max", "64",
                                        "--n-eval", "32", "--device", "cpu", "--no-compile",
                                        "--data-dir", str(tiny_pythia), "--out", str(tmp_path)]))
    ckpt = common.load_checkpoint(tmp_path / "diffmae.pt")
    a = ckpt["args"]
    assert (a["mask_ratio"], a["pred_ratio"], a["drop_features"], a["diff_mul"]) == \
        (0.125, "1tok", "", 4)
    assert (len(ckpt["encoder_config"]["input_cols"]) == 17 and ckpt["step"] == 20
            and math.isfinite(r["loss"]))


# --- issue 20: the MSE head, schedule-free AdamW, query ranks, the visible frame, refusals ------
def test_mse_head_loss_zero_on_a_perfect_prediction():
    model, args = tiny_model("--head", "mse")
    assert model.diff is None and isinstance(model.mse, torch.nn.Linear)
    b = diffmae.make_batch(*fake_jets(), args, "cpu", 0, 0)
    assert "noise" not in b and "t" not in b                       # nothing to diffuse
    model.t_mean[:], model.t_std[:] = torch.linspace(-1, 1, 17), torch.linspace(0.5, 2, 17)
    assert model(**b) > 0
    target = (b["x_pred"] - model.t_mean) / model.t_std              # the standardised features
    del model.mse
    model.mse = lambda z: target                                     # noqa: E731  a perfect head
    assert model(**b).item() == 0.0
    model.mse = lambda z: target + 0.5 * b["pred_valid"][..., None]  # noqa: E731
    assert abs(model(**b).item() - 0.25) < 1e-6


def test_bench_gen_refuses_an_mse_checkpoint(tmp_path):
    args = unit_args("--head", "mse")
    model = diffmae.DiffMAE(diffmae.encoder_config(args), args)
    common.save_checkpoint(tmp_path / "m.pt", method="diffmae", args=args, model=model,
                           encoder=model.encoder, encoder_config=diffmae.encoder_config(args))
    with pytest.raises(SystemExit, match="--head mse run has no generator"):
        bench_gen.main(["--ckpt", str(tmp_path / "m.pt")])


def test_hidden_ranks_are_a_permutation_per_jet():
    """--query-rank hidden: with every hidden particle decoded, a jet's query ranks are 0..M-1
    (M hidden); global ranks are the slots in the jet; none gives one query vector."""
    x, p4, valid = fake_jets()
    flags = ["--mask-ratio", "0.25", "--pred-ratio", "0.25"]
    b = {r: diffmae.make_batch(x, p4, valid, unit_args(*flags, "--query-rank", r), "cpu", 0, 3)
         for r in ("hidden", "global", "none")}
    for row in range(len(x)):
        sel = b["hidden"]["pred_valid"][row]
        m = int(sel.sum())
        assert m == (round(0.25 * int(valid[row].sum())) if valid[row].sum() >= 2 else 0) or m == 1
        assert sorted(b["hidden"]["pred_rank"][row][sel].tolist()) == list(range(m))
    assert b["global"]["pred_rank"][0][b["global"]["pred_valid"][0]].max() > 6   # not 0..5
    assert b["none"]["pred_rank"].eq(0).all()


def test_visible_frame_features_do_not_see_the_hidden_particles():
    """--frame visible: the encoder's input is bitwise the same when the hidden particles
    change (their 4-vectors, and so the data layer's jet axis); with --frame jet it is not."""
    x0, p4, valid = fake_jets()
    x = jet_frame(x0, p4, valid)
    vis_idx, vis_valid, *_ = diffmae.make_masks(valid, 0.25, "0.25",
                                                common.generator(0, "masks", 0, 2))
    shown = torch.zeros_like(valid)
    for row in range(len(valid)):
        shown[row, vis_idx[row][vis_valid[row]]] = True
    hidden = valid & ~shown
    p4b = p4.clone()
    p4b[hidden] = p4b[hidden] * torch.tensor([3.0, -1.0, 2.0, 3.5])   # moved and harder
    xb = jet_frame(x0, p4b, valid)
    for frame, same in (("visible", True), ("jet", False)):
        args = unit_args("--frame", frame)
        a, b = (diffmae.make_batch(xx, pp, valid, args, "cpu", 0, 2)
                for xx, pp in ((x, p4), (xb, p4b)))
        sel = a["vis_valid"]
        assert torch.equal(a["x_vis"][sel], b["x_vis"][sel]) == same, frame
        assert not torch.equal(a["x_pred"], b["x_pred"])              # the targets did change
    # in its own frame the visible jet is centred: the visible pT . sin(dphi) sums to 0
    a = diffmae.make_batch(x, p4, valid, unit_args(), "cpu", 0, 2)
    p4_vis = p4.gather(1, vis_idx[..., None].expand(-1, -1, 4))
    pt = torch.hypot(p4_vis[..., 0], p4_vis[..., 1]) * vis_valid
    assert (pt * torch.sin(a["x_vis"][..., -1])).sum(1).abs().max() < 1e-5 * pt.sum(1).max()


def test_degenerate_settings_refused_and_short_jets_counted(tmp_path, capsys, monkeypatch):
    for bad in (["--n-max", "1"], ["--n-max", "4", "--mask-ratio", "0.1"],
                ["--n-max", "4", "--mask-ratio", "0.9"]):
        with pytest.raises(SystemExit, match="need at least 1 hidden and 1 visible"):
            diffmae.get_args(bad)
    lrs = []
    set_lr = common.set_lr
    monkeypatch.setattr(common, "set_lr", lambda opt, lr: (lrs.append(lr), set_lr(opt, lr)))
    r = memory_run(tmp_path, "--epochs", "1", "--warmup", "0", n_short=5)
    # --warmup 0 (it divided by zero): the full lr from the first step
    assert lrs == [1e-3] * 3 and math.isfinite(r["loss"])
    out = capsys.readouterr().out
    assert r["short_jets"] == 5 and "5 of 48 training jets had fewer than 2" in out


@pytest.mark.parametrize("optimizer", ["adamw", "schedulefree"])
def test_resume_equals_uninterrupted(tmp_path, optimizer):
    flags = ["--optimizer", optimizer, "--warmup", "2"]
    full = memory_run(tmp_path / "full", *flags, "--epochs", "2")
    memory_run(tmp_path / "half", *flags, "--epochs", "1")
    ckpt = tmp_path / "half" / "diffmae.pt"
    resumed = memory_run(tmp_path / "half", *flags, "--epochs", "2", "--resume", str(ckpt))
    assert resumed["loss"] == full["loss"] and resumed["val_loss"] == full["val_loss"]
    a, b = (common.load_checkpoint(tmp_path / d / "diffmae.pt") for d in ("full", "half"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    if optimizer == "schedulefree":  # saved in eval mode: the average x, not the point y
        group = a["optimizer"]["param_groups"][0]
        assert group["train_mode"] is False and group["k"] == 6 and group["betas"] == (0.9, 0.95)
        x = a["model"]["encoder.embed.weight"]
        y = torch.lerp(x, a["optimizer"]["state"][0]["z"], 1 - 0.9)
        assert not torch.equal(y, x)
