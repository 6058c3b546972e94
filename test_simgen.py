"""SimGen tests: known answers and oracles, fast on a 2-core CPU.

Run: python -m pytest -q test_simgen.py
"""
import math

import pytest
import torch

import cfl


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
