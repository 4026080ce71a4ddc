import dataclasses
import math

import numpy as np
import pytest
import torch

import data
import models
import training


@pytest.fixture(scope="module")
def tiny():
    return data.load_data("synthetic", n_train=600, n_test=100, seed=2)


def small_vae(channels=3):
    torch.manual_seed(0)
    return models.build_model(models.vae_config("small", in_channels=channels))


@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_and_finite_elbo_with_nonnegative_kl(channels):
    vae = small_vae(channels)
    x = torch.rand(4, channels, 32, 32)
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (4, vae.latent_dim)
    assert vae.decode(mu).shape == (4, channels, 32, 32)
    assert 0 <= vae.reconstruct(x).min() and vae.reconstruct(x).max() <= 1
    assert vae.sample(3).shape == (3, channels, 32, 32)
    out = vae.elbo(x)
    for key in ("loss", "nll", "kl", "bpd"):
        assert torch.isfinite(out[key]).all()
    assert (out["kl"] >= 0).all()
    assert torch.allclose(out["bpd"], (out["nll"] + out["kl"]) / (channels * 1024 * math.log(2)))


def test_discretized_logistic_is_a_distribution_over_256_levels():
    levels = torch.arange(256, dtype=torch.float64) / 255 * 2 - 1  # every possible pixel value
    for mean, log_scale in [(0.0, -1.0), (0.7, -3.0), (-1.0, 0.5), (0.3, -7.0)]:
        nll = models.discretized_logistic_nll(levels, torch.tensor(mean, dtype=torch.float64),
                                              torch.tensor(log_scale, dtype=torch.float64))
        assert torch.exp(-nll).sum().item() == pytest.approx(1.0, abs=2e-3)


def test_an_end_level_the_logistic_leaves_almost_no_mass_gets_its_exact_tail():
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    for x, mean, log_scale in [(1.0, -1.0, -3.0), (-1.0, 1.0, -3.0), (1.0, 0.5, -5.0)]:
        nll = models.discretized_logistic_nll(f64(x), f64(mean), f64(log_scale))
        edge = (x - mean - x / 255) / math.exp(log_scale)  # the inner edge of the end bin, in logistic units
        exact = math.log1p(math.exp(x * edge))  # -log P: P(255) = 1 - sigmoid(edge), P(0) = sigmoid(edge)
        assert nll.item() == pytest.approx(exact, rel=1e-9)  # the density at the bin's centre was 0.4-1.9 off


def test_mixture_with_coupled_channels_is_a_distribution_over_every_rgb_value():
    """The joint of the three coupled channels, summed over all 256^3 colours of a pixel, is 1."""
    gen = torch.Generator().manual_seed(0)
    k = 3
    rand = lambda *shape: torch.rand(*shape, generator=gen, dtype=torch.float64)
    logits, means = rand(1, k, 1, 1) * 4 - 2, rand(1, k, 3, 1, 1) * 2 - 1
    log_scales, coeffs = rand(1, k, 3, 1, 1) * -5, rand(1, k, 3, 1, 1) * 2 - 1
    levels = torch.arange(256, dtype=torch.float64) / 255 * 2 - 1
    g, b = torch.meshgrid(levels, levels, indexing="ij")
    total = 0.0
    for r in levels:  # 256 slices of 65,536 colours
        x = torch.stack([torch.full_like(g, r), g, b]).flatten(1).T[:, :, None, None]  # (65536, 3, 1, 1)
        n = len(x)
        nll = models.mixture_logistic_nll(x, logits.expand(n, -1, -1, -1), means.expand(n, -1, -1, -1, -1),
                                          log_scales.expand(n, -1, -1, -1, -1), coeffs.expand(n, -1, -1, -1, -1))
        total += torch.exp(-nll).sum().item()
    assert total == pytest.approx(1.0, abs=1e-4)


def test_coupling_makes_a_channel_that_follows_another_cheap():
    """Green equal to red: with coupling coefficient 1 green costs almost nothing given red; with 0 it is
    as costly as red itself. Swapping which channel conditions on which would break this."""
    x = (torch.randint(0, 256, (4, 3, 8, 8), generator=torch.Generator().manual_seed(0)).double() / 255) * 2 - 1
    x[:, 1] = x[:, 0]
    b, hw = len(x), (8, 8)
    logits = torch.zeros(b, 1, *hw, dtype=torch.float64)
    means = torch.zeros(b, 1, 3, *hw, dtype=torch.float64)
    log_scales = torch.full((b, 1, 3, *hw), -6.0, dtype=torch.float64)
    log_scales[:, :, 0] = log_scales[:, :, 2] = 0.0
    coupled, free = torch.zeros(b, 1, 3, *hw, dtype=torch.float64), torch.zeros(b, 1, 3, *hw, dtype=torch.float64)
    coupled[:, :, 0] = 1.0  # pair (0, 1): green's mean follows red
    assert models.mixture_logistic_nll(x, logits, means, log_scales, coupled).mean() < \
        models.mixture_logistic_nll(x, logits, means, log_scales, free).mean() - 5


def test_exact_decoder_is_near_the_entropy_bound_and_constant_decoder_is_worse():
    x = torch.randint(0, 256, (2, 3, 32, 32)).float() / 255 * 2 - 1
    dims_ln2 = x[0].numel() * math.log(2)
    exact = models.discretized_logistic_nll(x, x, torch.full_like(x, -7.0)).flatten(1).sum(1) / dims_ln2
    constant = models.discretized_logistic_nll(x, torch.zeros_like(x), torch.zeros_like(x)).flatten(1).sum(1) / dims_ln2
    assert (exact >= 0).all() and (exact < 0.05).all()  # a deterministic image has entropy 0
    assert (constant > 5).all()  # uniform noise needs ~8 bits/dim


def test_one_step_lowers_the_loss_on_a_fixed_batch():
    vae = small_vae()
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    loss = lambda: vae.elbo(x, generator=torch.Generator().manual_seed(0))["loss"]
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    before = loss()
    opt.zero_grad()
    before.backward()
    opt.step()
    assert loss().item() < before.item()


def test_free_bits_floor_the_trained_kl():
    vae = small_vae()
    x = torch.rand(4, 3, 32, 32)
    gen = lambda: torch.Generator().manual_seed(1)
    plain, floored = vae.elbo(x, generator=gen()), vae.elbo(x, free_bits=100.0, generator=gen())
    assert floored["loss"].item() == pytest.approx(plain["nll"].mean().item() + 100.0 * vae.latent_dim, rel=1e-5)
    assert torch.equal(plain["kl"], floored["kl"])  # reported KL is the true one
    # a floor between the dims' KLs: dims above it keep their batch-mean KL, dims below count the floor
    mu, logvar = vae.encode(x)
    per_dim = (0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)).mean(0)
    floor = per_dim.median().item()
    mid = vae.elbo(x, free_bits=floor, generator=gen())
    expected = plain["nll"].mean() + per_dim.clamp_min(floor).sum()
    assert (per_dim < floor).any() and (per_dim > floor).any()
    assert mid["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_no_kl_warm_up_weighs_the_full_kl_from_the_first_step(tiny, tmp_path, monkeypatch):
    weights, real = [], models.VAE.loss_terms

    def recording(self, x, kl_weight=1.0, *args, **kwargs):
        if self.training:
            weights.append(kl_weight)
        return real(self, x, kl_weight, *args, **kwargs)

    monkeypatch.setattr(models.VAE, "loss_terms", recording)
    hyp = dict(epochs=1, batch_size=200, kl_warmup_epochs=0)
    training.train_vae(tiny, tmp_path / "v.pt", preset="small", hyp=hyp, progress=False)
    assert len(weights) > 1 and set(weights) == {1.0}  # the first step weighed 0 before


def test_fit_vae_autocasts_its_convolutions_to_bfloat16_only_where_the_device_has_it(tiny, tmp_path, monkeypatch):
    """Where `bf16_training` says so, training steps run the VAE's convolutions in bfloat16 and its likelihood
    and KL in float32 (in bfloat16 the difference of two CDFs a level apart would lose most of its digits);
    validation is float32 either way; the checkpoint records the precision; both learn."""
    real_nll, real_elbo = models.mixture_logistic_nll, models.VAE.loss_terms
    autocasts = not torch.cuda.is_available() or torch.cuda.is_bf16_supported()  # not a GPU older than Ampere
    for bf16 in (False, True) if autocasts else (False,):
        monkeypatch.setattr(training, "bf16_training", lambda device: bf16)
        seen, likelihood, kl = set(), set(), set()

        def elbo(*args, **kwargs):
            out = real_elbo(*args, **kwargs)
            kl.add(out["kl"].dtype)
            return out

        monkeypatch.setattr(models.VAE, "loss_terms", elbo)
        monkeypatch.setattr(models, "mixture_logistic_nll",
                            lambda *args: likelihood.add(tuple(a.dtype for a in args)) or real_nll(*args))
        vae = small_vae()
        untrained = training.evaluate_vae(vae, tiny.val_x)["bpd"]
        vae.decoder[-1].register_forward_hook(lambda module, args, out: seen.add((module.training, out.dtype)))
        training.fit_vae(vae, tiny, hyp=dict(epochs=2, batch_size=64), ckpt_path=tmp_path / f"{bf16}.pt",
                         progress=False)
        assert seen == {(True, torch.bfloat16 if bf16 else torch.float32), (False, torch.float32)}, bf16
        assert likelihood == {(torch.float32,) * 5} and kl == {torch.float32}, (bf16, likelihood, kl)
        ckpt = torch.load(tmp_path / f"{bf16}.pt", weights_only=True)
        assert ckpt["precision"] == ("bf16" if bf16 else "fp32")
        assert training.evaluate_vae(vae, tiny.val_x)["bpd"] < untrained - 0.1, bf16


def test_latent_statistics_match_an_independent_computation(tiny):
    vae = small_vae()
    stats = training.latent_statistics(vae, tiny.train_x, batch_size=64)
    d = vae.latent_dim
    with torch.no_grad():
        mu = vae.encode(tiny.train_x.float() / 255)[0].double()
    assert stats["latent_mean"].shape == (d,) and stats["latent_cov"].shape == (d, d)
    assert torch.allclose(stats["latent_mean"].double(), mu.mean(0), atol=1e-5)
    assert torch.allclose(stats["latent_cov"].double(), torch.cov(mu.T), atol=1e-5)
    assert torch.linalg.eigvalsh(stats["latent_cov"].double()).min() > -1e-6  # positive semi-definite
    lo, hi = np.percentile(mu.numpy(), [0.5, 99.5], axis=0)  # each dim's 0.5th and 99.5th percentile
    assert np.allclose(stats["latent_lo"].numpy(), lo, atol=1e-5)
    assert np.allclose(stats["latent_hi"].numpy(), hi, atol=1e-5)
    assert (stats["latent_lo"] < stats["latent_hi"]).all()


def test_training_stores_statistics_and_round_trips(tiny, tmp_path, monkeypatch):
    vae, ckpt = training.train_vae(tiny, tmp_path / "vae.pt", preset="small", hyp=dict(epochs=2, batch_size=64),
                                   csv_path=tmp_path / "vae.csv", progress=False)
    rows = training.read_csv(tmp_path / "vae.csv")
    assert len(rows) == 2 and rows[0]["kl_weight"] < rows[1]["kl_weight"] <= 1
    lr = training.VAE_HYP["lr"]  # each row's lr is its last step's: above the floor of 0.1 x lr, reached after it
    assert lr > rows[0]["lr"] > rows[1]["lr"] > 0.1 * lr * (1 + 1e-6)
    best = min(rows, key=lambda r: r["val_bpd"])
    assert ckpt["epoch"] == best["epoch"] and ckpt["complete"]
    assert training.evaluate_vae(vae, tiny.val_x)["bpd"] == pytest.approx(best["val_bpd"], rel=1e-4)
    expected = training.latent_statistics(vae, tiny.train_x)
    for name, value in expected.items():
        assert torch.allclose(getattr(vae, name), value, atol=1e-5), name
    assert not torch.equal(vae.latent_cov, torch.eye(vae.latent_dim, device=vae.latent_cov.device))
    L = vae.latent_cholesky()
    scale = vae.latent_cov.diagonal().mean()  # the jitter's unit: relative, whatever the latent's spread
    assert (L @ L.T - vae.latent_cov).abs().max() <= 2e-4 * scale
    # the same settings reload it on the same data, and train anew on other images under the same name
    fits = []
    monkeypatch.setattr(training, "fit_vae", lambda *a, **k: fits.append(a[1]))
    for d in (tiny, dataclasses.replace(tiny, train_x=255 - tiny.train_x)):
        training.train_vae(d, tmp_path / "vae.pt", preset="small", hyp=dict(epochs=2, batch_size=64), progress=False)
    assert len(fits) == 1 and fits[0].name == tiny.name and fits[0].fingerprint() != ckpt["data"] == tiny.fingerprint()


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tiny, tmp_path, monkeypatch):
    real = models.VAE.loss_terms
    calls = []

    def poisoned(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if self.training:
            calls.append(1)
            if len(calls) == 12:  # second epoch (9 steps per epoch)
                out["loss"] = out["loss"] * float("nan")
        return out
    monkeypatch.setattr(models.VAE, "loss_terms", poisoned)
    vae = small_vae()
    for name, value in vae.prior_statistics().items():  # as if measured by an earlier run
        getattr(vae, name).copy_(value + 1)
    with pytest.raises(FloatingPointError, match=r"loss became nan in epoch 2.*best epoch so far is in .*vae.partial.pt "
                                                 r"\(training.load_checkpoint\(path, partial=True\) loads it\)"):
        training.fit_vae(vae, tiny, dict(epochs=3, batch_size=60), ckpt_path=tmp_path / "vae.pt", progress=False)
    for name, value in vae.prior_statistics().items():  # not the earlier run's, beside other weights
        assert torch.equal(getattr(vae, name), value), name
    assert len(calls) == 18  # checked at the epoch's end, not at each step (that would wait for a GPU each step)
    assert not (tmp_path / "vae.pt").exists()  # never at the finished checkpoint's path
    ckpt = torch.load(tmp_path / "vae.partial.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and not ckpt["complete"]
    assert all(torch.isfinite(p).all() for p in ckpt["state_dict"].values() if p.is_floating_point())


def test_latent_summary_of_a_known_covariance():
    vae = small_vae()
    d = vae.latent_dim
    cov = torch.eye(d) * 0.001
    cov[:2, :2] = torch.tensor([[4.0, 2.0], [2.0, 4.0]])  # two correlated dims (corr 0.5), the rest near-dead
    vae.latent_cov.copy_(cov)
    s = vae.latent_summary()
    assert s["active_dims"] == 2
    assert torch.allclose(s["eigenvalues"][:2].float(), torch.tensor([6.0, 2.0]), atol=1e-5)
    eig = torch.cat([torch.tensor([6.0, 2.0]), torch.full((d - 2,), 0.001)]).double()
    assert s["participation_ratio"] == pytest.approx((eig.sum() ** 2 / (eig ** 2).sum()).item(), rel=1e-6)
    assert s["mean_abs_corr"] == pytest.approx(2 * 0.5 / (d * (d - 1)), rel=1e-6)


def test_a_latent_without_variance_is_named_not_nan(tiny, tmp_path):
    vae = small_vae()
    vae.latent_cov.zero_()  # every code the same: measured on identical images
    with pytest.raises(ValueError, match="latent covariance is zero.*cannot be whitened"):
        vae.latent_cholesky()
    for bad in (float("nan"), float("inf")):
        broken = small_vae()
        broken.latent_cov[0, 0] = bad  # overflowed codes, or a damaged checkpoint: not "identical images"
        with pytest.raises(ValueError, match="latent covariance is not finite.*measure it again"):
            broken.latent_cholesky()
    assert vae.latent_summary()["participation_ratio"] == 0.0  # was NaN
    flat = small_vae()
    flat.latent_cov.fill_diagonal_(1.0)[0, 0] = 0.0  # one direction of no variance: whitened only with a jitter
    with pytest.raises(ValueError, match=r"covariance is singular .* jitter=0: pass a larger jitter"):
        flat.latent_cholesky(jitter=0)
    assert flat.latent_cholesky().isfinite().all()
    with pytest.raises(ValueError, match=r"images has 1 image\(s\): the latent statistics \(a covariance\) need"):
        training.latent_statistics(vae, tiny.train_x[:1])  # its covariance over n - 1 = 0 was NaN
    one = dataclasses.replace(tiny, train_x=tiny.train_x[:1], train_y=tiny.train_y[:1])
    with pytest.raises(ValueError, match=r"data.train_x has 1 image\(s\)"):  # before training, not after it
        training.train_vae(one, tmp_path / "vae.pt", preset="small", hyp=dict(epochs=1), progress=False)


def test_a_config_from_before_the_mixture_asks_for_retraining():
    config = models.vae_config("small")
    del config["mixtures"]
    with pytest.raises(ValueError, match="predates the decoder's logistic mixture: retrain"):
        models.build_model(config)


def test_the_vae_names_its_image_size_and_takes_images_in_its_dtype():
    vae = small_vae().eval()
    with pytest.raises(ValueError, match=r"the VAE takes 32x32 images.*got \(2, 3, 64, 64\)"):
        vae.elbo(torch.rand(2, 3, 64, 64))  # used to fail inside a matmul
    for wrong in (torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 255):  # bits/dim of nothing before
        with pytest.raises(ValueError, match=r"x .*\[0, 1\]"):
            vae.elbo(wrong)
    d = data.load_data("synthetic-hard", n_train=60, n_test=10, size=28)
    with pytest.raises(ValueError, match=r"the VAE takes 32x32 images"):
        training.train_vae(d, "unused.pt", preset="small", hyp=dict(epochs=1, batch_size=20), progress=False)
    x = (torch.rand(2, 3, 32, 32) * 255).to(torch.uint8)
    with torch.no_grad():
        ref = vae.reconstruct(x)
        torch.testing.assert_close(vae.double().reconstruct(x).float(), ref, atol=1e-4, rtol=1e-4)
        assert training.latent_statistics(vae, x)["latent_mean"].shape == (vae.latent_dim,)


def test_interpolation_runs_from_one_reconstruction_to_the_other_in_even_steps():
    vae = small_vae().eval()
    x = (torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    with torch.no_grad():
        for p in vae.parameters():  # untrained, two images decode 6e-5 apart; with weights x2, 0.025
            p.mul_(2)
        path = vae.interpolate(x[0], x[1], steps=5)
        ends = vae.reconstruct(x)
        z = vae.encode(x)[0]
        middle = vae.decode(z.mean(0, keepdim=True))
    assert path.shape == (5, 3, 32, 32)
    torch.testing.assert_close(path[[0, -1]], ends)
    torch.testing.assert_close(path[2:3], middle)
    assert (path[0] - path[-1]).abs().max() > 0.01  # the two ends differ, so the test can tell them apart
    with pytest.raises(ValueError, match=r"two images of one shape \(C, H, W\).*\(1, 3, 32, 32\)"):
        vae.interpolate(x[:1], x[1:])
    with pytest.raises(ValueError, match="steps must be an int >= 2"):
        vae.interpolate(x[0], x[1], steps=1)


def test_the_vaes_image_methods_take_the_two_image_forms_and_refuse_others():
    vae = small_vae().eval()
    x = (torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(vae.reconstruct(x), vae.reconstruct(x.float() / 255))
        torch.testing.assert_close(vae.interpolate(x[0], x[1], 3), vae.interpolate(x[0].float() / 255, x[1].float() / 255, 3))
        with pytest.raises(ValueError, match="x .*0, 255"):
            vae.reconstruct(x.float())  # floats in 0-255 would be garbage, not an image
        with pytest.raises(ValueError, match=r"x must be a batch .*x\[None\]"):
            vae.reconstruct(x[0] / 255)
        with pytest.raises(ValueError, match="a .*0, 255"):
            vae.interpolate(x[0].float(), x[1].float())
        with pytest.raises(ValueError, match="1 channel"):
            vae.reconstruct(x[:, :1])


def test_the_mean_image_is_the_mixtures_mean_with_each_channel_coupled_to_the_ones_before_it(monkeypatch):
    """decode by hand, on fixed mixture parameters (2 components, 3 channels, 2x2 images): channel j's mean in
    component k is mu_kj + sum over i < j of c_k(ij) m_ki, clamped to [-1, 1], and the image is the components'
    mean, weighted by the softmax of their logits, from [-1, 1] to [0, 1]."""
    vae = small_vae()
    g = torch.Generator().manual_seed(0)
    logits, mu = torch.randn(1, 2, 2, 2, generator=g), torch.rand(1, 2, 3, 2, 2, generator=g) * 1.2 - 0.6
    coeffs = torch.rand(1, 2, 3, 2, 2, generator=g) * 2 - 1  # pairs (0, 1), (0, 2), (1, 2)
    mu[0, 0, 0, 0, 0], coeffs[0, 0, 0, 0, 0] = 1.0, 1.0  # green past 1 (1.0 + its own mean): clamped as it feeds blue
    monkeypatch.setattr(vae, "decode_params", lambda z: (logits, mu, None, coeffs))
    m0 = mu[:, :, 0]
    m1 = (mu[:, :, 1] + coeffs[:, :, 0] * m0).clamp(-1, 1)
    m2 = (mu[:, :, 2] + coeffs[:, :, 1] * m0 + coeffs[:, :, 2] * m1).clamp(-1, 1)
    assert (mu[:, :, 1] + coeffs[:, :, 0] * m0).amax() > 1  # the clamp matters
    weights = torch.softmax(logits, 1)[:, :, None]
    want = ((weights * torch.stack([m0, m1, m2], 2)).sum(1).clamp(-1, 1) + 1) / 2
    assert torch.allclose(vae.decode(torch.zeros(1, vae.latent_dim)), want, atol=1e-6)


def test_a_sample_at_temperature_0_is_the_prior_means_image():
    vae = small_vae().eval()
    with torch.no_grad():
        assert torch.allclose(vae.sample(2, temperature=0.0), vae.decode(torch.zeros(2, vae.latent_dim)))
        assert not torch.allclose(vae.sample(2, temperature=1.0), vae.decode(torch.zeros(2, vae.latent_dim)))


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_scales_the_priors_standard_deviation(temperature, monkeypatch):
    vae = small_vae().eval()
    monkeypatch.setattr(vae, "decode", lambda z: z)  # the codes drawn
    z = vae.sample(20000, torch.Generator().manual_seed(0), temperature)
    assert z.std().item() == pytest.approx(temperature, rel=0.02)  # not its variance (T ** 2)


def test_bad_sample_arguments_are_named():
    vae = small_vae()
    for n in (0, -1, 2.0):
        with pytest.raises(ValueError, match=f"n must be an int >= 1, got {n!r}"):
            vae.sample(n)
        with pytest.raises(ValueError, match=f"n must be an int >= 1, got {n!r}"):
            vae.sample_aggregate(n)
    for t in (-1.0, float("nan"), "1"):
        with pytest.raises(ValueError, match=f"temperature must be a finite number >= 0, got {t!r}"):
            vae.sample(2, temperature=t)
    with pytest.raises(ValueError, match="jitter must be a finite number >= 0, got -1"):
        vae.latent_cholesky(jitter=-1)


def test_the_bound_draws_each_code_from_its_posterior(monkeypatch):
    """z ~ N(mu, exp(logvar)) for each image: z = mu alone (or a wrong spread) would leave every other test
    passing while the bits/dim stopped being an estimate of the bound."""
    vae = small_vae().eval()
    head = [m for m in vae.encoder.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))][-1]
    with torch.no_grad():  # logvar near -2, where a spread of exp(logvar) (0.14) is far from exp(logvar / 2) (0.37)
        head.bias[len(head.bias) // 2:] -= 2
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)).expand(4000, -1, -1, -1)
    drawn, real = [], vae.decode_params
    monkeypatch.setattr(vae, "decode_params", lambda z: drawn.append(z.detach()) or real(z))
    with torch.no_grad():
        vae.loss_terms(x, generator=torch.Generator().manual_seed(1))
        mu, logvar = vae.encode(x[:1])
    z = drawn[0]
    assert logvar.mean() < -1.5, logvar.mean()
    torch.testing.assert_close(z.mean(0), mu[0], atol=4 * (0.5 * logvar[0]).exp().max().item() / 4000 ** 0.5,
                               rtol=0)
    torch.testing.assert_close(z.std(0), (0.5 * logvar[0]).exp(), rtol=0.1, atol=0)


def test_the_statistics_are_those_of_the_best_epoch_whichever_it_is(tiny, tmp_path, monkeypatch):
    """A run whose first epoch validates best ends with that epoch's weights, and the latent statistics are
    measured on them, not on the last epoch's."""
    scores, states, real = iter([1.0, 2.0]), [], training.evaluate_vae

    def scored(vae, *a, **k):
        states.append({name: v.detach().clone() for name, v in vae.state_dict().items()})
        return dict(real(vae, *a, **k), bpd=next(scores))
    monkeypatch.setattr(training, "evaluate_vae", scored)
    vae, ckpt = training.train_vae(tiny, tmp_path / "vae.pt", preset="small", hyp=dict(epochs=2, batch_size=64),
                                   progress=False)
    assert ckpt["epoch"] == 1 and [r["val_bpd"] for r in ckpt["history"]] == [1.0, 2.0]
    weights = [name for name in states[0] if not name.startswith("latent_")]
    assert not all(torch.equal(states[0][name], states[1][name]) for name in weights)  # the epochs differ
    assert all(torch.equal(vae.state_dict()[name], states[0][name]) for name in weights)  # the first's
    expected = training.latent_statistics(vae, tiny.train_x)
    assert all(torch.allclose(getattr(vae, name), value, atol=1e-6) for name, value in expected.items())


def test_a_run_shorter_than_twice_the_kl_warm_up_ends_at_the_full_kl(tiny, monkeypatch):
    """The warm-up takes at most half the run: a 2-epoch run under the 3-epoch default used to end at a weight
    of 2/3, never training on the bound it reports."""
    weights, real = [], models.VAE.loss_terms

    def recording(self, x, kl_weight=1.0, *args, **kwargs):
        if self.training:  # not validation's
            weights.append(kl_weight)
        return real(self, x, kl_weight, *args, **kwargs)
    monkeypatch.setattr(models.VAE, "loss_terms", recording)
    rows = training.fit_vae(small_vae(), tiny, hyp=dict(epochs=2, batch_size=100), progress=False)
    assert training.VAE_HYP["kl_warmup_epochs"] > 2 and len(weights) == 10  # 5 full batches an epoch
    assert weights == pytest.approx([0, 0.2, 0.4, 0.6, 0.8] + [1.0] * 5)  # the second epoch at the full KL
    assert [r["kl_weight"] for r in rows] == pytest.approx([0.8, 1.0])
