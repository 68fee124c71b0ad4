from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import structural_similarity

from gradinv.errors import ShapeError
from gradinv.metrics import (
    ImageScores,
    align,
    label_accuracy,
    label_existence_accuracy,
    mse,
    psnr,
    score_images,
    ssim,
)
from gradinv.viz import save_curves, save_reconstruction_grid


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _smooth(b: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = _gen(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    out = torch.empty(b, c, h, w)
    for i in range(b):
        for j in range(c):
            a, f1, f2, ph = torch.rand(4, generator=g).tolist()
            out[i, j] = 0.5 + 0.4 * a * torch.sin(6 * f1 * xx + 4 * f2 * yy + 6 * ph)
    return out


def _sk_ssim(x: torch.Tensor, y: torch.Tensor) -> float:
    return structural_similarity(
        x.double().numpy(),
        y.double().numpy(),
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1,
        channel_axis=0,
    )


# --- image metrics -----------------------------------------------------------------------------------


def test_mse_and_psnr_known_value():
    x = torch.zeros(2, 3, 8, 8)
    y = torch.full((2, 3, 8, 8), 0.1)  # mse 0.01
    assert mse(x, y).shape == (2,)
    torch.testing.assert_close(mse(x, y), torch.full((2,), 0.01), rtol=1e-6, atol=0)
    torch.testing.assert_close(psnr(x, y), torch.full((2,), 20.0), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(psnr(x * 2, y * 2, data_range=2.0), torch.full((2,), 20.0), rtol=1e-6, atol=1e-5)


def test_psnr_per_sample_not_batch_mean():
    x = torch.zeros(2, 1, 4, 4)
    y = torch.stack([torch.full((1, 4, 4), 0.1), torch.full((1, 4, 4), 0.01)])
    torch.testing.assert_close(psnr(x, y), torch.tensor([20.0, 40.0]), rtol=1e-6, atol=1e-4)


def test_psnr_identical_is_large_and_finite():
    x = torch.rand(3, 3, 16, 16, generator=_gen())
    p = psnr(x, x.clone())
    assert torch.isfinite(p).all()
    assert (p > 100).all()


def test_ssim_identical_is_one():
    x = torch.rand(2, 3, 32, 32, generator=_gen())
    torch.testing.assert_close(ssim(x, x.clone()), torch.ones(2), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["random", "smooth"])
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28), (3, 11, 20)])
def test_ssim_matches_skimage(kind, shape):
    if kind == "random":
        g = _gen(1)
        x = torch.rand(3, *shape, generator=g)
        y = (x + 0.2 * torch.randn(3, *shape, generator=g)).clamp(0, 1)
    else:
        x = _smooth(3, *shape, seed=2)
        y = (x + 0.05 * torch.randn(3, *shape, generator=_gen(3))).clamp(0, 1)
    ours = ssim(x, y)
    assert ours.shape == (3,)
    for i in range(3):
        assert abs(float(ours[i]) - _sk_ssim(x[i], y[i])) < 1e-4


def test_ssim_keeps_float64_and_grad():
    x = torch.rand(1, 1, 16, 16, dtype=torch.float64, generator=_gen(), requires_grad=True)
    y = torch.rand(1, 1, 16, 16, dtype=torch.float64, generator=_gen(1))
    s = ssim(x, y)
    assert s.dtype == torch.float64
    s.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_ssim_small_images():
    x = torch.rand(2, 3, 8, 8, generator=_gen())
    y = (x + 0.3 * torch.randn(2, 3, 8, 8, generator=_gen(1))).clamp(0, 1)
    s = ssim(x, y)
    assert s.shape == (2,) and torch.isfinite(s).all()
    assert (s < 1).all() and (s > -1).all()
    torch.testing.assert_close(ssim(x, x), torch.ones(2), rtol=0, atol=1e-6)
    tiny = torch.rand(1, 1, 1, 3, generator=_gen())
    assert torch.isfinite(ssim(tiny, tiny * 0.5)).all()


def test_image_metric_shape_errors():
    with pytest.raises(ShapeError):
        psnr(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))
    with pytest.raises(ShapeError):
        ssim(torch.rand(3, 8, 8), torch.rand(3, 8, 8))


# --- alignment ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cost", ["mse", "neg_psnr"])
def test_align_recovers_permutation(cost):
    g = _gen(5)
    truth = torch.rand(8, 3, 16, 16, generator=g)
    perm = torch.randperm(8, generator=g)
    recon = (truth + 0.1 * torch.randn(8, 3, 16, 16, generator=g))[perm]
    found = align(recon, truth, cost=cost)
    assert found.dtype == torch.long and found.shape == (8,)
    # recon[j] = noisy truth[perm[j]], so truth[i] is matched by the j with perm[j] == i
    assert torch.equal(perm[found], torch.arange(8))
    torch.testing.assert_close(recon[found], truth, atol=0.6, rtol=0)


def test_align_more_recon_than_truth():
    g = _gen(6)
    truth = torch.rand(3, 1, 8, 8, generator=g)
    decoys = torch.rand(4, 1, 8, 8, generator=g)
    recon = torch.cat([decoys[:2], truth[2:3], decoys[2:], truth[0:1] + 0.01, truth[1:2]])
    found = align(recon, truth)
    assert found.tolist() == [5, 6, 2]


def test_align_shape_errors():
    with pytest.raises(ShapeError, match="at least as many"):
        align(torch.rand(2, 3, 8, 8), torch.rand(3, 3, 8, 8))
    with pytest.raises(ShapeError):
        align(torch.rand(3, 1, 8, 8), torch.rand(3, 3, 8, 8))
    with pytest.raises(ShapeError):
        align(torch.rand(3, 8, 8), torch.rand(3, 8, 8))


def test_align_nan_reconstruction_matched_last():
    truth = torch.rand(2, 1, 4, 4, generator=_gen())
    recon = torch.cat([torch.full((1, 1, 4, 4), math.nan), truth[0:1], truth[1:2]])
    assert align(recon, truth).tolist() == [1, 2]


# --- labels ------------------------------------------------------------------------------------------


def test_label_accuracy_multiset():
    assert label_accuracy([1, 1, 2], [1, 2, 2]) == pytest.approx(2 / 3)
    assert label_accuracy(torch.tensor([3, 1, 2]), np.array([1, 2, 3])) == 1.0
    assert label_accuracy([0, 0, 0, 0], [0, 1, 2, 3]) == pytest.approx(0.25)
    assert label_accuracy([], []) == 1.0


def test_label_existence_accuracy():
    assert label_existence_accuracy([1, 1, 2], [1, 2, 2]) == 1.0
    assert label_existence_accuracy([1, 3], [1, 2]) == pytest.approx(1 / 3)
    assert label_existence_accuracy([5], [1, 2]) == 0.0
    assert label_existence_accuracy(torch.tensor([0, 1, 2, 3]), [0, 1]) == pytest.approx(0.5)


# --- report ------------------------------------------------------------------------------------------


def test_score_images_is_permutation_invariant():
    g = _gen(7)
    truth = torch.rand(5, 3, 16, 16, generator=g)
    recon = truth + 0.05 * torch.randn(5, 3, 16, 16, generator=g)  # partly outside [0, 1]: clamped
    perm = torch.randperm(5, generator=g)
    plain = score_images(recon, truth)
    shuffled = score_images(recon[perm], truth)
    assert plain.order == list(range(5))
    assert isinstance(shuffled, ImageScores)
    assert shuffled.psnr == pytest.approx(plain.psnr)
    assert shuffled.ssim == pytest.approx(plain.ssim)
    assert shuffled.mse == pytest.approx(plain.mse)
    assert torch.equal(perm[torch.tensor(shuffled.order)], torch.arange(5))
    clamped = recon.clamp(0, 1)
    assert plain.psnr == pytest.approx(psnr(clamped, truth).tolist())
    d = plain.to_dict()
    assert d["mean_psnr"] == pytest.approx(sum(plain.psnr) / 5)
    assert set(d) == {"mse", "psnr", "ssim", "order", "mean_mse", "mean_psnr", "mean_ssim"}
    with pytest.raises(ShapeError):
        score_images(recon[:4], truth)
    with pytest.raises(ShapeError):
        score_images(torch.cat([recon, recon]), truth, align_batch=False)


def test_score_images_identical():
    x = torch.rand(2, 1, 12, 12, generator=_gen())
    s = score_images(x, x)
    assert math.isfinite(s.mean_psnr) and s.mean_psnr > 100
    assert s.mean_ssim == pytest.approx(1.0, abs=1e-6)
    assert s.mean_mse == 0.0


# --- figures -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3, 20])
def test_grid_written(tmp_path, batch):
    g = _gen(batch)
    truth = torch.rand(batch, 3, 32, 32, generator=g)
    recon = torch.rand(batch, 3, 32, 32, generator=g)
    path = tmp_path / "sub" / f"grid{batch}.png"
    out = save_reconstruction_grid(
        path, truth=truth, reconstruction=recon, psnr=psnr(recon, truth).tolist(), title="test"
    )
    assert out == path and path.exists()
    with Image.open(path) as im:
        w, h = im.size
    cols = min(batch, 16)
    row_pairs = -(-batch // 16)
    assert w >= cols * 32 * 3 and h >= row_pairs * 2 * 32 * 3
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temp file left behind


def test_grid_grey_without_truth(tmp_path):
    recon = torch.rand(4, 1, 28, 28, generator=_gen())
    for truth in (None, torch.rand(4, 1, 28, 28, generator=_gen(1))):
        path = tmp_path / f"grey_{truth is None}.png"
        save_reconstruction_grid(path, truth=truth, reconstruction=recon)
        with Image.open(path) as im:
            assert im.size[0] >= 4 * 28 * 3 and im.size[1] >= 28 * 3
    with pytest.raises(ShapeError):
        save_reconstruction_grid(tmp_path / "bad.png", truth=None, reconstruction=recon, psnr=[1.0])


def test_curves_written(tmp_path):
    path = tmp_path / "curves.png"
    save_curves(
        path,
        curves={"a": ([1, 10, 100], [10.0, 15.0, 20.0]), "b": ((1, 2, 3), (5.0, 6.0, 7.5))},
        xlabel="seconds",
        ylabel="PSNR (dB)",
        title="time to PSNR",
        logx=True,
    )
    with Image.open(path) as im:
        w, h = im.size
    assert w >= 300 and h >= 200
    with pytest.raises(ShapeError):
        save_curves(tmp_path / "bad.png", curves={"a": ([1, 2], [1.0])}, xlabel="x", ylabel="y")
