"""SimGen: one DDPM that generates a surgical image and its segmentation mask together.

Reference implementation of Bhat, Bose, Nwoye, Padoy, "SimGen: A Diffusion-Based Framework
for Simultaneous Surgical Image and Segmentation Mask Generation" (2024). The mask's classes
are coloured by the Canonical Fibonacci Lattice (cfl.py, §3.2), concatenated with the image
into 6 channels, and denoised by a residual U-Net (§3.3) over T = 250 DDPM steps (§3.4);
generated masks are decoded back to classes by cosine similarity.

Commands:
    python simgen.py train [DATA] [--out DIR] [--preset tiny|demo|paper] [--steps N] [--<field> V ...]
    python simgen.py sample CKPT [--out DIR] [--n N] [--ddim-steps K] [--seed S] [--batch-size B] [--force]
DATA is a dataset folder (data.py) or "synthetic"; no DATA trains the demo on the synthetic set.
Multi-GPU: torchrun --nproc_per_node=N simgen.py train DATA ...
"""
import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import cfl
import data

VERSION = 1  # checkpoint format


# ----------------------------------------------------------------------------- config

@dataclass
class Config:
    # model (§3.3; sizes from §4.2)
    image_size: int = 256  # pixels per side of image and mask
    base_channels: int = 64  # feature maps at full resolution
    channel_mults: tuple = (1, 2, 4, 8)  # width of each level, in base_channels
    # diffusion (§3.4)
    timesteps: int = 250  # T, forward-process steps
    schedule: str = "linear"  # beta schedule: linear (DDPM, scaled to T) | cosine (Nichol & Dhariwal)
    mask_scheme: str = "cfl"  # mask colour code (cfl.SCHEMES): cfl (§3.2) | gray | random (§5.3 ablation)
    # training (§4.2)
    steps: int = 200_000  # optimizer steps; Note: the paper gives 5 V100-days, not a step count
    batch_size: int = 16  # global batch, split over DDP ranks
    lr: float = 1e-4  # Adam learning rate
    ema_decay: float = 0.9999  # EMA of the weights, used for sampling
    grad_clip: float = 1.0  # max global gradient norm
    seed: int = 0  # weights init, batches, noise: every step's randomness is a function of (seed, step)
    amp: bool = True  # bf16 autocast (CUDA only)
    compile: bool = True  # torch.compile (CUDA only)
    channels_last: bool = True  # NHWC memory format (CUDA only)
    # io
    data: str = "synthetic"  # dataset folder or "synthetic"
    log_seconds: float = 5.0  # seconds between progress lines
    ckpt_every: int = 5000  # steps between checkpoints and sample grids
    sample_n: int = 16  # pairs in each sample grid
    sample_ddim_steps: int = 0  # 0: DDPM with T steps (the paper); K > 0: DDIM with K steps

    def __post_init__(self):
        self.channel_mults = tuple(int(m) for m in self.channel_mults)
        if self.schedule not in ("linear", "cosine"):
            raise ValueError(f"--schedule {self.schedule}: use linear or cosine")
        if self.mask_scheme not in cfl.SCHEMES:
            raise ValueError(f"--mask-scheme {self.mask_scheme}: use one of {', '.join(cfl.SCHEMES)}")
        if self.schedule == "linear" and self.timesteps <= 20:  # beta_T = 0.02 * 1000 / T must stay below 1
            raise ValueError(f"--timesteps {self.timesteps}: the linear schedule needs T > 20")
        if self.image_size % 2 ** len(self.channel_mults):  # one downsampler per level
            raise ValueError(f"--image-size {self.image_size}: must be divisible by 2^{len(self.channel_mults)}")


PRESETS = {
    "paper": {},  # §4.2: 256 x 256, 64 channels, (1, 2, 4, 8), T = 250, batch 16, Adam 1e-4
    # README main job: under 5 minutes on a 2-core CPU, sampling with the paper's 250 DDPM steps included.
    # Deviation: 32 x 32, 16 channels, 3 levels, 1000 steps at lr 2e-3 with a short EMA, to fit that budget.
    "demo": dict(image_size=32, base_channels=16, channel_mults=(1, 2, 4), steps=1000, batch_size=32, lr=2e-3,
                 ema_decay=0.995, ckpt_every=1000, sample_n=16),
    # tests: seconds
    "tiny": dict(image_size=16, base_channels=8, channel_mults=(1, 2), timesteps=50, steps=20, batch_size=4,
                 lr=1e-3, ema_decay=0.9, ckpt_every=10, sample_n=4),
}
RESUMABLE = {"steps", "amp", "compile", "channels_last", "log_seconds", "ckpt_every", "sample_n", "sample_ddim_steps"}


# ----------------------------------------------------------------------------- the residual U-Net (§3.3, Fig. 3)

def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of the timesteps (Transformer positions, as in DDPM): (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def norm(c):
    # Note: at most 32 groups as in DDPM's U-Net, and at least 4 channels in each: a group of one
    # channel is InstanceNorm, which erases each image's mean colour, so narrow nets drift in colour.
    return nn.GroupNorm(math.gcd(32, c // 4), c)


class ConvBlock(nn.Module):
    """GroupNorm -> Conv2d 3x3 -> GELU (§3.3), plus the timestep and a residual shortcut."""

    def __init__(self, c_in, c_out, t_dim):
        super().__init__()
        self.norm, self.conv = norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        # Note: the paper adds the time embedding "to the feature map"; like DDPM's U-Net we add
        # a learned projection of it in every block, before the activation.
        self.time = nn.Linear(t_dim, c_out) if t_dim else None
        # Note: a residual unit (ResUNet, Zhang et al. 2018); a 1x1 conv where widths differ.
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, temb):
        h = self.conv(self.norm(x))  # (B, c_out, H, W)
        if self.time is not None:
            h = h + self.time(temb)[:, :, None, None]
        return F.gelu(h) + self.skip(x)


class ResUNet(nn.Module):
    """The denoiser eps_theta(x_t, t) of §3.3: 62.7M parameters at the paper's config.

    :param cfg: Config; base_channels * channel_mults give each level's width
    :param in_channels, out_channels: 6 and 6 for SimGen (image + CFL mask in, eps out)
    :param time_embedding: False builds the same net without t, e.g. as a segmentation network
    forward(x (B, in, H, W), t (B,) long in {0..T-1} or None) -> (B, out, H, W)
    """

    def __init__(self, cfg, in_channels=6, out_channels=6, time_embedding=True):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mults]
        # Note: the bottleneck is twice the last level: the downsampler doubles channels at every level.
        below = widths[1:] + [2 * widths[-1]]
        self.base, t_dim = widths[0], 4 * widths[0] if time_embedding else 0  # Note: DDPM's 4x width for t
        self.time_mlp = nn.Sequential(nn.Linear(self.base, t_dim), nn.GELU(), nn.Linear(t_dim, t_dim)) if t_dim else None
        self.init = nn.Conv2d(in_channels, self.base, 3, padding=1)
        self.enc = nn.ModuleList(nn.ModuleList([ConvBlock(c, c, t_dim), ConvBlock(c, c, t_dim)]) for c in widths)
        # Note: 4x4 stride-2 convolutions down and transposed convolutions up (DCGAN-style, no overlap artefacts).
        self.down = nn.ModuleList(nn.Conv2d(c, b, 4, stride=2, padding=1) for c, b in zip(widths, below))
        self.mid = nn.ModuleList([ConvBlock(below[-1], below[-1], t_dim), ConvBlock(below[-1], below[-1], t_dim)])
        self.up = nn.ModuleList(nn.ConvTranspose2d(b, c, 4, stride=2, padding=1) for c, b in zip(widths, below))
        # Note: both ConvBlock outputs of a level are concatenated with the upsampled features in the
        # first decoder block of that level (and the initial conv's at full resolution, as §3.3 says).
        self.dec = nn.ModuleList(
            nn.ModuleList([ConvBlock(3 * c + (self.base if i == 0 else 0), c, t_dim), ConvBlock(c, c, t_dim)])
            for i, c in enumerate(widths))
        self.out = nn.Sequential(norm(self.base), nn.GELU(), nn.Conv2d(self.base, out_channels, 3, padding=1))
        # Note: the last conv starts at zero (improved-diffusion): eps_theta = 0 at first, loss 1.
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x, t=None):
        temb = self.time_mlp(timestep_embedding(t, self.base)) if self.time_mlp is not None else None
        h = self.init(x)  # (B, C, H, W)
        skips = [[h]]
        for (block1, block2), down in zip(self.enc, self.down):
            h1 = block1(h, temb)
            h2 = block2(h1, temb)
            skips.append([h1, h2])
            h = down(h2)  # (B, 2C, H/2, W/2)
        for block in self.mid:
            h = block(h, temb)
        for i in reversed(range(len(self.dec))):
            h = self.up[i](h)  # (B, C, 2H, 2W)
            extra = skips[0] if i == 0 else []  # the initial conv's features at full resolution
            h = self.dec[i][0](torch.cat([h, *skips[i + 1], *extra], 1), temb)  # (B, 3C (+C), H, W) -> (B, C, H, W)
            h = self.dec[i][1](h, temb)
        return self.out(h)


# ----------------------------------------------------------------------------- diffusion (DDPM, Ho et al. 2020)

def get_named_beta_schedule(name, T):
    """beta_1..beta_T as float64 numpy (T,)."""
    if name == "linear":
        # DDPM's 1e-4..0.02 for T = 1000, scaled so that T = 250 still ends near pure noise.
        scale = 1000 / T
        return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)
    # Improved DDPM (Nichol & Dhariwal 2021) Eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2)
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)], dtype=np.float64)


class GaussianDiffusion:
    """The DDPM forward and reverse processes, named as in improved-diffusion.

    Timesteps: code t in {0..T-1} is the paper's t in {1..T}; t = 0 is the last denoising step.
    Schedules are computed in float64 and stored as float32 tensors (T,) indexed by t.
    The model is passed to each method: model(x_t (B, C, H, W), t (B,)) -> eps (B, C, H, W).
    """

    def __init__(self, T=250, schedule="linear"):
        self.num_timesteps = T
        betas = get_named_beta_schedule(schedule, T)
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)  # alpha_bar_t
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])  # alpha_bar_{t-1}, alpha_bar_0 = 1
        buffers = dict(
            betas=betas, alphas_cumprod=alphas_cumprod, alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),  # DDPM Eq. 4: mean of q(x_t | x_0)
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),  # DDPM Eq. 4: its std
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1),
            # DDPM Eq. 7: beta~_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t
            posterior_variance=betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            # DDPM Eq. 7: mu~_t = coef1 x_0 + coef2 x_t
            posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        )
        # beta~ is 0 at the last step (paper t = 1): the log is clipped to its value at t = 1 instead.
        pv = buffers["posterior_variance"]
        buffers["posterior_log_variance_clipped"] = np.log(np.append(pv[1], pv[1:]))
        for name, value in buffers.items():
            setattr(self, name, torch.tensor(value, dtype=torch.float32))

    def _extract(self, arr, t, x):
        """arr[t] shaped (B, 1, 1, 1) to broadcast against x (B, C, H, W)."""
        return arr.to(t.device)[t].view(-1, *([1] * (x.ndim - 1)))

    def q_sample(self, x_start, t, noise):
        """x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I): DDPM Eq. 4."""
        return (self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0): DDPM Eq. 6-7."""
        mean = (self._extract(self.posterior_mean_coef1, t, x_t) * x_start
                + self._extract(self.posterior_mean_coef2, t, x_t) * x_t)
        return (mean, self._extract(self.posterior_variance, t, x_t),
                self._extract(self.posterior_log_variance_clipped, t, x_t))

    def _predict_xstart_from_eps(self, x_t, t, eps):
        # DDPM Eq. 4 solved for x_0: x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        # The same equation solved for eps: the noise implied by a (clipped) x_0 prediction
        return ((self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart)
                / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t))

    def p_mean_variance(self, model, x, t, clip_denoised=True):
        """p_theta(x_{t-1} | x_t) with the fixed variance beta~_t (improved-diffusion's "fixed small").

        The mean is DDPM Eq. 7 at the predicted x_0; unclipped, that equals DDPM Eq. 11,
        mu_theta = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta) / sqrt(alpha_t).
        Clipping x_0 to [-1, 1], the range of images and CFL codes, keeps samples in range.
        :return: dict mean, variance, log_variance, pred_xstart, each (B, C, H, W) or broadcastable
        """
        eps = model(x, t).float()
        pred_xstart = self._predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, variance, log_variance = self.q_posterior_mean_variance(pred_xstart, x, t)
        return dict(mean=mean, variance=variance, log_variance=log_variance, pred_xstart=pred_xstart)

    def p_sample(self, model, x, t, generator=None):
        """One ancestral step x_t -> x_{t-1}: DDPM Algorithm 2, lines 3-4."""
        out = self.p_mean_variance(model, x, t)
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))  # line 3: z = 0 at paper t = 1
        return dict(sample=out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise,
                    pred_xstart=out["pred_xstart"])

    @torch.no_grad()
    def p_sample_loop(self, model, shape, generator=None, device=None):
        """DDPM Algorithm 2: x_T ~ N(0, I), then T ancestral steps. -> x_0 (shape) in [-1, 1]."""
        x = torch.randn(shape, generator=generator, device=device)
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((shape[0],), i, dtype=torch.long, device=x.device)
            x = self.p_sample(model, x, t, generator)["sample"]
        return x

    def training_losses(self, model, x_start, t, noise=None):
        """DDPM Algorithm 1 / Eq. 14: ||eps - eps_theta(x_t, t)||^2, mean over all 6 channels (§3.4).

        :param x_start: (B, C, H, W) in [-1, 1]; t: (B,) long; noise: (B, C, H, W) or None
        :return: dict loss: (B,) per-sample loss
        """
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        mse = (noise - model(x_t, t).float()).square().mean(dim=tuple(range(1, x_start.ndim)))
        return dict(loss=mse)

    def ddim_sample(self, model, x, t, t_prev, eta=0.0, generator=None):
        """One DDIM step (Song et al. 2021, Eq. 12) from t to t_prev < t; t_prev = -1 gives x_0."""
        out = self.p_mean_variance(model, x, t)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])  # consistent with the clipped x_0
        a_t = self._extract(self.alphas_cumprod, t, x)
        a_prev = self._extract(self.alphas_cumprod, t_prev.clamp(min=0), x).where(t_prev.view_as(a_t) >= 0, 1.0)
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()  # DDIM Eq. 16
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        return out["pred_xstart"] * a_prev.sqrt() + (1 - a_prev - sigma ** 2).sqrt() * eps + sigma * noise

    @torch.no_grad()
    def ddim_sample_loop(self, model, shape, steps=50, eta=0.0, generator=None, device=None):
        """DDIM sampling on `steps` evenly spaced timesteps: x_T ~ N(0, I) -> x_0.

        Deviation: an extension, not in the paper (which samples with DDPM); with steps = T and
        eta = 1 it is DDPM Algorithm 2 again. eta = 0 is deterministic given x_T.
        """
        x = torch.randn(shape, generator=generator, device=device)
        ts = np.unique(np.linspace(0, self.num_timesteps - 1, steps).round().astype(np.int64))[::-1].tolist()
        for i, i_prev in zip(ts, ts[1:] + [-1]):
            t, t_prev = (torch.full((shape[0],), v, dtype=torch.long, device=x.device) for v in (i, i_prev))
            x = self.ddim_sample(model, x, t, t_prev, eta, generator)
        return x


# ----------------------------------------------------------------------------- helpers for train and sample

def make_generator(device, *key):
    """A torch.Generator on device seeded from non-negative integers: resumable randomness.

    Keys used: (0, seed, step) a step's global batch; (1, seed, step, rank) a rank's flips, t and
    noise; (2, seed, k) the k-th batch of samples (k = 0 for the grids made during training).
    """
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0]
    return torch.Generator(device).manual_seed(int(state))


def autocast(cfg, device):
    # bf16 autocast on CUDA when cfg.amp; a no-op context on the CPU
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.amp)


@torch.no_grad()
def generate(model, diffusion, cfg, num_classes, n, generator, device, ddim_steps=0):
    """Sample n pairs -> images uint8 (n, 3, S, S), masks long (n, S, S) class ids, on the CPU."""
    shape = (n, 6, cfg.image_size, cfg.image_size)
    with autocast(cfg, device):
        if ddim_steps:
            x = diffusion.ddim_sample_loop(model, shape, ddim_steps, generator=generator, device=device)
        else:
            x = diffusion.p_sample_loop(model, shape, generator=generator, device=device)
    image = ((x[:, :3] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    mask = cfl.decode(x[:, 3:], num_classes, cfg.mask_scheme)  # cosine similarity to the lattice (§3.4)
    return image.cpu(), mask.cpu()


def grid(images, masks, num_classes, scheme):
    """A picture of pairs, each as image | coloured mask | overlay -> uint8 (H, W, 3) numpy."""
    images = images.permute(0, 2, 3, 1)  # (B, S, S, 3)
    colours = cfl.colorize(masks, num_classes, scheme)
    overlay = ((images.float() + colours.float()) / 2).round().to(torch.uint8)
    triplets = torch.cat([images, colours, overlay], 2)  # (B, S, 3S, 3)
    b, s, w = triplets.shape[:3]
    cols = math.ceil(math.sqrt(b))  # a near-square layout of triplets, white 2-pixel gaps
    rows, pad = math.ceil(b / cols), 2
    canvas = torch.full((rows * (s + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=torch.uint8)
    for k in range(b):
        y, x = pad + k // cols * (s + pad), pad + k % cols * (w + pad)
        canvas[y:y + s, x:x + w] = triplets[k]
    zoom = max(1, 128 // s)  # small samples are enlarged (nearest) to be seen
    return canvas.repeat_interleave(zoom, 0).repeat_interleave(zoom, 1).numpy()


def connected_boxes(mask):
    """Bounding boxes of the 4-connected regions of each class: the paper's "coordinate extraction".

    :param mask: (H, W) class ids, tensor or numpy
    :return: {class id: [[x0, y0, x1, y1], ...]}, inclusive pixel coordinates, regions in raster order
    """
    m = mask.cpu().numpy() if torch.is_tensor(mask) else np.asarray(mask)
    h, w = m.shape
    label = np.arange(h * w).reshape(h, w)  # each pixel starts as its own region, named by its index
    same_v, same_h = m[1:] == m[:-1], m[:, 1:] == m[:, :-1]
    while True:
        # Each pixel takes the smallest label among itself and its same-class 4-neighbours ...
        new = label.copy()
        np.minimum(new[1:], np.where(same_v, label[:-1], new[1:]), out=new[1:])
        np.minimum(new[:-1], np.where(same_v, label[1:], new[:-1]), out=new[:-1])
        np.minimum(new[:, 1:], np.where(same_h, label[:, :-1], new[:, 1:]), out=new[:, 1:])
        np.minimum(new[:, :-1], np.where(same_h, label[:, 1:], new[:, :-1]), out=new[:, :-1])
        new = new.ravel()[new]  # ... then jumps to its label's label, which halves long chains
        if np.array_equal(new, label):
            break
        label = new
    roots, inverse = np.unique(label.ravel(), return_inverse=True)  # root = the region's first pixel
    ys, xs = np.divmod(np.arange(h * w), w)
    box = np.tile(np.array([w, h, -1, -1]), (len(roots), 1))  # min x, min y, max x, max y per region
    for col, (reduce, coord) in enumerate([(np.minimum, xs), (np.minimum, ys), (np.maximum, xs), (np.maximum, ys)]):
        reduce.at(box[:, col], inverse, coord)
    out = {}
    for root, b in zip(roots, box.tolist()):
        out.setdefault(int(m.flat[root]), []).append(b)
    return dict(sorted(out.items()))


def load_checkpoint(path, device="cpu"):
    """A SimGen checkpoint as a dict, or a one-line DataError."""
    path = Path(path)
    if not path.is_file():
        raise data.DataError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated, foreign or pickled-code files alike
        raise data.DataError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("version") != VERSION or not {"model", "ema", "config"} <= set(ckpt):
        raise data.DataError(f"{path}: not a SimGen checkpoint of version {VERSION}")
    return ckpt


def save_checkpoint(path, state):
    """torch.save to a temporary file, then rename: a crash never leaves half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- train

def setup_distributed():
    """(rank, world size, device): DDP under torchrun (nccl on CUDA, gloo on CPU), else one process."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world, device


def train(cfg, out, explicit=()):
    """Train SimGen on cfg.data; resume from out/ckpt.pt when it exists. -> path of the checkpoint.

    :param explicit: names of the fields the user set; on resume they must agree with the
        checkpoint's config, except the RESUMABLE ones, which override it.
    """
    rank, world, device = setup_distributed()
    out, log = Path(out), (print if rank == 0 else lambda *a, **k: None)
    ckpt_path, ckpt = out / "ckpt.pt", None
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, device)
        saved = Config(**ckpt["config"])
        for name in sorted(set(explicit) - RESUMABLE):
            if getattr(cfg, name) != getattr(saved, name):
                raise data.DataError(f"{ckpt_path}: trained with {name}={getattr(saved, name)}, not "
                                     f"{getattr(cfg, name)}; choose another --out to start a new run")
        cfg = replace(saved, **{n: getattr(cfg, n) for n in set(explicit) & RESUMABLE})
        log(f"resuming {ckpt_path} at step {ckpt['step']}")
    if cfg.batch_size % world:
        raise data.DataError(f"--batch-size {cfg.batch_size}: not divisible by {world} processes")
    ds = data.PairedFolder(cfg.data, cfg.image_size, "train")
    if ckpt is not None and ckpt["classes"] != ds.classes:
        raise data.DataError(f"{cfg.data}: its classes differ from those {ckpt_path} was trained on")
    log("config " + " ".join(f"{k}={v}" for k, v in asdict(cfg).items()))

    torch.manual_seed(cfg.seed)
    raw = ResUNet(cfg).to(device)  # the plain module: its state dict is what checkpoints hold
    ema = copy.deepcopy(raw).requires_grad_(False).eval()
    opt = torch.optim.Adam(raw.parameters(), lr=cfg.lr)
    start = 0
    if ckpt is not None:
        raw.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        start = ckpt["step"]
    diffusion = GaussianDiffusion(cfg.timesteps, cfg.schedule)
    cuda = device.type == "cuda"
    channels_last = cuda and cfg.channels_last  # amp, compile and channels_last are CUDA-only: a CPU runs fp32 eager
    speedups = [k for k, on in (("bf16", cfg.amp), ("compile", cfg.compile), ("channels_last", cfg.channels_last)) if on]
    log(f"{sum(p.numel() for p in raw.parameters()) / 1e6:.1f}M parameters; {world} x {device.type}, "
        f"{', '.join(speedups) if cuda and speedups else 'fp32 eager'}")
    model = raw.to(memory_format=torch.channels_last) if channels_last else raw
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    if cuda and cfg.compile:
        model = torch.compile(model)
    # The uint8 dataset lives on the device; batches are gathered and flipped there (no DataLoader).
    images, masks = ds.images.to(device), ds.masks.to(device)
    b, n_cls = cfg.batch_size // world, ds.num_classes
    out.mkdir(parents=True, exist_ok=True)
    csv = out / "log.csv"  # one row per progress line, appended across resumes
    if rank == 0 and not csv.exists():
        csv.write_text("step,loss,images_per_s,seconds\n")

    def save(step):
        """Checkpoint and sample grid, rank 0 only; the grid's noise is the same every time."""
        state = dict(model=raw.state_dict(), ema=ema.state_dict(), optimizer=opt.state_dict(), step=step,
                     config=asdict(cfg), classes=ds.classes, version=VERSION)
        save_checkpoint(ckpt_path, state)
        pairs = generate(ema, diffusion, cfg, n_cls, cfg.sample_n, make_generator(device, 2, cfg.seed, 0),
                         device, cfg.sample_ddim_steps)
        Image.fromarray(grid(*pairs, n_cls, cfg.mask_scheme)).save(out / f"grid_{step:07d}.png")
        return pairs

    t0 = last = time.time()
    loss_sum, n_loss, last_step, saved, pairs = torch.zeros((), device=device), 0, start, start, None
    raw.train()
    for step in range(start, cfg.steps):
        # Every random draw of this step comes from (seed, step): a resumed run repeats it exactly.
        g = make_generator(device, 0, cfg.seed, step)
        idx = torch.randint(len(images), (cfg.batch_size,), generator=g, device=device)  # global batch
        g = make_generator(device, 1, cfg.seed, step, rank)  # this rank's shard, flips, t and noise
        image, mask = data.flip(images[idx[rank * b:(rank + 1) * b]], masks[idx[rank * b:(rank + 1) * b]], g)
        image = image.float() / 127.5 - 1
        mask_rgb = cfl.encode(mask.long(), n_cls, cfg.mask_scheme)  # SimGen §3.2: classes -> points on the sphere
        x = torch.cat([image, mask_rgb], 1)  # (B, 3+3, H, W) in [-1, 1]
        t = torch.randint(cfg.timesteps, (b,), generator=g, device=device)  # Algorithm 1 line 3
        noise = torch.randn(x.shape, generator=g, device=device)  # Algorithm 1 line 4
        if channels_last:
            x, noise = (v.contiguous(memory_format=torch.channels_last) for v in (x, noise))
        with autocast(cfg, device):
            loss = diffusion.training_losses(model, x, t, noise)["loss"].mean()
        loss.backward()  # Algorithm 1 line 5; DDP averages the gradients over the ranks
        nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # EMA with warmup, so early samples are not dominated by the random init
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), raw.parameters()):
                pe.lerp_(p, 1 - decay)
        loss_sum += loss.detach()
        n_loss += 1

        done = step + 1
        checkpoint = done % cfg.ckpt_every == 0 or done == cfg.steps
        if checkpoint or time.time() - last >= cfg.log_seconds:
            mean = (loss_sum / n_loss).item()  # the only host sync: every few seconds
            if not math.isfinite(mean):
                kept = f"{ckpt_path} (step {saved}) is kept" if saved else "no checkpoint was written"
                raise FloatingPointError(f"{out}: loss is {mean} near step {done}; stopped, {kept}")
            now = time.time()
            rate = (done - last_step) * cfg.batch_size / (now - last)
            eta = (cfg.steps - done) * cfg.batch_size / max(rate, 1e-9)
            log(f"step {done}/{cfg.steps}  loss {mean:.4f}  {rate:.1f} img/s  eta {eta / 60:.1f} min", flush=True)
            if rank == 0:
                with open(csv, "a") as f:
                    f.write(f"{done},{mean:.6f},{rate:.2f},{now - t0:.1f}\n")
            loss_sum.zero_()
            n_loss, last, last_step = 0, now, done
        if checkpoint and rank == 0:
            pairs, saved = save(done), done
    if rank == 0:
        pairs = pairs if pairs is not None else save(start)  # nothing left to train: sample once more
        log(f"{ckpt_path}: step {max(start, cfg.steps)}, {time.time() - t0:.0f}s; grids in {out}")
        if cfg.data == "synthetic":  # SYNTHETIC_RGB tells each pixel's class from the image alone
            fake_images, fake_masks = pairs
            aligned = data.alignment_score(fake_images, fake_masks)
            shuffled = data.alignment_score(fake_images, fake_masks.roll(1, 0))
            real = data.alignment_score(ds.images[:len(fake_images)], ds.masks[:len(fake_images)])
            log(f"alignment of generated pairs {aligned:.3f}  (same images, shuffled masks {shuffled:.3f}; real pairs {real:.3f})")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return ckpt_path


# ----------------------------------------------------------------------------- sample

def sample(ckpt_path, out, n=16, ddim_steps=0, seed=0, batch_size=16, force=False):
    """Generate n pairs with the EMA weights and write them as a dataset folder.

    out/images/*.png, out/masks/*.png in the dataset's own mask values, out/classes.json, so that
    data.PairedFolder(out) reads them back with the same class ids; plus out/masks_color/*.png,
    out/grid.png and out/boxes.json ({stem: {class name: [[x0, y0, x1, y1], ...]}}).
    """
    out = Path(out)
    if n < 1 or batch_size < 1:
        raise ValueError(f"--n {n}, --batch-size {batch_size}: both must be at least 1")
    if out.exists() and any(out.iterdir()) and not force:
        raise data.DataError(f"{out}: not empty; pass --force to overwrite it")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = load_checkpoint(ckpt_path, device)
    # The checkpoint carries the config and the classes: no flags to re-type, no size mismatch.
    cfg, classes = Config(**ckpt["config"]), ckpt["classes"]
    model = ResUNet(cfg).to(device).eval()
    model.load_state_dict(ckpt["ema"])
    diffusion = GaussianDiffusion(cfg.timesteps, cfg.schedule)
    for sub in ("images", "masks", "masks_color"):
        (out / sub).mkdir(parents=True, exist_ok=True)
        for old in (out / sub).glob("*.png"):  # --force: no stale pairs from an earlier, larger run
            old.unlink()
    names = [c["name"] for c in classes]
    boxes, start = {}, time.time()
    for k, first in enumerate(range(0, n, batch_size)):
        g = make_generator(device, 2, seed, k)  # same seed and batch size, same pairs
        images, masks = generate(model, diffusion, cfg, len(classes), min(batch_size, n - first), g, device, ddim_steps)
        colours = cfl.colorize(masks, len(classes), cfg.mask_scheme)
        for i in range(len(images)):
            stem = f"{first + i:05d}"
            Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(out / "images" / f"{stem}.png")
            # class ids -> the dataset's own grey levels or colours, lossless, so masks/ drops into a pipeline
            Image.fromarray(data.mask_to_values(masks[i], classes)).save(out / "masks" / f"{stem}.png")
            Image.fromarray(colours[i].numpy()).save(out / "masks_color" / f"{stem}.png")
            boxes[stem] = {names[c]: b for c, b in connected_boxes(masks[i]).items()}
        if k == 0:  # the overview: up to 16 pairs of the first batch
            Image.fromarray(grid(images[:16], masks[:16], len(classes), cfg.mask_scheme)).save(out / "grid.png")
        print(f"{first + len(images)}/{n} pairs, {time.time() - start:.0f}s", flush=True)
    (out / "boxes.json").write_text(json.dumps(boxes))
    # Names every class, present or not, so PairedFolder(out) keeps the training ids (data.py layout).
    (out / "classes.json").write_text(json.dumps({c["name"]: c["value"] for c in classes}))
    print(f"{out}: {n} pairs (images/, masks/, masks_color/, grid.png, boxes.json)")
    return out


# ----------------------------------------------------------------------------- command line

def build_parser():
    """The train and sample commands; train gets one flag per Config field."""
    parser = argparse.ArgumentParser(prog="simgen.py", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("train", help="train on a dataset folder or 'synthetic'")
    p.add_argument("data", nargs="?", help="dataset folder or 'synthetic' (default: synthetic with --preset demo)")
    p.add_argument("--out", help="run folder (default runs/<data>-<preset>); rerun to resume")
    p.add_argument("--preset", choices=PRESETS, help="tiny (tests), demo (CPU, minutes), paper (default)")
    for f in fields(Config):  # every field is a flag: --image-size 64, --channel-mults 1,2,4, --no-amp
        if f.name == "data":
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif isinstance(f.default, tuple):
            p.add_argument(flag, type=lambda s: tuple(int(v) for v in s.split(",")), help=f"default {f.default}")
        else:
            p.add_argument(flag, type=type(f.default), help=f"default {f.default}")
    s = commands.add_parser("sample", help="generate image-mask pairs from a checkpoint")
    s.add_argument("ckpt")
    s.add_argument("--out", help="output folder (default samples/<run folder name>)")
    s.add_argument("--n", type=int, default=16, help="number of pairs")
    s.add_argument("--ddim-steps", type=int, default=0, help="0: DDPM with T steps (the paper); K: DDIM, K steps")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--force", action="store_true", help="overwrite a non-empty output folder")
    return parser


def train_config(args):
    """Parsed train arguments -> (Config, names of the fields set by preset or flag, run folder)."""
    preset = args.preset or ("demo" if args.data is None else "paper")
    if args.data is None and args.preset is None:
        print("no DATA given: training on the built-in synthetic dataset with --preset demo")
    chosen = dict(PRESETS[preset])  # the paper preset is the defaults: nothing chosen
    chosen.update({f.name: getattr(args, f.name) for f in fields(Config)
                   if f.name != "data" and getattr(args, f.name) is not None})
    chosen["data"] = args.data or "synthetic"
    cfg = replace(Config(), **chosen)
    return cfg, set(chosen), Path(args.out or Path("runs") / f"{Path(cfg.data).name}-{preset}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:  # errors the user can fix are one line and exit status 1, never a traceback
        if args.command == "train":
            cfg, chosen, out = train_config(args)
            train(cfg, out, explicit=chosen)
        else:
            out = args.out or Path("samples") / Path(args.ckpt).resolve().parent.name
            sample(args.ckpt, out, args.n, args.ddim_steps, args.seed, args.batch_size, args.force)
    except (data.DataError, FloatingPointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
