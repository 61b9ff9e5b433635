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
