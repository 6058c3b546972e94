"""SimGen: one DDPM that generates a surgical image and its segmentation mask together.

Reference implementation of Bhat, Bose, Nwoye, Padoy, "SimGen: A Diffusion-Based Framework
for Simultaneous Surgical Image and Segmentation Mask Generation" (2024). The mask's classes
are coloured by the Canonical Fibonacci Lattice (cfl.py, §3.2), concatenated with the image
into 6 channels, and denoised by a residual U-Net (§3.3) over T = 250 DDPM steps (§3.4);
generated masks are decoded back to classes by cosine similarity.

Reading order, the paper first: Config -> ResUNet -> GaussianDiffusion (DDPM Algorithms 1, 2;
DDIM, DPM-Solver++, RePaint) -> train -> sample; then eval, segment (§5.5), plot, bench, main().

Commands: train [DATA], sample CKPT, eval REAL FAKE, segment TRAIN --test REAL, plot RUN, bench;
`python simgen.py COMMAND -h` lists a command's flags. DATA is a dataset folder (data.py),
"synthetic" (5 classes) or "synthetic:K" (2-64). Several GPUs: torchrun --nproc_per_node=N.
"""

import argparse
import contextlib
import copy
import hashlib
import inspect
import json
import math
import os
import platform
import re
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.benchmark
from torch.utils.flop_counter import FlopCounterMode

import cfl
import data
import metrics

VERSION = 1  # checkpoint format
SAMPLERS = ("ddpm", "ddim", "dpm++", "dpm++sde")  # GaussianDiffusion.sample_loop's
SPEED_FIELDS = ("amp", "compile", "channels_last")  # the GPU switches: they change no result
LR_SCHEDULES = ("constant", "cosine")  # --lr-schedule
LR_FLOOR = 0.1  # the cosine schedule's last rate, in units of --lr
# The choices of Config's str fields: -h lists them, __post_init__ checks them
CHOICES = dict(schedule=("linear", "cosine"), mask_scheme=cfl.SCHEMES, grid_sampler=SAMPLERS)
CHOICES |= dict(lr_schedule=LR_SCHEDULES)

# ------------------------------------------------------------------------------------------ config


@dataclass
class Config:
    # model (§3.3; sizes from §4.2)
    image_size: int = 256  # pixels per side of image and mask
    base_channels: int = 64  # feature maps at full resolution
    channel_mults: tuple = (1, 2, 4, 8)  # width of each level, in base_channels
    # diffusion (§3.4)
    timesteps: int = 250  # T, forward-process steps
    schedule: str = "linear"  # betas: linear (DDPM's, scaled to T) or cosine (Nichol & Dhariwal)
    mask_scheme: str = "cfl"  # mask code: cfl (§3.2), or gray or random (the §5.3 ablation)
    # training (§4.2)
    steps: int = 200_000  # optimizer steps; Note: the paper gives 5 V100-days, not a step count
    batch_size: int = 16  # global batch, split over DDP ranks
    lr: float = 1e-4  # Adam learning rate (the peak, with --warmup-steps or a cosine schedule)
    ema_decay: float = 0.9999  # EMA of the weights, used for sampling
    grad_clip: float = 1.0  # max global gradient norm
    seed: int = 0  # init, batches, noise: all randomness of a step is a function of (seed, step)
    real_fraction: float = 1.0  # of the train split, drawn by seed: segment's subset (Fig. 15)
    # the recipe's levers (departures; the defaults are the paper's constant-rate epsilon MSE)
    snr_gamma: float = 0.0  # Min-SNR-gamma: each loss weighted min(SNR_t, gamma) / SNR_t; 0: off
    lr_schedule: str = "constant"  # constant, or cosine: from --lr down to --lr / 10 at --steps
    warmup_steps: int = 0  # the rate rises linearly from lr / N to lr over the first N steps
    # speed: how fast, never what is computed
    amp: bool = True  # bf16 autocast on CUDA and on CPUs with bf16 units (fp16 before Ampere)
    compile: bool = True  # torch.compile (CUDA; on a CPU only when given)
    channels_last: bool = True  # NHWC memory format (CUDA; on a CPU only when given)
    # io
    data: str = "synthetic"  # dataset folder, "synthetic" or "synthetic:K"
    log_every: int = 100  # steps between progress lines and log.csv rows
    ckpt_every: int = 5000  # steps between checkpoints and sample grids
    sample_n: int = 16  # pairs in each sample grid
    grid_sampler: str = "ddpm"  # the training grids' sampler; ddpm takes all T steps
    grid_steps: int = 20  # steps of the other grid samplers
    eval_every: int = 0  # steps between FID/KID/sFID/sKID of eval_n pairs vs the val split; 0: off
    eval_n: int = 120  # pairs sampled for each of those scores (dpm++sde, 20 steps)

    def __post_init__(self):
        """Every flag is checked here, before any work is done or any folder is made."""
        for f in fields(self):  # each value of its field's type (a checkpoint's, a caller's)
            kind, value = type(f.default), getattr(self, f.name)
            if type(value) is not kind and (kind, type(value)) not in ((float, int), (tuple, list)):
                raise ValueError(f"--{f.name.replace('_', '-')} {value!r}: not a {kind.__name__}")
        self.channel_mults = tuple(int(m) for m in self.channel_mults)
        positive = "image_size base_channels timesteps steps batch_size log_every ckpt_every"
        positive += " sample_n grid_steps"
        floats = [f.name for f in fields(self) if f.type is float]  # inf and nan pass > and <
        checks = [(n, math.isfinite(getattr(self, n)), "must be finite") for n in floats]
        checks += [(n, getattr(self, n) >= 1, "must be >= 1") for n in positive.split()]
        levels = len(self.channel_mults)  # one downsampler each; linear: beta_T = 20 / T < 1
        checks += [
            *[(n, getattr(self, n) > 0, "must be > 0") for n in ("lr", "grad_clip")],
            *[(n, getattr(self, n) >= 0, "must be >= 0") for n in ("seed", "eval_every")],
            *[(n, getattr(self, n) >= 0, "must be >= 0") for n in ("snr_gamma", "warmup_steps")],
            ("eval_n", self.eval_n >= 2, "must be >= 2: FID and KID need two pairs"),
            ("eval_every", self.eval_every <= self.steps, "past --steps: no step would be scored"),
            ("real_fraction", 0 < self.real_fraction <= 1, "must be in (0, 1]"),
            ("ema_decay", 0 <= self.ema_decay < 1, "must be in [0, 1)"),
            *[(n, getattr(self, n) in c, f"use {' or '.join(c)}") for n, c in CHOICES.items()],
            ("channel_mults", levels and min(self.channel_mults) >= 1, "use positive integers"),
            ("timesteps", self.schedule != "linear" or self.timesteps > 20, "linear needs T > 20"),
            ("image_size", self.image_size % 2**levels == 0, f"must be divisible by 2^{levels}"),
        ]
        for name, ok, need in checks:
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: {need}")


PRESETS = {
    "paper": {},  # §4.2: 256 x 256, 64 channels, (1, 2, 4, 8), T = 250, batch 16, Adam 1e-4
    # The README's main job: minutes on a 2-core CPU, sampling with 250 DDPM steps included.
    # Deviation: 32 x 32, 16 channels, 3 levels, 1000 steps at lr 2e-3 with a short EMA.
    "demo": dict(image_size=32, base_channels=16, channel_mults=(1, 2, 4), steps=1000)
    | dict(batch_size=32, lr=2e-3, ema_decay=0.995, ckpt_every=1000, sample_n=16),
    # the tests: seconds
    "tiny": dict(image_size=16, base_channels=8, channel_mults=(1, 2), timesteps=50, steps=20)
    | dict(batch_size=4, lr=1e-3, ema_decay=0.9, ckpt_every=10, sample_n=4),
}

# --------------------------------------------------------------- the residual U-Net (§3.3, Fig. 3)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of the timesteps (Transformer positions, as DDPM): (B,) -> (B, dim)"""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, dim / 2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same keys) keeping its input's layout: CUDA's makes NHWC NCHW (copies)."""

    def forward(self, x):  # (B, C, H, W) -> the same, in float32 as autocast runs group_norm
        if x.is_contiguous():  # NCHW: the native kernel, twice as fast on a CPU
            return super().forward(x)
        b, c, h, w = x.shape
        g = x.float().view(b, self.num_groups, c // self.num_groups, h, w)  # views NHWC too
        var, mean = torch.var_mean(g, dim=(2, 3, 4), correction=0, keepdim=True)
        x = ((g - mean) * torch.rsqrt(var + self.eps)).view(b, c, h, w)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


def norm(c):
    # Note: at most 32 groups as in DDPM's U-Net, and at least 4 channels in each: a group of
    # one channel is InstanceNorm, which erases each image's mean colour (narrow nets drift).
    return GroupNorm(math.gcd(32, c // 4), c)


class ConvBlock(nn.Module):
    """GroupNorm -> Conv2d 3x3 -> GELU (§3.3), plus the timestep and a residual shortcut."""

    def __init__(self, c_in, c_out, t_dim):
        super().__init__()
        self.norm = norm(c_in)
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
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


def level(c_in, c_out, t_dim):
    """One level of the U-Net: two ConvBlocks."""
    return nn.ModuleList([ConvBlock(c_in, c_out, t_dim), ConvBlock(c_out, c_out, t_dim)])


class ResUNet(nn.Module):
    """The denoiser eps_theta(x_t, t) of §3.3: 62.7M parameters at the paper's config.
    :param cfg: Config; base_channels * channel_mults give each level's width
    :param in_channels, out_channels: 6 and 6 for SimGen (image + CFL mask in, eps out)
    :param time_embedding: False builds the same net without t, e.g. as a segmentation network
    forward(x (B, in, H, W), t (B,) long in {0..T-1} or None) -> (B, out, H, W)"""

    def __init__(self, cfg, in_channels=6, out_channels=6, time_embedding=True):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mults]
        # Note: the bottleneck is twice the last level: the downsampler doubles the channels.
        below = widths[1:] + [2 * widths[-1]]
        self.base = c = widths[0]
        t_dim = 4 * c if time_embedding else 0  # Note: DDPM's 4x width for t
        self.time_mlp = None
        if time_embedding:
            self.time_mlp = nn.Sequential(nn.Linear(c, t_dim), nn.GELU(), nn.Linear(t_dim, t_dim))
        self.init = nn.Conv2d(in_channels, c, 3, padding=1)
        self.enc = nn.ModuleList(level(w, w, t_dim) for w in widths)
        # Note: 4x4 stride-2 convolutions down and transposed convolutions up (DCGAN-style).
        self.down = nn.ModuleList(nn.Conv2d(w, b, 4, 2, 1) for w, b in zip(widths, below))
        self.mid = level(below[-1], below[-1], t_dim)
        self.up = nn.ModuleList(nn.ConvTranspose2d(b, w, 4, 2, 1) for w, b in zip(widths, below))
        # Note: both ConvBlock outputs of a level are concatenated with the upsampled features
        # in the first decoder block of that level (and, at full resolution, the initial
        # conv's, as §3.3 says): 3C inputs, 4C at the top.
        self.dec = nn.ModuleList(
            level(3 * w + (c if i == 0 else 0), w, t_dim) for i, w in enumerate(widths)
        )
        self.out = nn.Sequential(norm(c), nn.GELU(), nn.Conv2d(c, out_channels, 3, padding=1))
        # Note: the last conv starts at zero (improved-diffusion): eps_theta = 0 at first, loss 1.
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x, t=None):
        temb = self.time_mlp(timestep_embedding(t, self.base)) if self.time_mlp else None  # (B, 4C)
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
            extra = skips[0] if i == 0 else []  # the initial conv's features, full resolution
            h = torch.cat([h, *skips[i + 1], *extra], 1)  # (B, 3C (+C), H, W)
            h = self.dec[i][0](h, temb)  # (B, C, H, W)
            h = self.dec[i][1](h, temb)
        return self.out(h)


# ---------------------------------------------------------------- diffusion (DDPM, Ho et al. 2020)


def get_named_beta_schedule(name, T):
    """beta_1..beta_T as float64 numpy (T,)."""
    if name == "linear":
        # Note: DDPM's 1e-4..0.02 for T = 1000, scaled by 1000 / T so that at the paper's T = 250
        # x_T is still nearly pure noise (sqrt(alpha_bar_T) = 0.006); the paper gives no schedule.
        scale = 1000 / T
        return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)

    def f(t):  # Improved DDPM (Nichol & Dhariwal 2021) Eq. 17: alpha_bar(t) = f(t) / f(0)
        return math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # s = 0.008

    # beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}, clipped at 0.999 as in their §3.2
    return np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)], dtype=np.float64)


# Conditional sampling's given half: x (B, C, H, W) where keep (bool) is True; RePaint's rounds.
Known = NamedTuple("Known", [("x", torch.Tensor), ("keep", torch.Tensor), ("resample", int)])


class GaussianDiffusion:
    """The DDPM forward and reverse processes, named as in improved-diffusion.
    Timesteps: code t in {0..T-1} is the paper's t in {1..T}; t = 0 is the last denoising step.
    Schedules are computed in float64 and stored as float32 tensors (T,) indexed by t.
    The model is passed to each method: model(x_t (B, C, H, W), t (B,)) -> eps (B, C, H, W)."""

    def __init__(self, T=250, schedule="linear"):
        self.num_timesteps = T
        betas = get_named_beta_schedule(schedule, T)
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)  # alpha_bar_t
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])  # alpha_bar_{t-1}; 1 at t = 1
        buffers = dict(
            betas=betas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),  # DDPM Eq. 4: mean of q(x_t | x_0)
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),  # DDPM Eq. 4: its std
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1),
            snr=alphas_cumprod / (1.0 - alphas_cumprod),  # SNR_t = alpha_bar_t / (1 - alpha_bar_t)
            # DDPM Eq. 7: beta~_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t
            posterior_variance=betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            # DDPM Eq. 7: mu~_t = coef1 x_0 + coef2 x_t
            posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1 - alphas_cumprod_prev) * np.sqrt(alphas) / (1 - alphas_cumprod),
        )
        # beta~ is 0 at the last step (paper t = 1): its log is clipped to its value at t = 1.
        pv = buffers["posterior_variance"]
        buffers["posterior_log_variance_clipped"] = np.log(np.append(pv[1], pv[1:]))
        for name, value in buffers.items():
            setattr(self, name, torch.tensor(value, dtype=torch.float32))

    def to(self, device):
        """Move the buffers to the device where x_t lives; every method expects them there."""
        for name, value in list(vars(self).items()):
            if torch.is_tensor(value):
                setattr(self, name, value.to(device))
        return self

    def _extract(self, arr, t, x):
        """arr[t] shaped (B, 1, 1, 1) to broadcast against x (B, C, H, W)."""
        return arr[t].view(-1, *([1] * (x.ndim - 1)))

    def q_sample(self, x_start, t, noise):
        """x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I): DDPM Eq. 4."""
        mean = self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
        return mean + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0): DDPM Eq. 6-7."""
        mean = self._extract(self.posterior_mean_coef1, t, x_t) * x_start
        mean = mean + self._extract(self.posterior_mean_coef2, t, x_t) * x_t
        variance = self._extract(self.posterior_variance, t, x_t)
        return mean, variance, self._extract(self.posterior_log_variance_clipped, t, x_t)

    def _predict_xstart_from_eps(self, x_t, t, eps):
        # DDPM Eq. 4 solved for x_0: x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
        x = self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
        return x - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        # The same equation solved for eps: the noise implied by a (clipped) x_0 prediction
        x = self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
        return (x - pred_xstart) / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t)

    def training_losses(self, model, x_start, t, noise=None, snr_gamma=0.0):
        """DDPM Algorithm 1 / Eq. 14: ||eps - eps_theta(x_t, t)||^2, mean over 6 channels (§3.4).
        x_start: (B, C, H, W) in [-1, 1]; t: (B,) long; noise: (B, C, H, W) -> dict loss: (B,)"""
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)  # DDPM Eq. 4
        mse = (noise - model(x_t, t).float()).square().mean(dim=tuple(range(1, x_start.ndim)))
        if snr_gamma:  # Deviation (--snr-gamma): Min-SNR-gamma (Hang et al. 2023, §3.4), for an
            # eps-predicting model the weight min(SNR_t, gamma) / SNR_t, SNR_t = a_t^2 / s_t^2:
            # the nearly clean steps (SNR_t > gamma), whose gradients dominate, count less.
            snr = self.snr[t]  # (B,)
            mse = mse * snr.clamp(max=snr_gamma) / snr
        return dict(loss=mse)

    def p_mean_variance(self, model, x, t, clip_denoised=True):
        """p_theta(x_{t-1} | x_t), variance fixed at beta~_t (improved-diffusion's "fixed small").

        The mean is DDPM Eq. 7 at the predicted x_0; unclipped, that equals DDPM Eq. 11,
        mu_theta = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta) / sqrt(alpha_t).
        Deviation: x_0 is clipped to [-1, 1], the range of images and codes (improved-diffusion's
        clip_denoised): unclipped, no sampler works on the small demo models (alignment 0.36-0.46).
        :return: dict mean, variance, log_variance, pred_xstart, each (B, C, H, W) or broadcastable
        """
        eps = model(x, t).float()
        pred_xstart = self._predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, variance, log_var = self.q_posterior_mean_variance(pred_xstart, x, t)
        return dict(mean=mean, variance=variance, log_variance=log_var, pred_xstart=pred_xstart)

    def p_sample(self, model, x, t, generator=None):
        """One ancestral step x_t -> x_{t-1}: DDPM Algorithm 2, lines 3-4."""
        out = self.p_mean_variance(model, x, t)
        noise = torch.randn(x.shape, generator=generator, device=x.device)  # line 3: z ~ N(0, I)
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))  # line 3: z = 0 at paper t = 1
        # line 4: x_{t-1} = mu_theta(x_t, t) + sigma_t z
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return dict(sample=sample, pred_xstart=out["pred_xstart"])

    @torch.no_grad()
    def p_sample_loop(self, model, shape, generator=None):
        """DDPM Algorithm 2, as the paper writes it -> x_0 (shape) in [-1, 1]. sample_loop("ddpm")
        draws the same (tested), and serves the other samplers and conditional sampling too."""
        device = generator.device if generator is not None else None
        x = torch.randn(shape, generator=generator, device=device)  # line 1: x_T ~ N(0, I)
        for i in reversed(range(self.num_timesteps)):  # line 2: for t = T, ..., 1
            t = torch.full((shape[0],), i, dtype=torch.long, device=x.device)
            x = self.p_sample(model, x, t, generator)["sample"]  # lines 3-4: x_{t-1}
        return x  # line 6

    def ddim_sample(self, model, x, t, t_prev, eta=0.0, generator=None):
        """One DDIM step (Song et al. 2021, Eq. 12) from t to t_prev < t; t_prev None gives x_0.

        Deviation: an extension, not in the paper (which samples with DDPM); with every step and
        eta = 1 it is DDPM Algorithm 2 again. eta = 0 draws no noise: deterministic given x_T."""
        out = self.p_mean_variance(model, x, t)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])  # of the clipped x_0
        a_t, a_prev = self._extract(self.alphas_cumprod, t, x), torch.ones(())  # 1: at x_0
        if t_prev is not None:
            a_prev = self._extract(self.alphas_cumprod, t_prev, x)
        x_prev = out["pred_xstart"] * a_prev.sqrt()
        if eta == 0:
            return x_prev + (1 - a_prev).sqrt() * eps
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()  # DDIM Eq. 16
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        return x_prev + (1 - a_prev - sigma**2).sqrt() * eps + sigma * noise

    def dpm_solver_sample(self, model, x, t, t_prev, previous=None, noise=None):
        """One step of DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) from t to t_prev < t (None:
        to x_0, the last step). Deviation: an extension, not in the paper. It integrates the
        probability-flow ODE in its data-prediction form, x_t = (s_t / s_s) x_s + s_t * integral
        of e^lambda x_theta d lambda, lambda_t = log(a_t / s_t) (a_t = sqrt(alpha_bar_t), s_t =
        sqrt(1 - alpha_bar_t)) on the discrete schedule; x_theta, the clipped x_0 of DDPM Eq. 4,
        is linear in lambda between steps (second order), constant at the first and the last.
        With noise (B, C, H, W): SDE-DPM-Solver++(2M), the same scheme for the reverse SDE (as
        diffusers' "sde-dpmsolver++"); its first-order step is DDPM's posterior sample, and the
        noise corrects errors of the network that the ODE keeps.
        :param previous: (x_theta, lambda) of the step before, or None
        :return: (x_{t_prev}, (x_theta, lambda) of this step for the next one)"""
        x0 = self.p_mean_variance(model, x, t)["pred_xstart"]  # x_theta(x_t, t), in [-1, 1]
        a_bar = self._extract(self.alphas_cumprod, t, x)
        lam = 0.5 * (a_bar / (1 - a_bar)).log()  # lambda_t = log(a_t / s_t)
        if t_prev is None:  # to x_0: s = 0, lambda = inf, e^{-h} = 0, so x_0 = x_theta
            return x0, (x0, lam)
        a_bar_prev = self._extract(self.alphas_cumprod, t_prev, x)
        h = 0.5 * (a_bar_prev / (1 - a_bar_prev)).log() - lam  # h_i = lambda_i - lambda_{i-1} > 0
        d = x0
        if previous is not None:  # Algorithm 2: r_i = h_{i-1} / h_i, D_i from the last two x_theta
            x0_before, lam_before = previous
            r = (lam - lam_before) / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_before
        ratio = ((1 - a_bar_prev) / (1 - a_bar)).sqrt()  # s_{t_i} / s_{t_{i-1}}
        # Algorithm 2: x_{t_i} = (s_i / s_{i-1}) x_{t_{i-1}} - a_i (e^{-h_i} - 1) D_i
        if noise is None:
            return ratio * x - a_bar_prev.sqrt() * torch.expm1(-h) * d, (x0, lam)
        # the SDE step: (s_i / s_{i-1}) e^{-h_i} x_{t_{i-1}} + a_i (1 - e^{-2 h_i}) D_i
        # + s_i sqrt(1 - e^{-2 h_i}) z
        decay = torch.exp(-2 * h)  # e^{-2h}
        mean = ratio * torch.exp(-h) * x + a_bar_prev.sqrt() * (1 - decay) * d
        return mean + (1 - a_bar_prev).sqrt() * (1 - decay).sqrt() * noise, (x0, lam)

    def sampling_timesteps(self, sampler, steps, spacing=None):
        """The descending timesteps a sampler visits: all T for ddpm; else about `steps` of them,
        evenly spaced in t (DDIM's "uniform" skip; ddim's default) or in lambda_t = log(a_t / s_t)
        (DPM-Solver's "logSNR" spacing; dpm++'s default), rounded to the nearest timestep.
        Note: dpm++ takes even lambda steps: with even t steps its last step, t ~ T/K to 0, spans
        half the lambda range, where its extrapolation (r_i << 1) is least accurate."""
        if sampler == "ddpm":
            return list(range(self.num_timesteps - 1, -1, -1))
        if (spacing or ("lambda" if sampler.startswith("dpm++") else "t")) == "t":
            top = self.num_timesteps - 1  # one step starts at the top too: from x_T to x_0
            ts = np.linspace(0, top, steps).round().astype(np.int64) if steps > 1 else [top]
        else:
            a_bar = self.alphas_cumprod.double().cpu().numpy()
            lam = 0.5 * np.log(a_bar / (1 - a_bar))  # decreasing in t
            ts = np.abs(lam[None] - np.linspace(lam[-1], lam[0], steps)[:, None]).argmin(1)
        return np.unique(ts)[::-1].tolist()

    def q_resample(self, x_prev, t_prev, t, generator=None):
        """x_t ~ q(x_t | x_{t_prev}) = N(sqrt(a_t / a_prev) x_prev, (1 - a_t / a_prev) I): DDPM
        Eq. 4 between two noise levels; RePaint's step back up (Lugmayr et al. 2022, Alg. 1 l. 9).
        """
        a = self.alphas_cumprod
        ratio = self._extract(a, t, x_prev) / self._extract(a, t_prev, x_prev)
        noise = torch.randn(x_prev.shape, generator=generator, device=x_prev.device)
        return ratio.sqrt() * x_prev + (1 - ratio).sqrt() * noise

    @torch.no_grad()
    def sample_loop(self, model, shape, sampler="ddpm", steps=None, generator=None, known=None):
        """x_T ~ N(0, I) -> x_0 (shape) in [-1, 1] by "ddpm" (Algorithm 2), "ddim" (eta = 0),
        "dpm++" (DPM-Solver++(2M)) or "dpm++sde" on sampling_timesteps(sampler, steps), or on
        steps if it is a list of descending timesteps; every draw from generator, on its device.
        Deviation: conditional sampling with a Known, not in the paper (its stated limitation):
        RePaint (Lugmayr et al. 2022, Algorithm 1). Before each step the known channels are
        replaced by a fresh x_t ~ q(x_t | known.x) (its line 5), so the network denoises the
        others beside a correctly noised known half. Plain replacement (resample 1) is biased: the
        unknown half's early steps never see the known half's details; resample R repeats each
        step R times, going back to level t by q_resample (its lines 8-10), which harmonises them.
        """
        device = generator.device if generator is not None else None
        x = torch.randn(shape, generator=generator, device=device)  # x_T
        ts = steps if isinstance(steps, list) else self.sampling_timesteps(sampler, steps)
        history = None  # DPM-Solver++(2M): the previous step's x_theta and lambda
        rounds = known.resample if known is not None else 1
        for i, i_prev in zip(ts, ts[1:] + [-1]):
            t = torch.full((shape[0],), i, dtype=torch.long, device=x.device)
            t_prev = torch.full_like(t, i_prev)
            for r in range(rounds):
                if known is not None:  # RePaint line 5: the known half at noise level t, DDPM Eq. 4
                    noise = torch.randn(x.shape, generator=generator, device=x.device)
                    x = torch.where(known.keep, self.q_sample(known.x, t, noise), x)
                to = t_prev if i_prev >= 0 else None  # None: to x_0 (no host sync to learn it)
                if sampler == "ddpm":
                    x_prev = self.p_sample(model, x, t, generator)["sample"]
                elif sampler == "ddim":
                    x_prev = self.ddim_sample(model, x, t, to)
                else:  # the SDE form draws noise at every step but the last, to x_0
                    noise = None
                    if sampler == "dpm++sde" and i_prev >= 0:
                        noise = torch.randn(x.shape, generator=generator, device=x.device)
                    x_prev, state = self.dpm_solver_sample(model, x, t, to, history, noise)
                if r + 1 < rounds and i_prev >= 0:  # RePaint line 9: back up to level t
                    x = self.q_resample(x_prev, t_prev, t, generator)
            x = x_prev
            history = state if sampler.startswith("dpm++") else None
        return torch.where(known.keep, known.x, x) if known is not None else x


# --------------------------------------------- train (DDPM Algorithm 1): its named pieces, then it

# make_generator's first key: what the generator draws. The other keys follow it.
BATCH_STREAM = 0  # (seed, step): a step's global batch (train), its batch and flips (segment)
RANK_STREAM = 1  # (seed, step, rank): one DDP rank's flips, t and noise
SAMPLE_STREAM = 2  # (seed, k): the k-th batch of samples (k = 0: the grids made in training)
SUBSET_STREAM = 3  # (seed,): the real pairs --real-fraction keeps, in train and in segment
# The fields a resumed run may change; the others must be those it was trained with.
RESUMABLE = {"steps", "log_every", "ckpt_every", "sample_n", "grid_sampler", "grid_steps"}
RESUMABLE |= {"eval_every", "eval_n", "lr", *SPEED_FIELDS}  # lr: a step decay, by hand
RESUMABLE |= {"snr_gamma", "lr_schedule", "warmup_steps"}  # the recipe's levers
SCORES = ("fid", "kid", "sfid", "skid")  # --eval-every's columns of log.csv
CURVE_SAMPLER = ("dpm++sde", 20)  # --eval-every's sampler and its steps
RENAMED = {"sampler": "grid_sampler", "sampler_steps": "grid_steps"}  # config fields, 2026-12


def make_generator(device, stream, *key):
    """A torch.Generator on device for one random stream, seeded from non-negative integers:
    each draw is a function of (stream, key), so a resumed or re-run job repeats it."""
    state = np.random.SeedSequence([stream, *map(int, key)]).generate_state(1, np.uint64)[0]
    return torch.Generator(device).manual_seed(int(state))


def training_batch(ds, cfg, step, rank=0, world=1):
    """This rank's share of step's batch: DDPM Algorithm 1 lines 2-4, made where ds's tensors are
    (ds: a data.PairedFolder: images uint8 (N, 3, S, S), masks uint8 (N, S, S) class ids).
    -> x_0 (B, 6, S, S) in [-1, 1], t (B,) long, noise (B, 6, S, S); B = batch_size / world"""
    device, b = ds.images.device, cfg.batch_size // world
    # Every draw comes from (seed, step): a resumed run repeats it exactly.
    g = make_generator(device, BATCH_STREAM, cfg.seed, step)  # the global batch, on every rank
    idx = torch.randint(len(ds.images), (cfg.batch_size,), generator=g, device=device)
    idx = idx[rank * b : (rank + 1) * b]  # this rank's share of it
    g = make_generator(device, RANK_STREAM, cfg.seed, step, rank)  # its flips, t and noise
    # Deviation: random horizontal flips, the same for image and mask (the paper states none).
    image, mask = data.flip(ds.images[idx], ds.masks[idx], g)
    # line 2, x_0 ~ q(x_0): the image beside its mask's code, classes as points on the sphere
    # (§3.2), 6 channels in [-1, 1]. check=False: the id range was checked when the data loaded.
    code = cfl.encode(mask, ds.num_classes, cfg.mask_scheme, check=False)  # (B, 3, S, S)
    x = torch.cat([data.to_unit(image), code], 1)  # (B, 3+3, S, S)
    t = torch.randint(cfg.timesteps, (b,), generator=g, device=device)  # line 3: t ~ U{1..T}
    noise = torch.randn(x.shape, generator=g, device=device)  # line 4: eps ~ N(0, I)
    return x, t, noise


def optimizer_step(loss, opt, scaler, grad_clip, set_to_none=True):
    """Backward, clip the global gradient norm, Adam step: train's (and segment's) update.
    set_to_none=False keeps the gradients' memory: DDP's buckets (gradient_as_bucket_view)."""
    scaler.scale(loss).backward()  # DDP averages the gradients over the ranks here
    scaler.unscale_(opt)  # fp16: the true gradients, for clipping; otherwise a no-op
    # Deviation: the global gradient norm is clipped (cfg.grad_clip; the paper states none).
    nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], grad_clip)
    scaler.step(opt)  # fp16: skips the step if a gradient overflowed; otherwise opt.step()
    scaler.update()
    opt.zero_grad(set_to_none=set_to_none)


def learning_rate(cfg, step):
    """The rate of the optimizer step after `step` done: cfg.lr (the paper's constant rate), or
    after a linear warmup over cfg.warmup_steps, and with lr_schedule "cosine" a half cosine from
    cfg.lr at the warmup's end down to cfg.lr * LR_FLOOR at cfg.steps (SGDR, Loshchilov & Hutter
    2017, Eq. 5, one cycle). A function of the step alone: a resumed run goes on along it."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    floor = cfg.lr * LR_FLOOR
    return floor + (cfg.lr - floor) * (1 + math.cos(math.pi * progress)) / 2


@torch.no_grad()
def update_ema(ema_params, params, decay):
    """ema <- decay * ema + (1 - decay) * param, in place, for two lists of tensors (one kernel)."""
    torch._foreach_lerp_(ema_params, params, 1 - decay)


def load_optimizer(opt, state):
    """opt.load_state_dict(state) with opt's own lr (a resumed --lr) and fused choice: a CPU run's
    fused (None) would leave Adam's step counts on the CPU beside CUDA moments, which it refuses."""
    for group in state["param_groups"]:
        group.update(lr=opt.defaults["lr"], fused=opt.defaults["fused"])
    opt.load_state_dict(state)


def save_checkpoint(path, state):
    """torch.save to a temporary file, then rename: a crash or a full disk never leaves half a
    checkpoint, and the one before stays whole. A failed write is a one-line DataError."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch's writer reports a full disk as RuntimeError
        weights = [part for part in ("model", "ema") if part in state]
        need = sum(t.nbytes for part in weights for t in state[part].values())
        need += 2 * sum(t.nbytes for t in state["model"].values()) if "optimizer" in state else 0
        free = shutil.disk_usage(path.parent).free  # (Adam's two moments: twice the weights)
        why = "no space left on its device" if free < need else str(e).strip().splitlines()[-1]
        space = f"about {need / 2**20:.0f} MB needed, {free / 2**20:.0f} MB free"
        raise data.DataError(f"{path}: not saved: {why} ({space})") from None
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path, resume=False):
    """A SimGen checkpoint (train's ckpt.pt, or best.pt: EMA weights only) as a dict, its tensors
    on the CPU, or a one-line DataError; resume: one train can resume (ckpt.pt)."""
    path = Path(path)
    if not path.is_file():
        raise data.DataError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign or pickled-code files alike
        raise data.DataError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    keys = {"ema", "config", "classes"}
    if isinstance(ckpt, dict) and {"model", "config", "classes"} <= set(ckpt) and "ema" not in ckpt:
        why = "a segmentation network's checkpoint (segment --out), not a generator's"
        raise data.DataError(f"{path}: {why}; give a train run's ckpt.pt or best.pt")
    if not isinstance(ckpt, dict) or ckpt.get("version") != VERSION or not keys <= set(ckpt):
        raise data.DataError(f"{path}: not a SimGen checkpoint of version {VERSION}")
    if resume and "model" not in ckpt:
        why = "holds the EMA weights only (a best.pt), which train cannot resume"
        raise data.DataError(f"{path}: {why}; sample takes it")
    try:  # its config and weights must fit this code: Config's checks, the weights' shapes
        ckpt["config"] = {RENAMED.get(k, k): v for k, v in ckpt["config"].items()}
        cfg = Config(**ckpt["config"])
    except (TypeError, ValueError) as e:
        raise data.DataError(f"{path}: its config does not fit this SimGen ({e})") from None
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ResUNet(cfg).state_dict().items()}
    for part in [p for p in ("model", "ema") if p in ckpt]:
        got = {k: v.shape for k, v in ckpt[part].items()}
        bad = sorted(k for k in got.keys() | shapes.keys() if got.get(k) != shapes.get(k))
        if bad:
            raise data.DataError(f"{path}: its {part} weights do not fit its config ({bad[0]})")
    return ckpt


def pick_device(name=None):
    """torch.device(name); without one, this process's GPU (LOCAL_RANK, torchrun) or the CPU."""
    if name is None:
        name = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name (cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # the current device of everything that follows
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN times its algorithms once
    return device


def cpu_has_bf16():
    """Whether this CPU multiplies bf16 in hardware (x86: AVX512-BF16 or AMX; ARM: BF16) and
    oneDNN uses it. Elsewhere oneDNN emulates bf16, slower than fp32."""
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True  # ARM: oneDNN's check is of the BF16 extension itself
    units = getattr(torch._C._cpu, "_get_cpu_capability", dict)()  # {} if torch cannot tell
    return bool(units.get("avx512_bf16") or units.get("amx_bf16"))


def speedups(cfg, device, explicit=()):
    """The switches a run uses -> (autocast dtype or None, compile, channels_last): cfg's on CUDA;
    on a CPU, amp where it has bf16 units (cpu_has_bf16), the others only if in explicit (flags
    given). fp16 (with a GradScaler) on GPUs before compute capability 8.0 (the paper's V100,
    fp16 tensor cores only), else bf16."""
    cuda, bf16_cpu = device.type == "cuda", device.type == "cpu" and cpu_has_bf16()
    on = [getattr(cfg, k) and (cuda or k in explicit) for k in SPEED_FIELDS]
    on[0] = on[0] or (cfg.amp and bf16_cpu)  # Deviation: bf16 on such a CPU too, as on CUDA
    # Deviation: mixed precision by default on CUDA (the paper does not state its precision)
    old_gpu = device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0)
    dtype = torch.float16 if old_gpu else torch.bfloat16
    return dtype if on[0] else None, on[1], on[2]


def precision(amp, device):
    """What a startup line says of amp (speedups' dtype or None) on the device."""
    if amp is not None:
        return f"{str(amp)[6:]} autocast" + (" (--no-amp: fp32)" if device.type == "cpu" else "")
    return "fp32" + (" (no bf16 units in this CPU)" * (device.type == "cpu" and not cpu_has_bf16()))


def autocast(amp, device):  # autocast to amp (bf16, fp16) on the device; fp32 if amp is None
    return torch.autocast(device.type, amp or torch.float32, enabled=amp is not None)


def sampling_model(model, fast):
    """The model as the samplers call it: channels_last and compiled (default mode: a U-Net call on
    16 pairs at 256² is 2.8 TFLOP, CUDA graphs would gain little) when speedups() say so."""
    if fast[2]:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model, dynamic=False) if fast[1] else model  # one shape: batches padded


def resume_log(path, step, columns):
    """A run's log.csv (path) as of its checkpoint at step: the header, then the rows up to step;
    the rows past it, of a run stopped after its checkpoint, go. An older log's rows are laid out
    in columns by its own header, empty where it had no such column."""
    lines = path.read_text().splitlines() if path.exists() else []
    header = lines[0].split(",") if lines else columns
    rows = [dict(zip(header, r.split(","))) for r in lines[1:]]
    rows = [r for r in rows if r.get("step", "").isdigit() and int(r["step"]) <= step]
    rows = [",".join(r.get(c, "") for c in columns) for r in rows]
    path.write_text("".join(f"{r}\n" for r in [",".join(columns), *rows]))


def check_run_files(out, ckpt):
    """A one-line DataError, before any work, if run folder out holds files of the names train
    writes that a run of train's did not: a log.csv of another header, or, with no checkpoint
    (ckpt None), a best.pt or grid pictures. A log.csv of train's without a checkpoint is the
    trace of a run killed before its first one: a new run replaces it."""
    csv, first = out / "log.csv", ""
    if csv.is_file():
        with open(csv, errors="replace") as f:
            first = f.readline()
    if csv.exists() and not first.startswith("step,loss,"):
        raise data.DataError(f"{csv}: not a log of train's; move it or choose another --out")
    leftovers = [p.name for p in [out / "best.pt", *sorted(out.glob("grid_*.png"))] if p.exists()]
    if ckpt is None and leftovers:
        why = f"holds {', '.join(leftovers[:2])} but no ckpt.pt to resume: another run's?"
        raise data.DataError(f"{out}: {why} train would overwrite them; choose another --out")


def best_checkpoint(state):
    """best.pt's dict from a ckpt.pt's state: what sampling needs, the EMA weights, config,
    classes and palette, with the scores that made it the best and their protocol."""
    what = "the EMA weights of a run's best-scored step, for sample and eval; train resumes ckpt.pt"
    keep = ("ema", "step", "config", "classes", "palette", "version", "best", "switches")
    return dict({k: state[k] for k in keep}, what=what)


def resume_best(path, ckpt, protocol, log):
    """The best score a run must beat (ckpt.pt's record of it: step, scores, protocol), None if
    its first score is the best, with best.pt (path) made to agree: rewritten from ckpt.pt when
    it is missing, damaged or of another step and the record is ckpt.pt's own step. A record of
    another protocol (eval_n, val split, precision) starts a new best; so does best.pt without
    a record (an older SimGen's). A best.pt not SimGen's is refused: it would be replaced."""
    record = ckpt.get("best") if ckpt else None
    found = None
    if path.exists():
        try:
            found = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # empty or truncated: only a copy of a good step
            found = f"unreadable ({type(e).__name__})"
        else:
            if not isinstance(found, dict) or "ema" not in found or "version" not in found:
                why = "not a best.pt of train's, and the next best score would replace it"
                raise data.DataError(f"{path}: {why}; move it or choose another --out")
    if record is None:
        if found is not None:
            old = "unreadable" if isinstance(found, str) else "not recorded in ckpt.pt"
            log(f"{path}: {old}; the run's next score is its best and replaces it")
        return None
    if record["protocol"] != protocol:
        was = {k: v for k, v in record["protocol"].items() if protocol.get(k) != v}
        now = {k: protocol.get(k) for k in was}
        log(f"{path}: scored with {was}, this run with {now}: its first score starts a new best")
        return None
    if isinstance(found, dict) and found.get("step") == record["step"]:
        return record
    if record["step"] == ckpt["step"]:  # killed between ckpt.pt and best.pt: written now
        save_checkpoint(path, best_checkpoint(ckpt))
        return record
    why = found if isinstance(found, str) else "missing" if found is None else "of another step"
    log(f"{path}: {why}, step {record['step']}'s weights are gone: a new best starts")
    return None


def train(cfg, out, explicit=(), preset=()):
    """Train SimGen on cfg.data in run folder out, resuming out/ckpt.pt if it is there -> its path.
    explicit: the Config fields given as flags; preset: those a preset set. On resume both must
    agree with the checkpoint's, but the RESUMABLE fields, which only a flag changes; on a CPU
    only flags turn compile and channels_last on."""
    data.check_root(cfg.data)  # before the run folder is made
    if cfg.image_size >= 256 and pick_device().type == "cpu":
        print(
            f"warning: {cfg.image_size}x{cfg.image_size} is the paper's GPU scale: a step takes a "
            "minute or more on a CPU (the first step's line says how long); on a CPU try "
            "--preset demo (minutes) or --image-size 64 --base-channels 32 (hours)"
        )
    # Several GPUs: DDP under torchrun, each rank with its share of every global batch.
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device()  # this rank's GPU
    if world > 1 and not dist.is_initialized():
        ids = dict(device_id=device) if device.type == "cuda" else {}  # NCCL bound to it now
        # the timeout spans rank 0's checkpoint and grid, the first one with a compile
        dist.init_process_group("nccl" if ids else "gloo", timeout=timedelta(minutes=30), **ids)
    log = print if rank == 0 else lambda *args, **kwargs: None  # rank 0 logs and saves
    out = Path(out)
    ckpt_path, best_path, csv = out / "ckpt.pt", out / "best.pt", out / "log.csv"
    # One run per folder; stopped before its first checkpoint, a run leaves no log.csv behind.
    written = set()  # the files this run wrote that a stop before its first checkpoint removes
    lock = data.folder_lock(out, scratch=written) if rank == 0 else contextlib.nullcontext()
    with lock:
        # Resume: the checkpoint decides every setting the user did not give as a flag.
        ckpt = load_checkpoint(ckpt_path, resume=True) if ckpt_path.exists() else None
        check_run_files(out, ckpt)  # never a file of another's overwritten
        if ckpt is not None:
            saved = Config(**ckpt["config"])
            for name in sorted((set(explicit) | set(preset)) - RESUMABLE):
                if getattr(saved, name) != getattr(cfg, name):
                    why = f"trained with {name}={getattr(saved, name)}, not {getattr(cfg, name)}"
                    raise data.DataError(f"{ckpt_path}: {why}; choose another --out to start anew")
            cfg = replace(saved, **{n: getattr(cfg, n) for n in set(explicit) & RESUMABLE})
            if "switches" in ckpt:  # the precision and compile it used are kept, unless given
                explicit = {*explicit, *SPEED_FIELDS}
            if ckpt["step"] > cfg.steps:  # the checkpoint is left as it is
                why = f"already at step {ckpt['step']}, past --steps {cfg.steps}"
                raise data.DataError(f"{ckpt_path}: {why}; raise --steps to train on")
            if ckpt["step"] == cfg.steps:
                log(f"{ckpt_path}: already at step {cfg.steps}; nothing to train")
                return ckpt_path
            log(f"resuming {ckpt_path} at step {ckpt['step']}")
        if cfg.batch_size % world:
            raise data.DataError(f"--batch-size {cfg.batch_size}: not divisible by {world} ranks")
        # The training set, uint8 on the device: batches are made there, no loader processes.
        ds = data.PairedFolder(cfg.data, cfg.image_size, "train")
        # Fig. 15's generator of a fraction: the real pairs segment keeps at the same --seed
        data.keep_fraction(ds, cfg.real_fraction, make_generator("cpu", SUBSET_STREAM, cfg.seed))
        if ckpt is not None and ckpt["classes"] != ds.classes:
            raise data.DataError(f"{cfg.data}: its classes differ from those {ckpt_path} has")
        ds.images, ds.masks, k = ds.images.to(device), ds.masks.to(device), ds.num_classes
        fast = amp, compiled, channels_last = speedups(cfg, device, explicit)
        # what this run uses, saved as its config: a resume keeps it (an older checkpoint has
        # the defaults there, and no "switches")
        cfg = replace(cfg, amp=amp is not None, compile=bool(compiled), channels_last=channels_last)
        dtype = str(amp or torch.float32)[6:]  # bfloat16, float16 or float32
        protocol, best = None, ckpt and ckpt.get("best")  # the best score's step, scores, protocol
        if cfg.eval_every and rank == 0:  # the curve's yardstick: the val split, the Inception
            val = data.PairedFolder(cfg.data, cfg.image_size, "val")
            if len(val) < 2:  # found now, not after the first steps
                raise data.DataError(f"{cfg.data} [val]: 1 pair; --eval-every needs 2 to score")
            yardstick = val, metrics.load_inception()
            # what a score is comparable with: best.pt is the best of one protocol
            protocol = dict(eval_n=cfg.eval_n, sampler=CURVE_SAMPLER, seed=cfg.seed)
            protocol |= dict(val=f"{cfg.data} [val]", val_pairs=len(val), precision=dtype)
            best = resume_best(best_path, ckpt, protocol, log)
        shown = {k: v for k, v in asdict(cfg).items() if k not in SPEED_FIELDS}  # per device:
        log("config " + " ".join(f"{k}={v}" for k, v in shown.items()))  # see the next lines

        # The network, the EMA of its weights, Adam (§4.2) and the diffusion (§3.4).
        torch.manual_seed(cfg.seed)
        raw = ResUNet(cfg).to(device)  # unwrapped, uncompiled: its state dict is checkpointed
        ema = copy.deepcopy(raw).requires_grad_(False).eval()
        # fused on CUDA (the whole update in a few kernels); a CPU keeps PyTorch's default
        opt = torch.optim.Adam(raw.parameters(), lr=cfg.lr, fused=device.type == "cuda" or None)
        # fp16 needs loss scaling (its range underflows small gradients); bf16 and fp32 do not
        scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        diffusion = GaussianDiffusion(cfg.timesteps, cfg.schedule).to(device)
        start, seconds = 0, 0.0  # steps done, training seconds before this process
        if ckpt is not None:
            raw.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])
            load_optimizer(opt, ckpt["optimizer"])
            if "scaler" in ckpt and scaler.is_enabled():
                scaler.load_state_dict(ckpt["scaler"])
            start, seconds = ckpt["step"], ckpt.get("seconds", 0.0)
        del ckpt  # else ~1 GB of loaded tensors (paper config) stays referenced for the run

        # The GPU switches: none changes the algorithm, each only how fast it runs.
        if device.type == "cuda":  # TF32: fp32 products on the tensor cores, 10-bit mantissas
            torch.set_float32_matmul_precision("high")  # the API metrics' strict fp32 uses
            torch.backends.cudnn.allow_tf32 = True
        if channels_last:  # NHWC, the layout tensor cores read; the EMA too, for update_ema
            raw, ema = (m.to(memory_format=torch.channels_last) for m in (raw, ema))
            # Adam's moments in their weight's layout: a CPU run's checkpoint holds them in NCHW
            for p, state in opt.state.items():
                for name in [k for k in state if k != "step"]:
                    state[name] = torch.empty_like(p).copy_(state[name])
        model = raw
        if world > 1:  # gradient_as_bucket_view: the gradients live in DDP's buckets, no copy
            ids = [device.index] if device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, ids, gradient_as_bucket_view=True)
        model = torch.compile(model) if compiled else model
        grid_model = sampling_model(ema, fast) if rank == 0 else None
        running = [precision(amp, device), "compile" if compiled else "eager"]
        running += ["channels_last"] * channels_last + ["GradScaler: fp16"] * scaler.is_enabled()
        millions = sum(p.numel() for p in raw.parameters()) / 1e6
        log(f"{millions:.1f}M parameters; {world} x {device.type}, {', '.join(running)}")
        if rank == 0:  # a row per progress line; on resume, the rows past the checkpoint go
            resume_log(csv, start, ["step", "loss", "lr", "images_per_s", "seconds", *SCORES])
            written.add(csv.name)
        kept = f"stopped, {ckpt_path} (step {start}) is kept" if start else "stopped, no checkpoint"
        params, ema_params = list(raw.parameters()), list(ema.parameters())
        loss_sum, last_line, clock, timed_from = 0.0, start, time.time(), start
        shown = clock  # when the last progress line was printed

        for step in range(start, cfg.steps):  # DDPM Algorithm 1: repeat until converged
            # lines 2-4: x_0 (image and CFL-coded mask), t ~ Uniform({1..T}), eps ~ N(0, I)
            x, t, noise = training_batch(ds, cfg, step, rank, world)
            if channels_last:
                x, noise = (v.contiguous(memory_format=torch.channels_last) for v in (x, noise))
            # line 5: a gradient step on ||eps - eps_theta(x_t, t)||^2, x_t from DDPM Eq. 4
            # (Deviation, --snr-gamma: weighted by Min-SNR-gamma; see training_losses)
            with autocast(amp, device):
                loss = diffusion.training_losses(model, x, t, noise, cfg.snr_gamma)["loss"].mean()
            # Deviation (--warmup-steps, --lr-schedule cosine): the rate of this step, where the
            # paper's is constant (the default)
            lr = learning_rate(cfg, step)
            for group in opt.param_groups:
                group["lr"] = lr
            optimizer_step(loss, opt, scaler, cfg.grad_clip, set_to_none=world == 1)
            # Deviation: samples come from an EMA of the weights (DDPM's practice, not the
            # paper's), warmed up so that early grids forget the initialisation.
            update_ema(ema_params, params, min(cfg.ema_decay, (1 + step) / (10 + step)))

            # Logging. The loss is summed on the device; reading it waits for the GPU.
            done, loss_sum = step + 1, loss_sum + loss.detach()
            if done == start + 1:  # the first step compiles and autotunes: timed apart
                float(loss_sum)  # waits for the GPU
                first, clock, timed_from = time.time() - clock, time.time(), done
                seconds += first
                peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0
                memory = f"; peak GPU memory {peak:.1f} GiB" if peak else ""
                why = "compile, autotune; " if compiled else ""
                days = (cfg.steps - done) * first / 86400  # an upper bound: no compile again
                pace = f"; at its pace the steps left take {days:.1f} days" if days > 1 else ""
                log(f"first step {first:.1f}s ({why}not counted in the rates){memory}{pace}")
            due = done % cfg.ckpt_every == 0 or done == cfg.steps
            scored = cfg.eval_every and done % cfg.eval_every == 0  # FID & co. of the EMA
            row = due or scored or done % cfg.log_every == 0  # a line and a row of log.csv
            if row or (rank == 0 and time.time() - shown >= 10):  # else a line every 10 s
                mean = loss_sum / (done - last_line)
                if world > 1 and row:  # the mean over the ranks: the loss of the global batch
                    dist.all_reduce(mean)
                    mean /= world
                mean, now = float(mean), time.time()
                if not math.isfinite(mean):
                    raise FloatingPointError(f"loss is {mean} near step {done}; {kept}")
                rate = (done - timed_from) * cfg.batch_size / (now - clock)
                eta = f"{(cfg.steps - done) * cfg.batch_size / rate / 60:.1f} min" if rate else "-"
                log(f"step {done}/{cfg.steps}  loss {mean:.4f}  {rate:.1f} img/s  eta {eta}")
                shown = now
            if row:
                seconds += now - clock
                line = f"{done},{mean:.6f},{lr:.4g},{rate:.2f},{seconds:.1f}"
                loss_sum, last_line, clock, timed_from = 0.0, done, time.time(), done

            # The scores of the EMA's pairs, the checkpoint, best.pt, the log row and a sample
            # grid, in that order (rank 0; not counted as training time): best.pt is never ahead
            # of ckpt.pt, which records it, and a checkpoint's row is written once it is saved.
            scores, better = {}, False
            if scored and rank == 0:  # the training curve: the EMA's pairs against the val split
                scores = sample_scores(grid_model, diffusion, cfg, k, yardstick, amp)
                got = " ".join(f"{n} {metrics.fmt(v, 4)}" for n, v in scores.items())
                better = best is None or scores["fid"] < best["scores"]["fid"]
                of = f"{cfg.eval_n} pairs vs {len(yardstick[0])} val"
                log(f"step {done}: {got} ({of}{', best' * better})")
            if due or scored:  # never a checkpoint with non-finite weights: it would sample NaN
                finite = [p.isfinite().all() for m in (raw, ema) for p in m.parameters()]
                if not bool(torch.stack(finite).all()):
                    raise FloatingPointError(f"weights are not finite near step {done}; {kept}")
            if (due or better) and rank == 0:  # a new best is checkpointed at once
                best = dict(step=done, scores=scores, protocol=protocol) if better else best
                state = dict(model=raw.state_dict(), ema=ema.state_dict(), step=done)
                state.update(optimizer=opt.state_dict(), config=asdict(cfg), seconds=seconds)
                state.update(classes=ds.classes, palette=ds.palette, version=VERSION, best=best)
                state.update(switches=dict(amp=dtype, compile=compiled, device=device.type))
                state |= dict(scaler=scaler.state_dict()) if scaler.is_enabled() else {}
                save_checkpoint(ckpt_path, state)
                kept = f"stopped, {ckpt_path} (step {done}) is kept"
                if better:  # what sampling needs, the best FID's EMA weights, as atomically
                    save_checkpoint(best_path, best_checkpoint(state))
            if row and rank == 0:  # after the checkpoint: no row of a checkpoint not saved
                with open(csv, "a") as f:
                    cells = [scores.get(n) for n in SCORES]  # empty where not measured
                    f.write(line + "".join("," if v is None else f",{v:.6f}" for v in cells) + "\n")
            if due and rank == 0:  # the same noise every time: the grids show the training
                g = make_generator(device, SAMPLE_STREAM, cfg.seed, 0)
                with autocast(amp, device):
                    draw = Draw(cfg.sample_n, cfg.grid_sampler, cfg.grid_steps)
                    pairs = generate(grid_model, diffusion, cfg, k, draw, g)[:2]
                colours = cfl.colorize(pairs[1], k, cfg.mask_scheme)
                data.grid(pairs[0], colours).save(out / f"grid_{done:07d}.png")
            if (due or scored) and world > 1:  # the others wait here, not in the next all-reduce
                dist.barrier()
            clock = time.time() if due or scored else clock

        if rank == 0:  # the summary; on the built-in set, how well the last grid's masks fit
            log(f"{ckpt_path}: step {cfg.steps}, {seconds:.0f}s of training; grids in {out}")
            if data.synthetic_classes(cfg.data) is not None:
                real = ds.images[: len(pairs[0])].cpu(), ds.masks[: len(pairs[0])].cpu()
                report = data.alignment_report(*pairs, data.synthetic_classes(cfg.data), real)
                log(f"alignment of generated pairs {report}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return ckpt_path


# ------------------------------------------------------------------ sample (DDPM Algorithm 2)


# What generate draws: n pairs by a sampler of SAMPLERS and its steps (ddpm: all T, steps unused)
Draw = NamedTuple("Draw", [("n", int), ("sampler", str), ("steps", int)])


@torch.no_grad()
def generate(model, diffusion, cfg, num_classes, draw, generator, known=None):
    """draw.n pairs from noise by draw.sampler (DDPM Algorithm 2 by default), every random draw from
    generator, masks decoded (§3.4); known: conditional sampling (sample_loop). -> images uint8
    (n, 3, S, S), masks long (n, S, S) class ids, pixels of ambiguous codes bool (n, S, S), CPU"""
    shape, shown = (draw.n, 6, cfg.image_size, cfg.image_size), [time.time()]

    def network(x, t):  # the model, and a progress line every 10 s of sampling
        if time.time() - shown[0] >= 10:
            print(f"  sampling: at t = {int(t[0]) + 1} of T = {cfg.timesteps}", flush=True)
            shown[0] = time.time()
        return model(x, t)

    x = diffusion.sample_loop(network, shape, draw.sampler, draw.steps, generator, known)
    x = x.float()  # (n, 3+3, S, S) in [-1, 1]: the image beside its mask's code
    # §3.4: each mask pixel is the class whose lattice point is nearest in cosine similarity
    # (Deviation: grey and random codes by the nearest code instead: see cfl.decode)
    masks = cfl.decode(x[:, 3:], num_classes, cfg.mask_scheme)
    unsure = cfl.ambiguous(x[:, 3:], num_classes, cfg.mask_scheme)
    return data.to_uint8(x[:, :3]).cpu(), masks.cpu(), unsure.cpu()


def sample(args):
    """The sample command (args: its flags): pairs from a checkpoint's EMA weights in args.out as
    a dataset (data.new_sample: images/, masks/ in the dataset's own values, classes.json), and
    COCO's annotations.json (the paper's "coordinate extraction"); --given: conditional."""
    for name, least in (("n", 1), ("batch_size", 1), ("steps", 1), ("seed", 0), ("resample", 1)):
        value = getattr(args, name)
        if value is not None and value < least:
            raise ValueError(f"--{name.replace('_', '-')} {value}: must be at least {least}")
    if args.sampler == "ddpm" and args.steps is not None:
        raise ValueError("--steps: ddpm takes all T steps; --sampler ddim, dpm++, dpm++sde take K")
    if (args.given is None) != (args.data is None) and not (args.data and args.trajectory):
        raise ValueError("--given and --data go together (or --data with --trajectory)")
    out, device = Path(args.out), pick_device()
    # The checkpoint carries the config and the classes: no flags to re-type, no size mismatch.
    ckpt = load_checkpoint(args.ckpt)  # on the CPU: only the EMA weights go to the device
    cfg, steps = Config(**ckpt["config"]), args.steps or 20
    classes, k, palette = ckpt["classes"], len(ckpt["classes"]), ckpt.get("palette")
    if args.sampler != "ddpm" and steps > cfg.timesteps:
        print(f"--steps {steps}: the model has T = {cfg.timesteps}; taking all of them")
    if args.given is not None and data.declared_classes(args.data):  # before decoding DATA
        data.match_classes(data.declared_classes(args.data), classes, args.data, args.ckpt)
    chosen = {name: getattr(args, name) for name in SPEED_FIELDS if getattr(args, name) is not None}
    amp, *_ = fast = speedups(replace(cfg, **chosen), device, chosen)  # flags override the config
    print(f"sampling on {device.type}, {precision(amp, device)}")
    model = ResUNet(cfg).eval()
    model.load_state_dict(ckpt["ema"])
    model = sampling_model(model.to(device), fast)
    diffusion = GaussianDiffusion(cfg.timesteps, cfg.schedule).to(device)
    if args.data is not None:  # --given's halves, or --trajectory's real pair: at the model's
        ds = data.PairedFolder(args.data, cfg.image_size, args.split)  # size and class ids
        truth = data.match_classes(ds.classes, classes, args.data, args.ckpt)[ds.masks.long()]
    if args.given is None:
        n = args.n or 16
        stems = [f"{i:05d}" for i in range(n)]
    else:
        n = min(args.n or len(ds), len(ds))
        stems, truth = ds.stems[:n], truth[:n]
        halves = ds.images[:n] if args.given == "images" else truth
        # the image's 3 channels are known and the mask's code generated, or the other way
        keep = ((torch.arange(6) < 3) == (args.given == "images")).view(1, 6, 1, 1).to(device)

    b, written, started = min(args.batch_size, n), [], time.time()
    ts = diffusion.sampling_timesteps(args.sampler, steps)  # --trajectory: at about
    frames = {ts[j]: None for j in np.linspace(0, len(ts) - 1, 8).round().astype(int)}  # 8 of them

    def recorded(x, t):  # the model, and what it sees and implies at those steps
        eps = model(x, t)
        if int(t[0]) in frames:  # x_0 by DDPM Eq. 4, clipped as in the samplers; RePaint: last
            x0 = diffusion._predict_xstart_from_eps(x, t, eps.float()).clamp(-1, 1)
            frames[int(t[0])] = x[:4].float().cpu(), x0[:4].cpu()
        return eps

    # Written beside out and swapped in when complete: an earlier sample stays whole until then.
    lock = data.folder_lock(out, beside=True)
    with lock, data.new_sample(out, stems, classes, args.force) as folder:
        for i, first in enumerate(range(0, n, b)):
            g = make_generator(device, SAMPLE_STREAM, args.seed, i)  # same seed and b: same pairs
            m, known = min(b, n - first), None
            if args.given is not None:  # padded with copies of the first: one shape, one compile
                v = halves[first : first + m].to(device)
                v = torch.cat([v, v[:1].expand(b - m, *v.shape[1:])])
                if args.given == "images":
                    x = torch.cat([data.to_unit(v), torch.zeros_like(v, dtype=torch.float)], 1)
                else:  # the mask's classes as points on the sphere (§3.2)
                    code = cfl.encode(v, k, cfg.mask_scheme)
                    x = torch.cat([torch.zeros_like(code), code], 1)
                known = Known(x, keep, args.resample)  # (b, 6, S, S) where keep is True
            with autocast(amp, device):
                net = recorded if args.trajectory and i == 0 else model  # costs nothing unasked
                pairs = generate(net, diffusion, cfg, k, Draw(b, args.sampler, steps), g, known)
            images, masks, unsure = (v[:m] for v in pairs)  # the first m of b
            colours = cfl.colorize(masks, k, cfg.mask_scheme)
            if palette is not None:  # a palette dataset's masks: its own colours, "P" PNGs
                colours = data.palette_colours(masks, classes, palette)
            names = stems[first : first + m]
            data.write_pairs(folder, names, (images, masks, colours), classes, palette)
            if i == 0:  # the overview: up to 16 pairs of the first batch
                data.write_file(folder / "grid.png", data.grid(images[:16], colours[:16]).save)
            if i == 0 and args.trajectory:  # its first pairs' denoising, step by step
                real, ts = None, torch.tensor(sorted(frames, reverse=True), device=device)
                if args.data is not None:  # above them, --data's first pair noised at those t
                    code = cfl.encode(truth[:1], k, cfg.mask_scheme)
                    x0 = torch.cat([data.to_unit(ds.images[:1]), code], 1).to(device)
                    noise = torch.randn((len(ts), *x0.shape[1:]), generator=g, device=device)
                    real = torch.cat([diffusion.q_sample(x0.expand_as(noise), ts, noise), x0]).cpu()
                given = known and (known.x[:4].cpu(), known.keep.cpu())  # shown as given
                final = images[:4], cfl.colorize(masks[:4], k, cfg.mask_scheme)
                decode = partial(cfl.decode_colours, n=k, scheme=cfg.mask_scheme)  # code -> colours
                picture = data.trajectory(frames, final, decode, given, real)
                data.write_file(folder / "trajectory.png", picture.save)
            written.append((images, masks, unsure))
            print(f"{first + m}/{n} pairs, {time.time() - started:.0f}s", flush=True)
        images, masks, unsure = (torch.cat(v) for v in zip(*written))
        coco = data.coco(masks, [f"images/{s}.png" for s in stems], classes, args.background)
        data.write_json(folder / "annotations.json", coco)  # each class's regions, COCO's way
    print(f"{out}: {n} pairs (images/, masks/, masks_color/, grid.png, annotations.json)")
    radius = cfl.min_distance(k, cfg.mask_scheme) / 2  # half the smallest distance of two codes
    print(f"{unsure.float().mean():.2%} of mask pixels ambiguous (> {radius:.3f} from all codes)")
    if args.given == "images":  # image -> mask is segmentation: scored against the truth
        accuracy, table = (masks == truth).float().mean(), metrics.iou_report(masks, truth, classes)
        print(f"image -> mask against {args.data} [{args.split}]: pixel accuracy {accuracy:.3f}")
        print(table[2])
    elif args.given == "masks" and data.synthetic_classes(args.data) is not None:
        real = ds.images[:n], ds.masks[:n]  # the built-in set's colours tell each pixel's class
        alignment = data.alignment_report(images, masks, data.synthetic_classes(args.data), real)
        print(f"mask -> image alignment {alignment}")
    return images, masks


# ---------------------------------------------------------------------------------- eval (§3.5)


def features_cache(ds):
    """The cache (cached) of the Inception features of a PairedFolder, for metrics.score: its
    file named by the folder's path, split and size; metrics.score keys it by the content."""
    where = Path(ds.root).resolve()
    name = f"eval-{where.name}-{hashlib.sha256(str(where).encode()).hexdigest()[:8]}"
    return partial(data.cached, f"{name}-{ds.split}-{ds.images.shape[-1]}")


def curve_pairs(model, diffusion, cfg, num_classes, amp=None):
    """The cfg.eval_n pairs `sample --seed <cfg.seed> --sampler dpm++sde` draws from model: those
    train --eval-every scores -> images uint8 (n, 3, S, S), masks long (n, S, S), on the CPU."""
    b, pairs = min(16, cfg.eval_n), []
    device = diffusion.betas.device  # where the model and its noise are
    for i in range(math.ceil(cfg.eval_n / b)):  # batches of b, as sample draws them
        g = make_generator(device, SAMPLE_STREAM, cfg.seed, i)
        with autocast(amp, device):
            pairs.append(
                generate(model, diffusion, cfg, num_classes, Draw(b, *CURVE_SAMPLER), g)[:2]
            )
    return [torch.cat(v)[: cfg.eval_n] for v in zip(*pairs)]


def sample_scores(model, diffusion, cfg, num_classes, yardstick, amp=None):
    """train --eval-every: SCORES of curve_pairs against yardstick = (a PairedFolder, the
    Inception)."""
    fake = curve_pairs(model, diffusion, cfg, num_classes, amp)
    real, cache = (yardstick[0].images, yardstick[0].masks), features_cache(yardstick[0])
    device = diffusion.betas.device
    scores = metrics.score(yardstick[1], real, fake, 50, device, None, cache)[0]
    return {n: scores[n] for n in SCORES}


def checkpoint_pairs(path, real, real_split, size, device):
    """eval REAL CKPT: the pairs of a checkpoint (best.pt, ckpt.pt) as train --eval-every drew
    them (curve_pairs; its eval_n, precision and seed) beside REAL at the checkpoint's image size
    -> (REAL's PairedFolder, fake images, fake masks in REAL's class ids)."""
    ckpt = load_checkpoint(path)
    cfg, best = Config(**ckpt["config"]), ckpt.get("best") or {}
    if size not in (None, cfg.image_size):
        raise ValueError(f"--image-size {size}: {path} draws {cfg.image_size}x{cfg.image_size}")
    cfg = replace(cfg, eval_n=best.get("protocol", {}).get("eval_n", cfg.eval_n))
    real_ds = data.PairedFolder(real, cfg.image_size, real_split)
    ids = data.match_classes(ckpt["classes"], real_ds.classes, path, real)  # its ids -> REAL's
    amp, *_ = fast = speedups(cfg, device, {"amp"} if "switches" in ckpt else ())  # as trained
    model = ResUNet(cfg).eval()
    model.load_state_dict(ckpt["ema"])
    model = sampling_model(model.to(device), fast)
    diffusion = GaussianDiffusion(cfg.timesteps, cfg.schedule).to(device)
    print(
        f"{path}: {cfg.eval_n} pairs, {CURVE_SAMPLER[0]} {CURVE_SAMPLER[1]} steps, seed {cfg.seed}"
    )
    images, masks = curve_pairs(model, diffusion, cfg, len(ckpt["classes"]), amp)
    return real_ds, images, ids[masks]


def evaluate(real, fake, size=None, real_split="all", fake_split="all", batch_size=50, device=None):
    """FID, KID, sFID and sKID (§3.5, metrics.score) of the pairs of folder FAKE (sample's) against
    REAL's at size S (data.eval_sets) -> metrics.distances' dict, each class named, with the sets"""
    for flag, value in (("--image-size", size), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: must be at least 1")
    device = pick_device(device)
    if Path(fake).is_file():  # a checkpoint: the pairs its training curve scored
        if fake_split != "all":
            raise ValueError(f"--fake-split {fake_split}: {fake} is a checkpoint, not a dataset")
        real_ds, *fake_pairs = checkpoint_pairs(fake, real, real_split, size, device)
    else:  # a dataset folder, sample's
        real_ds, fake_ds, fake_masks = data.eval_sets(real, fake, size, real_split, fake_split)
        fake_pairs = fake_ds.images, fake_masks
    start, inception = time.time(), metrics.load_inception()
    real_pairs = real_ds.images, real_ds.masks
    options = (batch_size, device, metrics.printer, features_cache(real_ds))
    scores, source = metrics.score(inception, real_pairs, fake_pairs, *options)
    for row in scores["per_class"]:  # each class's name and mask value beside its id
        row.update({k: real_ds.classes[row["class"]][k] for k in ("name", "value")})
    size, took = real_ds.images.shape[-1], time.time() - start
    print(f"{real} [{real_split}]: Inception features {source}\n{metrics.report(scores)}")
    print(f"({size}x{size} images, {took:.0f}s)")
    k = data.synthetic_classes(real)
    if k is not None:  # the built-in set's colours tell each pixel's class from the image alone
        aligned = data.alignment_score(*fake_pairs, k)
        shuffled = data.alignment_score(fake_pairs[0], fake_pairs[1].roll(1, 0), k)
        scores |= dict(alignment=aligned, alignment_shuffled=shuffled)
        print(f"alignment of the fake pairs {aligned:.3f} (shuffled masks {shuffled:.3f})")
    sets = dict(real=str(real), real_split=real_split, fake=str(fake), fake_split=fake_split)
    source = "cached" if source.startswith("loaded") else "computed"
    return dict(sets, image_size=size, real_features=source, **scores)


# -------------------------------------------------------------------------------- segment (§5.5)

# Deviation: a 16-channel ResUNet (3.8M parameters) at 64 x 64 for 300 steps, to train in minutes
# on a CPU; the paper's downstream ResUNet (its ref. [19]) is full size, its training not stated.
SEGMENT = dict(image_size=64, base_channels=16, channel_mults=(1, 2, 4, 8))
SEGMENT |= dict(steps=300, batch_size=16, lr=2e-3, seed=0, real_fraction=1.0)


def segment(roots, test_root, cfg, test_split="val", splits=("train",), merge="", out=None):
    """Train a segmentation ResUNet on dataset folders (real, generated; the first the real one,
    cfg.real_fraction of its pairs (Fig. 15), its classes merged by merge (Fig. 16)), in splits
    (one, or one each), with cfg's SEGMENT fields; -> the JSON's dict with per-class and mean IoU
    on test_root's real split. out: a folder for segment.pt, never overwritten."""
    ckpt_path = Path(out) / "segment.pt" if out else None
    if ckpt_path:  # before the work, not after it: a segment.pt there, or no writable folder
        data.check_writable(ckpt_path, "--out", made=True)
    device, start = pick_device(), time.time()
    test = data.PairedFolder(test_root, cfg.image_size, test_split)
    # the training pairs in the test set's class ids; the first folder's subset fixed by the seed
    subset = make_generator("cpu", SUBSET_STREAM, cfg.seed)
    images, masks, used = data.gather(roots, splits, test, cfg.real_fraction, subset, merge)
    images, masks = images.to(device), masks.to(device)

    torch.manual_seed(cfg.seed)
    model = ResUNet(cfg, 3, test.num_classes, time_embedding=False).to(device)
    amp = speedups(cfg, device)[0]  # cfg.amp False (--no-amp): fp32
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=device.type == "cuda" or None)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    size, millions = cfg.image_size, sum(p.numel() for p in model.parameters()) / 1e6
    print(f"segmentation ResUNet {millions:.2f}M parameters; {len(images)} pairs at {size}x{size}")
    print(f"{device.type}, {precision(amp, device)}")
    for step in range(1, cfg.steps + 1):  # the batch and its flips from (seed, step), as in train
        g = make_generator(device, BATCH_STREAM, cfg.seed, step - 1)
        idx = torch.randint(len(images), (cfg.batch_size,), generator=g, device=device)
        image, mask = data.flip(images[idx], masks[idx], g)
        with autocast(amp, device):
            logits = model(data.to_unit(image))  # (B, K, S, S)
        # Note: plain per-pixel cross-entropy, no class weights, no augmentation but flips.
        loss = F.cross_entropy(logits.float(), mask.long())
        optimizer_step(loss, opt, scaler, cfg.grad_clip)
        if step % cfg.log_every == 0 or step == cfg.steps:
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"segment: loss is {loss.item()}; try a lower --lr")
            print(f"step {step}/{cfg.steps}  loss {loss.item():.4f}", flush=True)

    # Note: IoU is taken at S x S, the test masks resized and cropped as the images are.
    model.eval()
    with torch.no_grad(), autocast(amp, device):
        batches = test.images.split(cfg.batch_size)
        pred = torch.cat([model(data.to_unit(b.to(device))).argmax(1).cpu() for b in batches])
    per_class, mean, table = metrics.iou_report(pred, test.masks, test.classes)
    seconds = round(time.time() - start, 1)
    print(f"{table}\n({len(test)} pairs of {test_root} [{test_split}], {seconds:.0f}s)")
    if ckpt_path:
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        state = dict(model=model.state_dict(), config=asdict(cfg), classes=test.classes)
        save_checkpoint(ckpt_path, dict(state, version=VERSION))
        print(f"weights in {ckpt_path}")
    result = dict(train=used, test=str(test_root), test_split=test_split, n_test=len(test))
    result |= dict(merge=merge, config={k: getattr(cfg, k) for k in SEGMENT})
    result["precision"] = str(amp or torch.float32)[6:]  # bfloat16, float16 or float32
    classes = [dict(c, iou=v) for c, v in zip(test.classes, per_class)]
    return dict(result, classes=classes, mean_iou=mean, seconds=seconds)


# ------------------------------------------------------------------------- bench: speed here

# Dense peak TFLOP/s of the tensor cores, (bf16, tf32, SMs of the whole chip), matched in this
# order against the CUDA device's name: NVIDIA's datasheets, the Ada whitepaper (RTX 4090),
# "with sparsity" halved; the V100 has no bf16 and no tf32: (fp16, fp32 CUDA cores, SMs).
PEAK_TFLOPS = {"H100 NVL": (835, 418, 132), "H100 PCIe": (756, 378, 114), "H100": (989, 495, 132)}
PEAK_TFLOPS |= {"H200 NVL": (835, 418, 132), "H200": (989, 495, 132), "A100": (312, 156, 108)}
PEAK_TFLOPS |= {"L40S": (362, 183, 142), "L40": (181, 90.5, 142), "L4": (121, 60, 58)}
PEAK_TFLOPS |= {"RTX 4090": (165, 82.6, 128), "V100-PCIE": (112, 14, 80), "V100": (125, 15.7, 80)}
BENCH_CONFIGS = {"paper": "paper", "small": "demo", "tiny": "tiny"}  # bench --config -> preset


def peak_tflops(name, sms=None):
    """(bf16 or fp16 as speedups() picks, tf32) dense peak TFLOP/s of the device called name
    with sms SMs (a MIG slice has a share of them); (None, None) if unknown."""
    half, tf32, chip = next((p for k, p in PEAK_TFLOPS.items() if k in name), (None, None, 1))
    share = (sms or chip) / chip
    return (half * share, tf32 * share) if half else (None, None)


def timed(fn, repeats, warmup=True):
    """Mean seconds of fn() over repeats calls, after an untimed one if warmup (compiling)."""
    if warmup:
        fn()
    return torch.utils.benchmark.Timer("fn()", globals=dict(fn=fn)).timeit(repeats).mean


def bench_step(cfg, fast, ds, diffusion):
    """The body of train's loop on one batch, fresh weights, fast's GPU switches -> step()."""
    (amp, compiled, channels_last), device = fast, ds.images.device
    torch.manual_seed(0)
    raw = ResUNet(cfg).to(device)
    x, t, noise = training_batch(ds, cfg, 0)
    if channels_last:
        raw = raw.to(memory_format=torch.channels_last)
        x, noise = (v.contiguous(memory_format=torch.channels_last) for v in (x, noise))
    params, ema_params = list(raw.parameters()), [p.detach().clone() for p in raw.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr, fused=device.type == "cuda" or None)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    mode = compiled if isinstance(compiled, str) else None  # compiled: True or a mode
    model = torch.compile(raw, mode=mode) if compiled else raw

    def step():
        with autocast(amp, device):
            loss = diffusion.training_losses(model, x, t, noise)["loss"].mean()
        optimizer_step(loss, opt, scaler, cfg.grad_clip)
        update_ema(ema_params, params, cfg.ema_decay)

    return step


def bench(config=None, repeats=None, profile=False):
    """What a user sizes a job by -> dict: train's step (paper config; demo on a CPU) in fp32 and
    bf16, on CUDA as train runs it too (img/s, MFU: counted FLOPs per second over the peak, peak
    memory), at batch 64 and autotuned; seconds for 16 pairs per sampler; profile: the last."""
    started, device = time.time(), pick_device()
    cuda = device.type == "cuda"
    config, repeats = config or ("paper" if cuda else "small"), repeats or (10 if cuda else 3)
    cfg = replace(Config(), **PRESETS[BENCH_CONFIGS[config]])
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    load = round(os.getloadavg()[0], 1)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else None
    peak = peak_tflops(name, sms) if cuda else (None, None)
    res = dict(device=name, torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M:%S"))
    res |= dict(config=config, image_size=cfg.image_size, batch_size=cfg.batch_size)
    res |= dict(repeats=repeats, load_average=load, peak_tflops=dict(bf16=peak[0], tf32=peak[1]))
    print(f"bench on {name}, torch {torch.__version__}: {config}, mean of {repeats}; load {load}")
    ds = data.PairedFolder("synthetic", cfg.image_size, "train")
    ds.images, ds.masks = ds.images.to(device), ds.masks.to(device)
    diffusion = GaussianDiffusion(cfg.timesteps, cfg.schedule).to(device)
    amp = speedups(cfg, device, {"amp"})[0]  # bf16, or fp16 before Ampere
    res["train"], flops, b, half = {}, None, cfg.batch_size, str(amp)[6:]
    # what a CPU trains with, and with --amp: bf16 is faster only where the CPU has bf16 units
    variants = [("eager fp32", (None, False, False), b), (f"eager {half}", (amp, False, False), b)]
    used = f"{half} + compile + channels_last"  # what train uses on CUDA: last, profiled
    if cuda:  # and with a larger batch, or inductor's autotuning without CUDA graphs
        variants += [(f"{used}, batch 64", (amp, True, True), 64)]
        variants += [(f"{used}, max-autotune", (amp, "max-autotune-no-cudagraphs", True), b)]
        variants += [(used, (amp, True, True), b)]
    for label, fast, batch in variants:
        step = bench_step(replace(cfg, batch_size=batch), fast, ds, diffusion)
        if flops is None:  # per image, the same for every variant: counted once, eager
            with FlopCounterMode(display=False) as counter:
                step()
            flops = counter.get_total_flops() / b
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        seconds = timed(step, repeats * (5 if cuda else 1))  # a GPU step is short: more of them
        tflops = flops * batch / seconds / 1e12
        top = peak[0] if fast[0] else peak[1]  # fp32 runs on the TF32 tensor cores
        mfu = tflops / top if top else None
        memory = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
        row = dict(images_per_s=batch / seconds, step_s=seconds, tflops=tflops, batch_size=batch)
        res["train"][label] = dict(row, mfu=mfu, peak_memory_gib=memory)
        note = f"{tflops:.3g} TFLOP/s, MFU {f'{mfu:.1%}' if mfu else 'n/a (peak unknown)'}"
        note += f", peak memory {memory:.1f} GiB" if cuda else ""
        print(f"  {label:<34}{f'{batch / seconds:.1f} img/s':>14}  {note}", flush=True)
    res["train_flops_per_step"] = flops * b
    if profile:  # three steps of the last variant, by their own time on the device (or host)
        with torch.profiler.profile() as prof:  # the host's activity, and CUDA's if present
            timed(step, 3, warmup=False)
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        res["profile"] = prof.key_averages().table(sort_by=sort, row_limit=10)
        print(f"profile: three training steps, top 10 by self time\n{res['profile']}")

    torch.manual_seed(0)
    amp, *_ = fast = speedups(cfg, device)  # what sample uses here
    print(f"sampling 16 pairs, {precision(amp, device)} as sample", flush=True)
    net = sampling_model(ResUNet(cfg).to(device).eval(), fast)

    def draw(sampler, steps):
        g = make_generator(device, SAMPLE_STREAM, 0, 0)
        with autocast(amp, device):
            generate(net, diffusion, cfg, 5, Draw(16, sampler, steps), g)

    draw("ddim", 2)  # the warm-up (compilation) with 2 steps: 250 would double a CPU's time
    res["sample"] = {}
    timings = [("ddpm", cfg.timesteps), ("ddim", 50), ("dpm++", 20), ("dpm++", 10)]
    for sampler, steps in timings + [("dpm++sde", 20)]:
        steps = min(steps, cfg.timesteps)
        seconds = timed(partial(draw, sampler, steps), repeats, warmup=False)
        res["sample"][f"{sampler}_{steps}_s"] = seconds
        print(f"  {f'{sampler}, {steps} steps':<34}{f'{seconds:.2f} s':>14}", flush=True)
    res["total_s"] = time.time() - started
    print(f"total {res['total_s']:.0f}s")
    return res


def plot(runs, x, y, out, marks=()):
    """The plot command: column y of each run's log.csv against x (training seconds or step),
    the rows that have it, one line per run, drawn by data.chart into out (a new PNG)."""
    data.check_writable(out, "--out", made=True)
    series, names = {}, [Path(run).name for run in runs]
    for run in map(Path, runs):
        csv = run / "log.csv"
        if not csv.is_file():
            raise data.DataError(f"{csv}: not found; give run folders of train")
        head, *rows = [r.split(",") for r in csv.read_text().splitlines()] or [[]]
        if x not in head or y not in head:
            raise data.DataError(f"{csv}: no {x} or {y} column (an older log?)")
        i, j = head.index(x), head.index(y)
        try:  # the rows that have y (the scores: every --eval-every steps)
            line = [(float(r[i]), float(r[j])) for r in rows if r[j]]
        except (ValueError, IndexError):
            why = "a row that is not numbers; not a log.csv of train"
            raise data.DataError(f"{csv}: {why}") from None
        # each run by its folder's name, or by its path where two folders share a name
        series[run.name if names.count(run.name) == 1 else str(run)] = line
        if not line:
            raise data.DataError(f"{csv}: no {y} in any row (--eval-every scores fid, kid, ...)")
    data.write_file(out, data.chart(series, x, y, marks).save)
    print(f"{out}: {y} against {x} of {len(series)} run" + "s" * (len(series) > 1))


# ---------------------------------------------------------------------------------- command line


def int_tuple(text):  # --channel-mults 1,2,4
    return tuple(int(v) for v in text.split(","))


def config_help():
    """{field: the comment beside it in Config}: each flag's -h sentence, written once."""
    found = [
        re.match(r" +(\w+): \w+ = .+?  # (.+)", line)
        for line in inspect.getsource(Config).splitlines()
    ]
    return {m[1]: m[2] for m in found if m}


def add_config_flags(parser, defaults, keep_defaults=False):
    """A flag per Config field (--image-size 64, --channel-mults 1,2,4, --no-amp); unset: None
    unless keep_defaults."""
    helps = config_help()
    for name, default in defaults.items():
        flag, text = "--" + name.replace("_", "-"), helps[name].replace("%", "%%")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
            continue
        kind = int_tuple if isinstance(default, tuple) else type(default)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        value = default if keep_defaults else None
        text, choices = f"{text} (default {shown})", CHOICES.get(name)
        parser.add_argument(flag, type=kind, default=value, choices=choices, help=text)


class Parser(argparse.ArgumentParser):
    """argparse's parser, its errors one line as every other error here (exit status 2)."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (-h lists the flags)\n")


def build_parser():
    """The commands; train gets one flag per Config field, segment one per SEGMENT field."""
    parser = Parser(prog="simgen.py", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train", help="train on a dataset folder or 'synthetic'")
    p.add_argument("data", nargs="?", help="dataset folder or 'synthetic' (default: the demo)")
    p.add_argument("--out", help="run folder (default runs/<data>-<preset>); rerun to resume")
    p.add_argument("--preset", choices=PRESETS, help="tiny (tests), demo (CPU), paper (default)")
    add_config_flags(p, {f.name: f.default for f in fields(Config) if f.name != "data"})

    p = commands.add_parser("sample", help="generate image-mask pairs from a checkpoint")
    p.add_argument("ckpt", help="a train run's ckpt.pt or best.pt")
    p.add_argument("--out", help="output folder (default samples/<run folder name>)")
    p.add_argument("--n", type=int, help="pairs (default 16; with --given, all of the split's)")
    p.add_argument("--sampler", default="ddpm", choices=SAMPLERS, help="ddpm: all T steps (paper)")
    p.add_argument("--steps", type=int, help="steps of ddim, dpm++, dpm++sde (default 20)")
    p.add_argument("--given", choices=("images", "masks"), help="keep this half of --data's")
    p.add_argument("--data", help="dataset folder or 'synthetic' whose pairs --given takes")
    p.add_argument("--split", default="val", help="split of --data (default val)")
    p.add_argument("--resample", type=int, default=1, help="RePaint's rounds per step (1)")
    p.add_argument("--seed", type=int, default=0, help="the noise: same seed, same pairs (0)")
    p.add_argument("--batch-size", type=int, default=16, help="pairs drawn at once (16)")
    p.add_argument("--force", action="store_true", help="replace an earlier sample in --out")
    p.add_argument("--background", default="background", help="class left out of annotations")
    p.add_argument("--trajectory", action="store_true", help="also trajectory.png: the process")
    for name in SPEED_FIELDS:  # default: the checkpoint's config, on CUDA only
        text = f"{config_help()[name]}; default: as the checkpoint was trained"
        p.add_argument(
            "--" + name.replace("_", "-"), action=argparse.BooleanOptionalAction, help=text
        )

    p = commands.add_parser("eval", help="FID, KID, sFID, sKID of generated pairs against real")
    p.add_argument("real", help="dataset folder or 'synthetic'; its features are cached")
    p.add_argument(
        "fake", help="dataset folder (sample's), or a checkpoint: the pairs its curve scored"
    )
    p.add_argument("--json", help="write the scores here")
    p.add_argument("--real-split", default="all", help="train, val, test or all (all)")
    p.add_argument("--fake-split", default="all", help="train, val, test or all (all)")
    p.add_argument("--image-size", type=int, help="default: FAKE's image size (else 256)")
    p.add_argument("--batch-size", type=int, default=50, help="images per Inception call (50)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if there is one)")

    p = commands.add_parser("segment", help="train a segmentation ResUNet, IoU on a real split")
    p.add_argument("train", nargs="+", help="dataset folders (real, generated); first: the real")
    p.add_argument("--test", required=True, help="real dataset folder for the IoU")
    p.add_argument("--test-split", default="val", help="split of --test scored (val)")
    p.add_argument("--train-split", default="train", help="one split, or one each: train,all")
    p.add_argument("--merge", default="", help="the first TRAIN's classes merged: fat=tissue,...")
    p.add_argument("--out", help="folder for segment.pt")
    p.add_argument("--json", help="write the IoU table here")
    add_config_flags(p, SEGMENT, keep_defaults=True)
    p.add_argument("--no-amp", dest="amp", action="store_false", help="fp32, not bf16 autocast")

    p = commands.add_parser("plot", help="the training curves of runs (their log.csv), one PNG")
    p.add_argument("runs", nargs="+", help="run folders of train --eval-every")
    columns = ("fid", "kid", "sfid", "skid", "loss", "lr")
    p.add_argument("--y", default="kid", choices=columns, help="log.csv's column drawn (kid)")
    p.add_argument(
        "--x", default="seconds", choices=("seconds", "step"), help="the x axis (seconds)"
    )
    p.add_argument("--out", default="curves.png", help="the PNG written; never replaced")
    p.add_argument("--mark", type=float, action="append", default=[], help="a y line, e.g. 0.16")

    p = commands.add_parser("bench", help="speed of training and sampling here")
    p.add_argument("--json", help="also write every number here")
    p.add_argument("--config", choices=BENCH_CONFIGS, help="paper (CUDA), small (CPU), tiny")
    p.add_argument("--repeats", type=int, help="timed repeats, median shown (10 CUDA, 3 CPU)")
    p.add_argument("--profile", action="store_true", help="also profile the last training step")
    return parser


def train_config(args):
    """Parsed train arguments -> (Config, the fields given as flags (and DATA), those the preset
    set, the run folder)."""
    preset = args.preset or ("demo" if args.data is None else "paper")
    if args.data is None and args.preset is None:
        print("no DATA given: training on the built-in synthetic dataset with --preset demo")
    flags = {f.name: getattr(args, f.name) for f in fields(Config) if f.name != "data"}
    typed = {k: v for k, v in flags.items() if v is not None} | {"data": args.data or "synthetic"}
    cfg = replace(Config(), **PRESETS[preset] | typed)  # paper: {}
    out = Path(args.out or Path("runs") / f"{Path(cfg.data).name}-{preset}")
    return cfg, set(typed), set(PRESETS[preset]), out


def main(argv=None):
    args, out = build_parser().parse_args(argv), None
    stop = signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill stops as Ctrl-C does
    try:  # errors the user can fix are one line and exit status 1, never a traceback
        if getattr(args, "json", None):  # before the work, not after it
            data.check_writable(Path(args.json), "--json")
        if args.command == "train":
            cfg, typed, preset, out = train_config(args)
            train(cfg, out, typed, preset)
        elif args.command == "sample":
            args.out = args.out or Path("samples") / Path(args.ckpt).resolve().parent.name
            sample(args)
        elif args.command == "plot":
            plot(args.runs, args.x, args.y, Path(args.out), args.mark)
        elif args.command == "bench":
            result = bench(args.config, args.repeats, args.profile)
        elif args.command == "eval":
            sets = (args.image_size, args.real_split, args.fake_split, args.batch_size, args.device)
            result = evaluate(args.real, args.fake, *sets)
        elif args.command == "segment":
            cfg = replace(Config(), **{k: getattr(args, k) for k in [*SEGMENT, "amp"]})
            test = (args.test_split, args.train_split.split(","), args.merge, args.out)
            result = segment(args.train, args.test, cfg, *test)
        if args.command in ("eval", "segment", "bench") and args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
            print(f"numbers in {args.json}")
    except (data.DataError, metrics.MetricsError, FloatingPointError, ValueError, OSError) as e:
        named = isinstance(e, OSError) and e.filename  # the path beside errno's words
        print(f"error: {f'{e.filename}: {e.strerror}' if named else e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        resumes = out is not None and (out / "ckpt.pt").exists()
        kept = dict(  # what is true of each command's files when it is stopped
            train="nothing is half-written, and a run goes on from its last checkpoint when rerun"
            if resumes
            else "stopped before its first checkpoint: nothing kept, a rerun starts anew",
            sample="nothing is half-written; --out is as it was",
            eval="no scores written; the real set's features are cached once computed in full",
        ).get(args.command, "no weights or scores written; a rerun starts from the beginning")
        print(f"error: interrupted; {kept}", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        signal.signal(signal.SIGTERM, stop)


if __name__ == "__main__":
    main()
