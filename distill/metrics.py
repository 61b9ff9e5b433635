"""Image-set metrics that need no downloaded weights (`python -m distill.evaluate` on any model).

Paired, against the reference image drawn from the same noise (images as floats in [0, 1], (N, H, W, 3)):
- `mean_abs`: mean |difference| of the pixels; `psnr`: 10 log10(1 / MSE) in dB (identical images: inf, written as
  null in JSON); `ssim`: Wang et al.'s structural similarity with an 11-tap Gaussian window (sigma 1.5), K1 0.01,
  K2 0.03, on each channel over the window positions that fit (no padding), averaged; `latent_mse` on the latents.
Between sets, on feature vectors (N, D):
- `frechet`: |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), in float64, square roots through eigh (the
  FID formula, in whatever feature space is given); with fewer samples than dimensions the covariances are rank-
  deficient and the value is biased upward: `evaluate` warns. A set of one item has no covariance: a ValueError
  (`evaluate` reports null).
- `kid`: the unbiased squared MMD with the polynomial kernel (x.y / D + 1)^3, over the whole sets (KID's estimator;
  unbiased, so it can be slightly negative, and comparable across sample sizes where FD is not).
- `cmmd`: the same unbiased MMD with CMMD's Gaussian kernel (Jayasumana et al., 2024: exp(-|x - y|^2 / 2 sigma^2),
  sigma 10, times 1000) on L2-normalised CLIP image embeddings.
Within a set (diversity across the noises of one prompt):
- `pairwise`: the mean L2 distance between distinct items; `vendi`: exp of the entropy of the eigenvalues of K / N,
  K the cosine-similarity matrix: 1 for N identical items, N for N orthogonal ones (Friedman and Dieng, 2023).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

SSIM_K1, SSIM_K2, SSIM_WINDOW, SSIM_SIGMA = 0.01, 0.03, 11, 1.5


def _as_nhwc(images) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images), dtype=torch.float64)
    return x[None] if x.ndim == 3 else x


def mean_abs(a, b) -> float:
    return float((_as_nhwc(a) - _as_nhwc(b)).abs().mean())


def psnr(a, b) -> float:
    mse = float((_as_nhwc(a) - _as_nhwc(b)).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def ssim(a, b) -> float:
    """Mean SSIM over images, channels and window positions (dynamic range 1)."""
    x, y = (_as_nhwc(t).permute(0, 3, 1, 2) for t in (a, b))  # (N, C, H, W)
    n, c, h, w = x.shape
    size = min(SSIM_WINDOW, h, w)
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-r**2 / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(c, 1, size, size)

    def blur(t):
        return F.conv2d(t, window, groups=c)

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return float(s.mean())


def mse(a, b) -> float:
    return float((torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).pow(2).mean())


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((m + m.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet(f1, f2) -> float:
    """The Fréchet distance between Gaussians fitted to two feature sets (N1, D), (N2, D)."""
    a, b = np.asarray(f1, dtype=np.float64), np.asarray(f2, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:  # one item's covariance is NaN, and eigh fails on it ("did not converge")
        raise ValueError("the Fréchet distance needs at least two items in each set")
    mu = a.mean(0) - b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root = _psd_sqrt(s1)
    cross = np.linalg.eigvalsh(root @ s2 @ root)
    value = mu @ mu + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(cross, 0, None)).sum()
    return float(max(value, 0.0))


def _mmd(a: np.ndarray, b: np.ndarray, kernel) -> float:
    kxx, kyy, kxy = kernel(a, a), kernel(b, b), kernel(a, b)
    m, n = len(a), len(b)
    if m < 2 or n < 2:
        raise ValueError("KID needs at least two items in each set")
    within = (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(within - 2 * kxy.mean())


def kid(f1, f2) -> float:
    a, b = np.asarray(f1, dtype=np.float64), np.asarray(f2, dtype=np.float64)
    d = a.shape[1]
    return _mmd(a, b, lambda x, y: (x @ y.T / d + 1) ** 3)


def cmmd(e1, e2, sigma: float = 10.0) -> float:
    a, b = (np.asarray(e, dtype=np.float64) for e in (e1, e2))
    a, b = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (a, b))

    def rbf(x, y):
        sq = (x * x).sum(1)[:, None] + (y * y).sum(1)[None] - 2 * x @ y.T
        return np.exp(-np.clip(sq, 0, None) / (2 * sigma**2))

    return 1000 * _mmd(a, b, rbf)


def pairwise(features) -> float:
    f = np.asarray(features, dtype=np.float64)
    n = len(f)
    if n < 2:
        return 0.0
    d = np.sqrt(np.clip(((f[:, None] - f[None]) ** 2).sum(-1), 0, None))
    return float(d.sum() / (n * (n - 1)))


def vendi(features) -> float:
    f = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(f, axis=1, keepdims=True)
    unit = f / np.where(norms == 0, 1, norms)
    vals = np.clip(np.linalg.eigvalsh(unit @ unit.T / len(f)), 0, None)
    vals = vals[vals > 1e-12]
    return float(np.exp(-(vals * np.log(vals)).sum()))


def latent_features(latents: torch.Tensor, side: int = 4) -> np.ndarray:
    """(N, C, h, w) latents -> (N, C * side^2): each channel average-pooled to side x side. The model's own VAE
    space, coarsened: colour, layout and coarse structure; no fine texture and no semantics."""
    pooled = F.adaptive_avg_pool2d(latents.double(), side)
    return pooled.flatten(1).numpy()
