"""Mask colour codes for SimGen (paper §3.2, Fig. 2): classes as points in RGB space.

A segmentation mask of n classes becomes a 3-channel image in [-1, 1] so that it can be
concatenated with the RGB image and denoised by the same DDPM. The paper's choice is the
Canonical Fibonacci Lattice (CFL): n points spread almost uniformly over the unit sphere,
so any two classes are far apart and a generated colour is decoded back to its class by
cosine similarity (§3.4). The two encodings the paper ablates (Table 4, Fig. 11) sit
beside it behind `scheme`:

    "cfl"     Fibonacci lattice on the unit sphere, decoded by cosine similarity (paper)
    "gray"    one grey level per class, (v, v, v), v evenly spaced in [-1, 1]
    "random"  one random RGB colour per class (fixed seed), as in a typical colour palette

Depends on torch only, so this file can be copied into another project alone.
"""

import functools
import math

import torch

SCHEMES = ("cfl", "gray", "random")


def fibonacci_lattice(n: int) -> torch.Tensor:
    """The canonical Fibonacci lattice: n unit vectors, (n, 3) float32.

    Algorithm 1 of the SimGen paper is referred to but its pseudocode is missing from the
    text, so this is a reconstruction from the paper's description ("golden angles and the
    Fibonacci sequence", uniform points on the unit sphere) using the canonical lattice of
    Swinbank & Purser (2006) and González (2010), "Measurement of areas on a sphere using
    Fibonacci and latitude-longitude lattices", Math. Geosci. 42:49-64:

        z_i   = 1 - (2i + 1) / n          heights evenly spaced, half a step from the poles
        lon_i = 2 pi i / Phi  (mod 2 pi)  successive points turn by the golden angle
        p_i   = (sqrt(1 - z_i^2) cos lon_i, sqrt(1 - z_i^2) sin lon_i, z_i)

    for i = 0..n-1, with Phi = (1 + sqrt 5) / 2. Equal heights give equal-area bands
    (Archimedes), and the irrational golden turn keeps neighbouring bands from lining up.
    """
    if n < 1:
        raise ValueError(f"fibonacci_lattice needs n >= 1, got {n}")
    golden_ratio = (1 + math.sqrt(5)) / 2
    i = torch.arange(n, dtype=torch.float64)
    z = 1 - (2 * i + 1) / n
    lon = 2 * math.pi * i / golden_ratio
    r = torch.sqrt(1 - z * z)  # radius of the circle of latitude at height z
    # Computed in float64 so large n keeps its spacing; stored as float32 like the images.
    return torch.stack([r * torch.cos(lon), r * torch.sin(lon), z], dim=1).float()


def class_codes(n: int, scheme: str = "cfl") -> torch.Tensor:
    """The colour code of each class, (n, 3) float32 in [-1, 1]; row k is class k."""
    if scheme == "cfl":
        return fibonacci_lattice(n)
    if scheme == "gray":
        # Note: n = 1 sits at mid-grey; otherwise black (-1) to white (+1) in equal steps.
        v = torch.linspace(-1, 1, n) if n > 1 else torch.zeros(1)
        return v[:, None].repeat(1, 3)
    if scheme == "random":
        # A fixed seed, so the same class gets the same colour in training and sampling.
        g = torch.Generator().manual_seed(0)
        return torch.rand(n, 3, generator=g) * 2 - 1
    raise ValueError(f"unknown mask scheme {scheme!r}; choose one of {SCHEMES}")


@functools.lru_cache(maxsize=None)
def _class_codes_on(n: int, scheme: str, device: torch.device) -> torch.Tensor:
    # The codes made once per device: a copy to a GPU waits for the work queued there.
    return class_codes(n, scheme).to(device)


def encode(mask: torch.Tensor, n: int, scheme: str = "cfl", check: bool = True) -> torch.Tensor:
    """Class ids (..., H, W) -> colour-coded mask (..., 3, H, W) in [-1, 1], float32.

    check=False skips the range check of the ids, for masks already checked: it reads the
    mask's min and max, which on a GPU waits for the work queued there.
    """
    mask = mask.long()
    if check and mask.numel() and (mask.min() < 0 or mask.max() >= n):
        raise ValueError(f"mask holds class ids outside 0..{n - 1}")
    return _class_codes_on(n, scheme, mask.device)[mask].movedim(-1, -3)  # (..., 3, H, W)


def decode(x: torch.Tensor, n: int, scheme: str = "cfl") -> torch.Tensor:
    """Colour-coded mask (..., 3, H, W) -> class ids (..., H, W), long.

    cfl: the class whose lattice point has the highest cosine similarity with the pixel
    (paper §3.4). Because every lattice point has unit norm, a pixel p_k + e still decodes
    to k whenever |e| is below half the smallest chord between two points.

    gray, random: the nearest code in Euclidean distance.
    # Deviation: the paper decodes every scheme by cosine similarity, which cannot separate
    # grey codes (v, v, v): they all point along one line, so only the sign of v survives and
    # "all pixels map to a single class" (§5.3, Fig. 11). Nearest-code decoding removes that
    # collapse and gives the ablated encodings their best chance, so that the comparison
    # measures the encoding alone.
    """
    codes = class_codes(n, scheme).to(device=x.device, dtype=x.dtype)
    if scheme == "cfl":
        # cosine similarity = dot product of unit vectors
        x_unit = torch.nn.functional.normalize(x, dim=-3)
        score = torch.einsum("...chw,kc->...khw", x_unit, codes)  # (..., n, H, W)
    else:
        # -|x - c|^2 up to the term |x|^2, which is the same for every class.
        score = (
            2 * torch.einsum("...chw,kc->...khw", x, codes) - (codes * codes).sum(1)[:, None, None]
        )
    return score.argmax(dim=-3)


def min_distance(n: int, scheme: str = "cfl") -> float:
    """The smallest Euclidean distance between two of the n class codes (inf for n = 1)."""
    codes = class_codes(n, scheme).double()
    return torch.cdist(codes, codes).fill_diagonal_(float("inf")).min().item()


def ambiguous(x: torch.Tensor, n: int, scheme: str = "cfl") -> torch.Tensor:
    """Pixels of a code image (..., 3, H, W) farther than half the smallest code distance from
    every code: no code is clearly the nearest, so decoding them is a guess. -> bool (..., H, W)."""
    codes = class_codes(n, scheme).to(device=x.device, dtype=torch.float32)
    d2 = (x.float().movedim(-3, -1)[..., None, :] - codes).square().sum(-1)  # (..., H, W, n)
    return d2.min(-1).values.sqrt() > min_distance(n, scheme) / 2


def colorize(mask: torch.Tensor, n: int, scheme: str = "cfl") -> torch.Tensor:
    """Class ids (..., H, W) -> uint8 RGB picture (..., H, W, 3) in the scheme's colours."""
    # [-1, 1] -> 0..255 as data.to_uint8 maps images; written out so that cfl.py stands alone
    rgb = ((class_codes(n, scheme) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return rgb.to(mask.device)[mask.long()]


def decode_colours(x: torch.Tensor, n: int, scheme: str = "cfl") -> torch.Tensor:
    """A code image (..., 3, H, W) -> the colours of the classes it decodes to (..., H, W, 3)."""
    return colorize(decode(x, n, scheme), n, scheme)
