"""distill/metrics.py on constructed cases: known values, closed forms, and float64 numpy references written
another way (the Fréchet trace term from the eigenvalues of S1 S2, not from symmetric square roots)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distill import metrics


def images(seed: int, n: int = 3, side: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).random((n, side, side, 3))


def test_identical_images_are_at_distance_zero():
    a = images(0)
    assert metrics.mean_abs(a, a) == 0 and metrics.psnr(a, a) == math.inf
    assert metrics.ssim(a, a) == pytest.approx(1, abs=1e-12)


def test_known_shifts_and_noise_give_the_analytic_values():
    a = images(1) * 0.5
    assert metrics.mean_abs(a, a + 0.1) == pytest.approx(0.1)
    assert metrics.psnr(a, a + 0.1) == pytest.approx(20.0)  # MSE 0.01: 10 log10(100)
    noise = np.random.default_rng(2).choice([-0.05, 0.05], size=a.shape)  # |noise| = 0.05 everywhere
    assert metrics.psnr(a, a + noise) == pytest.approx(10 * math.log10(1 / 0.0025))
    for p, q in ((0.2, 0.2), (0.2, 0.7), (0.0, 1.0)):  # constant images: SSIM's closed form
        c1 = metrics.SSIM_K1**2
        want = (2 * p * q + c1) / (p * p + q * q + c1)
        got = metrics.ssim(np.full((1, 16, 16, 3), p), np.full((1, 16, 16, 3), q))
        assert got == pytest.approx(want, rel=1e-9)
    assert metrics.mse(torch.ones(2, 4), torch.zeros(2, 4)) == 1.0


def ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM as Wang et al. (2004, IEEE TIP 13(4), and their ssim_index.m) define it, one window at a time in
    float64: an 11x11 circular Gaussian window (sigma 1.5, weights summing to 1) at every position where it fits
    inside the image ('valid', no padding); weighted means, and weighted variances and covariance as central moments
    sum w (x - mu_x)(y - mu_y); C1 = (0.01 L)^2, C2 = (0.03 L)^2 with L = 1; the mean over all windows, of every
    channel of every image."""
    r = np.arange(11) - 5.0
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5**2))
    w = g / g.sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for x_img, y_img in zip(a, b):
        for ch in range(a.shape[-1]):
            x_ch, y_ch = x_img[..., ch], y_img[..., ch]
            for i in range(x_ch.shape[0] - 10):
                for j in range(x_ch.shape[1] - 10):
                    x, y = x_ch[i:i + 11, j:j + 11], y_ch[i:i + 11, j:j + 11]
                    mx, my = (w * x).sum(), (w * y).sum()
                    vx, vy, cxy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum(), (w * (x - mx) * (y - my)).sum()
                    values.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_equals_wang_et_al_written_window_by_window():
    """A random pair of non-square, non-constant images (b a noisy, dimmed a, so SSIM sits well inside (0, 1)):
    metrics.ssim equals the explicit per-window definition; the window size, sigma, K1 / K2, a uniform window or
    padded borders each move it far beyond the tolerance."""
    rng = np.random.default_rng(6)
    a = rng.random((2, 20, 27, 3))
    b = np.clip(0.6 * a + 0.4 * rng.random(a.shape) ** 2, 0, 1)
    want = ssim_reference(a, b)
    assert 0.2 < want < 0.9
    assert metrics.ssim(a, b) == pytest.approx(want, rel=1e-10)
    assert metrics.ssim(b, a) == pytest.approx(want, rel=1e-10)  # symmetric
    assert metrics.ssim(a[0], b[0]) == pytest.approx(ssim_reference(a[:1], b[:1]), rel=1e-10)  # one (H, W, 3)


def test_frechet_distance_equals_a_reference_written_another_way():
    rng = np.random.default_rng(3)
    f1, f2 = rng.normal(size=(200, 6)), rng.normal(0.3, 1.5, size=(150, 6)) @ rng.normal(size=(6, 6))
    mu = f1.mean(0) - f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    cross = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(0)).sum()
    want = mu @ mu + np.trace(s1) + np.trace(s2) - 2 * cross
    assert metrics.frechet(f1, f2) == pytest.approx(want, rel=1e-9)
    assert metrics.frechet(f1, f1) == pytest.approx(0, abs=1e-9)
    shifted = f1 + np.array([1.0, 0, 0, 0, 0, 2.0])  # a shift alone: |shift|^2
    assert metrics.frechet(f1, shifted) == pytest.approx(5.0, rel=1e-9)


def test_kid_is_zero_in_expectation_and_grows_with_a_shift():
    rng = np.random.default_rng(4)
    same = [metrics.kid(rng.normal(size=(60, 4)), rng.normal(size=(60, 4))) for _ in range(20)]
    assert abs(np.mean(same)) < 0.05 and min(same) < 0 < max(same)  # unbiased: both signs around 0
    assert metrics.kid(rng.normal(size=(60, 4)), rng.normal(2, 1, size=(60, 4))) > 1


def test_vendi_counts_identical_and_orthogonal_items_and_pairwise_distance():
    one = np.tile(np.array([[1.0, 2.0, 3.0]]), (5, 1))
    assert metrics.vendi(one) == pytest.approx(1.0)
    assert metrics.vendi(np.eye(7)) == pytest.approx(7.0)
    assert metrics.pairwise(one) == 0 and metrics.pairwise(np.eye(3)) == pytest.approx(math.sqrt(2))
    assert metrics.latent_features(torch.ones(2, 3, 8, 8)).shape == (2, 48)


def test_cmmd_is_the_gaussian_kernel_mmd_on_normalised_embeddings():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(30, 8)), rng.normal(1, 1, size=(25, 8))
    an, bn = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)

    def k(x, y):
        return np.exp(-((x[:, None] - y[None]) ** 2).sum(-1) / 200)

    kxx, kyy = k(an, an), k(bn, bn)
    want = ((kxx.sum() - 30) / (30 * 29) + (kyy.sum() - 25) / (25 * 24) - 2 * k(an, bn).mean()) * 1000
    assert metrics.cmmd(a, b) == pytest.approx(want, rel=1e-9)
    assert metrics.cmmd(a * 3, b * 0.5) == pytest.approx(want, rel=1e-9)  # the norms do not count
