"""SimGen: one DDPM that generates a surgical image and its segmentation mask together.

Reference implementation of Bhat, Bose, Nwoye, Padoy, "SimGen: A Diffusion-Based Framework
for Simultaneous Surgical Image and Segmentation Mask Generation" (2024). The mask's classes
are coloured by the Canonical Fibonacci Lattice (cfl.py, §3.2), concatenated with the image
into 6 channels, and denoised by a residual U-Net (§3.3) over T = 250 DDPM steps (§3.4);
generated masks are decoded back to classes by cosine similarity.

Reading order: Config -> ResUNet -> GaussianDiffusion (DDPM Algorithms 1 and 2, and the
extensions: DDIM, DPM-Solver++, RePaint's conditional sampling) -> train -> sample. What
follows them is engineering: the run's plumbing, the GPU-only fast path, output folders, and
the tools eval, segment and bench.

Commands:
    python simgen.py train [DATA] [--out DIR] [--preset tiny|demo|paper] [--steps N]
                     [--<field> V ...]
    python simgen.py sample CKPT [--out DIR] [--n N] [--sampler ddpm|ddim|dpm++|dpm++sde]
                     [--steps K] [--seed S] [--batch-size B] [--force]
                     [--given images|masks --data DATA [--split val] [--resample R]]
    python simgen.py eval REAL FAKE [--json PATH] [--real-split all] [--fake-split all]
                     [--image-size S]
    python simgen.py segment TRAIN [TRAIN ...] --test REAL [--test-split val]
                     [--train-split train[,all...]] [--real-fraction F] [--out DIR]
                     [--json PATH] [--steps N] [--<field> V ...]
    python simgen.py bench [--json PATH] [--config paper|small] [--repeats N]
DATA is a dataset folder (data.py), "synthetic" (5 classes) or "synthetic:K" (K classes,
2-64); no DATA trains the demo on the synthetic set.
Multi-GPU: torchrun --nproc_per_node=N simgen.py train DATA ...
"""

import argparse
import contextlib
import copy
import fcntl
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.profiler
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import cfl
import data
import metrics

VERSION = 1  # checkpoint format
SAMPLERS = ("ddpm", "ddim", "dpm++", "dpm++sde")  # GaussianDiffusion.sample_loop's


# ========================================================================================== config


@dataclass
class Config:
    # model (§3.3; sizes from §4.2)
    image_size: int = 256  # pixels per side of image and mask
    base_channels: int = 64  # feature maps at full resolution
    channel_mults: tuple = (1, 2, 4, 8)  # width of each level, in base_channels
    # diffusion (§3.4)
    timesteps: int = 250  # T, forward-process steps
    schedule: str = (
        "linear"  # beta schedule: linear (DDPM, scaled to T) | cosine (Nichol & Dhariwal)
    )
    mask_scheme: str = "cfl"  # mask code (cfl.SCHEMES): cfl (§3.2) | gray | random (§5.3 ablation)
    # training (§4.2)
    steps: int = 200_000  # optimizer steps; Note: the paper gives 5 V100-days, not a step count
    batch_size: int = 16  # global batch, split over DDP ranks
    lr: float = 1e-4  # Adam learning rate
    ema_decay: float = 0.9999  # EMA of the weights, used for sampling
    grad_clip: float = 1.0  # max global gradient norm
    seed: int = 0  # init, batches, noise: all randomness of a step is a function of (seed, step)
    amp: bool = True  # bf16 autocast (CUDA only)
    compile: bool = True  # torch.compile (CUDA only)
    channels_last: bool = True  # NHWC memory format (CUDA only)
    # io
    data: str = "synthetic"  # dataset folder or "synthetic"
    log_every: int = 100  # steps between progress lines (the same steps on every DDP rank)
    ckpt_every: int = 5000  # steps between checkpoints and sample grids
    sample_n: int = 16  # pairs in each sample grid
    sampler: str = "ddpm"  # the grids' sampler (SAMPLERS); ddpm takes T steps, as the paper does
    sampler_steps: int = 20  # steps of the other samplers

    def __post_init__(self):
        """Every flag is checked here, before any work is done or any folder is made."""
        self.channel_mults = tuple(int(m) for m in self.channel_mults)

        def require(name, ok, need):
            if not ok:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} {getattr(self, name)}: {need}")

        for name in (
            "image_size",
            "base_channels",
            "timesteps",
            "steps",
            "batch_size",
            "log_every",
            "ckpt_every",
            "sample_n",
            "sampler_steps",
        ):
            require(name, getattr(self, name) >= 1, "must be >= 1")
        require("lr", self.lr > 0, "must be > 0")
        require("grad_clip", self.grad_clip > 0, "must be > 0")
        require("seed", self.seed >= 0, "must be >= 0")
        require("sampler", self.sampler in SAMPLERS, f"must be one of {', '.join(SAMPLERS)}")
        require("ema_decay", 0 <= self.ema_decay < 1, "must be in [0, 1)")
        mults = self.channel_mults
        require(
            "channel_mults", len(mults) and min(mults) >= 1, "must be positive integers, e.g. 1,2,4"
        )
        require("schedule", self.schedule in ("linear", "cosine"), "use linear or cosine")
        require(
            "mask_scheme", self.mask_scheme in cfl.SCHEMES, f"use one of {', '.join(cfl.SCHEMES)}"
        )
        # beta_T = 0.02 * 1000 / T must stay below 1
        require(
            "timesteps",
            self.schedule != "linear" or self.timesteps > 20,
            "the linear schedule needs T > 20",
        )
        levels = len(mults)  # one downsampler per level
        require("image_size", self.image_size % 2**levels == 0, f"must be divisible by 2^{levels}")


PRESETS = {
    "paper": {},  # §4.2: 256 x 256, 64 channels, (1, 2, 4, 8), T = 250, batch 16, Adam 1e-4
    # README main job: under 5 minutes on a 2-core CPU, sampling with 250 DDPM steps included.
    # Deviation: 32 x 32, 16 channels, 3 levels, 1000 steps at lr 2e-3 with a short EMA.
    "demo": dict(
        image_size=32,
        base_channels=16,
        channel_mults=(1, 2, 4),
        steps=1000,
        batch_size=32,
        lr=2e-3,
        ema_decay=0.995,
        ckpt_every=1000,
        sample_n=16,
    ),
    # tests: seconds
    "tiny": dict(
        image_size=16,
        base_channels=8,
        channel_mults=(1, 2),
        timesteps=50,
        steps=20,
        batch_size=4,
        lr=1e-3,
        ema_decay=0.9,
        ckpt_every=10,
        sample_n=4,
    ),
}


# =============================================================== the residual U-Net (§3.3, Fig. 3)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of the timesteps (Transformer positions, as DDPM): (B,) -> (B, dim)"""
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * i / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def norm(c):
    # Note: at most 32 groups as in DDPM's U-Net, and at least 4 channels in each: a group of
    # one channel is InstanceNorm, which erases each image's mean colour (narrow nets drift).
    return nn.GroupNorm(math.gcd(32, c // 4), c)


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
    forward(x (B, in, H, W), t (B,) long in {0..T-1} or None) -> (B, out, H, W)
    """

    def __init__(self, cfg, in_channels=6, out_channels=6, time_embedding=True):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mults]
        # Note: the bottleneck is twice the last level: the downsampler doubles the channels.
        below = widths[1:] + [2 * widths[-1]]
        self.base = widths[0]
        t_dim = 4 * self.base if time_embedding else 0  # Note: DDPM's 4x width for t
        self.time_mlp = None
        if time_embedding:
            self.time_mlp = nn.Sequential(
                nn.Linear(self.base, t_dim), nn.GELU(), nn.Linear(t_dim, t_dim)
            )
        self.init = nn.Conv2d(in_channels, self.base, 3, padding=1)
        self.enc = nn.ModuleList(level(c, c, t_dim) for c in widths)
        # Note: 4x4 stride-2 convolutions down and transposed convolutions up (DCGAN-style).
        self.down = nn.ModuleList(
            nn.Conv2d(c, b, 4, stride=2, padding=1) for c, b in zip(widths, below)
        )
        self.mid = level(below[-1], below[-1], t_dim)
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(b, c, 4, stride=2, padding=1) for c, b in zip(widths, below)
        )
        # Note: both ConvBlock outputs of a level are concatenated with the upsampled features
        # in the first decoder block of that level (and, at full resolution, the initial
        # conv's, as §3.3 says): 3C inputs, 4C at the top.
        self.dec = nn.ModuleList(
            level(3 * c + (self.base if i == 0 else 0), c, t_dim) for i, c in enumerate(widths)
        )
        self.out = nn.Sequential(
            norm(self.base), nn.GELU(), nn.Conv2d(self.base, out_channels, 3, padding=1)
        )
        # Note: the last conv starts at zero (improved-diffusion): eps_theta = 0 at first, loss 1.
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x, t=None):
        temb = None
        if self.time_mlp is not None:
            temb = self.time_mlp(timestep_embedding(t, self.base))  # (B, 4C)
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


# ================================================================ diffusion (DDPM, Ho et al. 2020)


def get_named_beta_schedule(name, T):
    """beta_1..beta_T as float64 numpy (T,)."""
    if name == "linear":
        # DDPM's 1e-4..0.02 for T = 1000, scaled so that T = 250 still ends near pure noise.
        scale = 1000 / T
        return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)

    def f(t):  # Improved DDPM (Nichol & Dhariwal 2021) Eq. 17: alpha_bar(t) = f(t) / f(0)
        return math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # s = 0.008

    # beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}, clipped at 0.999 as in their §3.2
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
        # alpha_bar_{t-1}, alpha_bar_0 = 1
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        buffers = dict(
            betas=betas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),  # DDPM Eq. 4: mean of q(x_t | x_0)
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),  # DDPM Eq. 4: its std
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1),
            # DDPM Eq. 7: beta~_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t
            posterior_variance=betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            # DDPM Eq. 7: mu~_t = coef1 x_0 + coef2 x_t
            posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev)
            * np.sqrt(alphas)
            / (1.0 - alphas_cumprod),
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
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0): DDPM Eq. 6-7."""
        mean = (
            self._extract(self.posterior_mean_coef1, t, x_t) * x_start
            + self._extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        return (
            mean,
            self._extract(self.posterior_variance, t, x_t),
            self._extract(self.posterior_log_variance_clipped, t, x_t),
        )

    def _predict_xstart_from_eps(self, x_t, t, eps):
        # DDPM Eq. 4 solved for x_0: x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        # The same equation solved for eps: the noise implied by a (clipped) x_0 prediction
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart
        ) / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t)

    def p_mean_variance(self, model, x, t, clip_denoised=True):
        """p_theta(x_{t-1} | x_t), variance fixed at beta~_t (improved-diffusion's "fixed small").

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
        return dict(
            mean=mean, variance=variance, log_variance=log_variance, pred_xstart=pred_xstart
        )

    def p_sample(self, model, x, t, generator=None):
        """One ancestral step x_t -> x_{t-1}: DDPM Algorithm 2, lines 3-4."""
        out = self.p_mean_variance(model, x, t)
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))  # line 3: z = 0 at paper t = 1
        return dict(
            sample=out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise,
            pred_xstart=out["pred_xstart"],
        )

    @torch.no_grad()
    def p_sample_loop(self, model, shape, generator=None, device=None):
        """DDPM Algorithm 2: x_T ~ N(0, I), then T ancestral steps. -> x_0 (shape) in [-1, 1]."""
        return self.sample_loop(model, shape, "ddpm", generator=generator, device=device)

    def training_losses(self, model, x_start, t, noise=None):
        """DDPM Algorithm 1 / Eq. 14: ||eps - eps_theta(x_t, t)||^2, mean over 6 channels (§3.4).

        :param x_start: (B, C, H, W) in [-1, 1]; t: (B,) long; noise: (B, C, H, W) or None
        :return: dict loss: (B,) per-sample loss
        """
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        mse = (noise - model(x_t, t).float()).square().mean(dim=tuple(range(1, x_start.ndim)))
        return dict(loss=mse)

    def ddim_sample(self, model, x, t, t_prev, eta=0.0, generator=None):
        """One DDIM step (Song et al. 2021, Eq. 12) from t to t_prev < t; t_prev = -1 gives x_0.

        Deviation: an extension, not in the paper (which samples with DDPM); with every step and
        eta = 1 it is DDPM Algorithm 2 again. eta = 0 draws no noise: deterministic given x_T.
        """
        out = self.p_mean_variance(model, x, t)
        # consistent with the clipped x_0
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        a_t, a_prev = self._extract(self.alphas_cumprod, t, x), self._alpha_bar(t_prev, x)
        x_prev = out["pred_xstart"] * a_prev.sqrt()
        if eta == 0:
            return x_prev + (1 - a_prev).sqrt() * eps
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()  # DDIM Eq. 16
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        return x_prev + (1 - a_prev - sigma**2).sqrt() * eps + sigma * noise

    def dpm_solver_sample(
        self, model, x, t, t_prev, previous=None, generator=None, stochastic=False
    ):
        """One step of DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) from t to t_prev < t.

        Deviation: an extension, not in the paper. It integrates the probability-flow ODE in
        its data-prediction form, x_t = (s_t / s_s) x_s + s_t * integral of e^lambda x_theta
        d lambda, with lambda_t = log(a_t / s_t) (a_t = sqrt(alpha_bar_t), s_t = sqrt(1 -
        alpha_bar_t)) taken from the checkpoint's own discrete schedule. x_theta is the
        clipped x_0 of DDPM Eq. 4; it is held linear in lambda between steps (second order),
        or constant (first order) at the first step and the last, which lands on x_0.
        stochastic: SDE-DPM-Solver++(2M), the same multistep scheme for the reverse SDE instead of
        the ODE (Lu's SDE variant, in diffusers as "sde-dpmsolver++"); its first-order step is
        x_t = (s_t / s_s) e^{-h} x_s + a_t (1 - e^{-2h}) x_theta + s_t sqrt(1 - e^{-2h}) z, DDPM's
        posterior sample. The noise corrects errors of the network that the ODE carries along.
        :param previous: (x_theta, lambda) of the step before, or None
        :return: (x_{t_prev}, (x_theta, lambda) of this step for the next one)
        """
        x0 = self.p_mean_variance(model, x, t)["pred_xstart"]  # x_theta(x_t, t), in [-1, 1]
        a_bar, a_bar_prev = self._extract(self.alphas_cumprod, t, x), self._alpha_bar(t_prev, x)
        lam = 0.5 * (a_bar / (1 - a_bar)).log()  # lambda_t = log(a_t / s_t)
        # To x_0: s = 0, lambda = inf, e^{-h} = 0, so x_0 = x_theta. (A host sync per step on CUDA,
        # short beside one U-Net call.)
        if bool((t_prev < 0).all()):
            return x0, (x0, lam)
        lam_prev = 0.5 * (a_bar_prev / (1 - a_bar_prev)).log()
        h = lam_prev - lam  # Algorithm 2: h_i = lambda_{t_i} - lambda_{t_{i-1}} > 0
        d = x0
        if previous is not None:  # Algorithm 2: r_i = h_{i-1} / h_i, D_i from the last two x_theta
            x0_before, lam_before = previous
            r = (lam - lam_before) / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_before
        ratio = ((1 - a_bar_prev) / (1 - a_bar)).sqrt()  # s_{t_i} / s_{t_{i-1}}
        # Algorithm 2: x_{t_i} = (s_{t_i} / s_{t_{i-1}}) x_{t_{i-1}} - a_{t_i} (e^{-h_i} - 1) D_i
        if not stochastic:
            return ratio * x - a_bar_prev.sqrt() * torch.expm1(-h) * d, (x0, lam)
        # The SDE step, with D_i as above: (s_{t_i} / s_{t_{i-1}}) e^{-h_i} x_{t_{i-1}}
        # + a_{t_i} (1 - e^{-2 h_i}) D_i + s_{t_i} sqrt(1 - e^{-2 h_i}) z
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        decay = torch.exp(-2 * h)  # e^{-2h}
        mean = ratio * torch.exp(-h) * x + a_bar_prev.sqrt() * (1 - decay) * d
        return mean + (1 - a_bar_prev).sqrt() * (1 - decay).sqrt() * noise, (x0, lam)

    def _alpha_bar(self, t, x):
        """alpha_bar_t broadcast against x, with alpha_bar = 1 at t = -1 (x_0, no noise)."""
        a = self._extract(self.alphas_cumprod, t.clamp(min=0), x)
        return a.where(t.view_as(a) >= 0, 1.0)

    def sampling_timesteps(self, sampler, steps, spacing=None):
        """The descending timesteps a sampler visits: all T for ddpm; else about `steps` of them,
        evenly spaced in t (DDIM's "uniform" skip; ddim's default) or in lambda_t = log(a_t / s_t)
        (DPM-Solver's "logSNR" spacing; dpm++'s default), rounded to the nearest timestep.

        Note: dpm++ takes even lambda steps. Even t steps leave its last step from t ~ T/K to 0
        spanning half the lambda range, where its second-order extrapolation (r_i << 1) is
        least accurate; the README measures both.
        """
        if sampler == "ddpm":
            return list(range(self.num_timesteps - 1, -1, -1))
        if (spacing or ("lambda" if sampler.startswith("dpm++") else "t")) == "t":
            ts = np.linspace(0, self.num_timesteps - 1, steps).round().astype(np.int64)
        else:
            a_bar = self.alphas_cumprod.double().cpu().numpy()
            lam = 0.5 * np.log(a_bar / (1 - a_bar))  # decreasing in t
            ts = np.abs(lam[None] - np.linspace(lam[-1], lam[0], steps)[:, None]).argmin(1)
        return np.unique(ts)[::-1].tolist()

    def q_resample(self, x_prev, t_prev, t, generator=None):
        """x_t ~ q(x_t | x_{t_prev}) = N(sqrt(a_t / a_prev) x_prev, (1 - a_t / a_prev) I): DDPM
        Eq. 4 between two noise levels; RePaint's step back up (Lugmayr et al. 2022, Algorithm 1
        line 9)."""
        ratio = self._extract(self.alphas_cumprod, t, x_prev) / self._alpha_bar(t_prev, x_prev)
        noise = torch.randn(x_prev.shape, generator=generator, device=x_prev.device)
        return ratio.sqrt() * x_prev + (1 - ratio).sqrt() * noise

    @torch.no_grad()
    def sample_loop(
        self,
        model,
        shape,
        sampler="ddpm",
        steps=None,
        known=None,
        keep=None,
        resample=1,
        generator=None,
        device=None,
    ):
        """x_T ~ N(0, I) -> x_0 (shape) in [-1, 1] with sampler "ddpm" (Algorithm 2), "ddim"
        (eta = 0), "dpm++" (DPM-Solver++(2M)) or "dpm++sde" (its SDE form) on
        sampling_timesteps(sampler, steps), or on `steps` itself when it is a list of descending
        timesteps.

        Conditional sampling (an extension; RePaint, Lugmayr et al. 2022, Algorithm 1): the
        channels where `keep` (bool, broadcastable to shape) is True are given by `known` (shape,
        in [-1, 1]). Before each step they are replaced by a fresh x_t ~ q(x_t | known) (its line
        5), so the network denoises the unknown channels beside a correctly noised known half.
        Plain replacement (resample = 1) is biased: the unknown half's early steps never see the
        known half's details. resample = R repeats each step R times, going back to level t by
        q_resample in between (its lines 8-10), which harmonises the two halves.
        """
        x = torch.randn(shape, generator=generator, device=device)
        ts = steps if isinstance(steps, list) else self.sampling_timesteps(sampler, steps)
        history = None  # DPM-Solver++(2M): the previous step's x_theta and lambda
        for i, i_prev in zip(ts, ts[1:] + [-1]):
            t = torch.full((shape[0],), i, dtype=torch.long, device=x.device)
            t_prev = torch.full_like(t, i_prev)
            for r in range(resample):
                if known is not None:  # RePaint line 5: the known half at noise level t, DDPM Eq. 4
                    noise = torch.randn(x.shape, generator=generator, device=x.device)
                    x = torch.where(keep, self.q_sample(known, t, noise), x)
                if sampler == "ddpm":
                    x_prev = self.p_sample(model, x, t, generator)["sample"]
                elif sampler == "ddim":
                    x_prev = self.ddim_sample(model, x, t, t_prev)
                else:  # dpm++ or dpm++sde
                    x_prev, state = self.dpm_solver_sample(
                        model, x, t, t_prev, history, generator, stochastic=sampler == "dpm++sde"
                    )
                if r + 1 < resample and i_prev >= 0:  # RePaint line 9: back up to level t, again
                    x = self.q_resample(x_prev, t_prev, t, generator)
            x = x_prev
            history = state if sampler.startswith("dpm++") else None
        return torch.where(keep, known, x) if known is not None else x


# =========================================================================================== train


def training_batch(images, masks, num_classes, cfg, step, rank=0, world=1, channels_last=False):
    """This rank's share of step's batch: DDPM Algorithm 1 lines 2-4, made where images live.

    :param images: uint8 (N, 3, S, S), masks: uint8 (N, S, S) class ids: the whole training set
    :return: x_0 (B, 6, S, S) in [-1, 1], t (B,) long, noise (B, 6, S, S); B = batch_size / world
    """
    device, b = images.device, cfg.batch_size // world
    # Every draw comes from (seed, step): a resumed run repeats it exactly.
    g = make_generator(device, BATCH_STREAM, cfg.seed, step)  # the global batch, on every rank
    idx = torch.randint(len(images), (cfg.batch_size,), generator=g, device=device)
    idx = idx[rank * b : (rank + 1) * b]  # this rank's share of it
    g = make_generator(device, RANK_STREAM, cfg.seed, step, rank)  # its flips, t and noise
    image, mask = data.flip(images[idx], masks[idx], g)
    # line 2, x_0 ~ q(x_0): the image beside its mask's code, classes as points on the sphere
    # (§3.2), 6 channels in [-1, 1]. check=False: the id range was checked when the data loaded.
    code = cfl.encode(mask, num_classes, cfg.mask_scheme, check=False)  # (B, 3, S, S)
    x = torch.cat([data.to_unit(image), code], 1)  # (B, 3+3, S, S)
    t = torch.randint(cfg.timesteps, (b,), generator=g, device=device)  # line 3: t ~ U{1..T}
    noise = torch.randn(x.shape, generator=g, device=device)  # line 4: eps ~ N(0, I)
    if channels_last:  # the fast path's memory layout
        x = x.contiguous(memory_format=torch.channels_last)
        noise = noise.contiguous(memory_format=torch.channels_last)
    return x, t, noise


def train_step(model, opt, scaler, diffusion, x, t, noise, cfg, sp):
    """Algorithm 1 line 5, a gradient step on ||eps - eps_theta(x_t, t)||^2 -> the mean loss, a
    0-d tensor left unread: reading it waits for the GPU (Progress reads it now and then)."""
    with autocast(sp, x.device):
        loss = diffusion.training_losses(model, x, t, noise)["loss"].mean()
    optimizer_step(loss, opt, scaler, cfg.grad_clip)
    return loss.detach()


def train(cfg, out, explicit=()):
    """Train SimGen on cfg.data, resuming from out/ckpt.pt when it exists. -> the checkpoint path.

    :param explicit: the fields the user set (preset or flag); on resume they must agree with
        the checkpoint's config, except the RESUMABLE ones. On a CPU, amp, compile and
        channels_last run only when explicit.
    """
    data.check_root(cfg.data)  # before the run folder is made
    rank, world, device = setup_distributed()
    out = Path(out)
    with folder_lock(out) if rank == 0 else contextlib.nullcontext():  # one run per folder
        run = setup(cfg, out, explicit, rank, world, device)  # resumed if out holds a checkpoint
        cfg, sp, diffusion = run.cfg, run.speed, run.diffusion
        model = fast_path(run.raw, run.ema, run.opt, sp, device, world)  # GPU speed-ups
        params, ema_params = list(run.raw.parameters()), list(run.ema.parameters())
        csv = out / "log.csv" if rank == 0 else None  # a row per progress line
        progress = Progress(
            cfg, run.step, run.seconds, run.log, world, csv, out, what_is_kept(out, run.step)
        )
        pairs = None
        for step in range(run.step, cfg.steps):  # DDPM Algorithm 1: repeat until converged
            # lines 2-4: x_0 with its CFL-coded mask, t ~ Uniform({1..T}), eps ~ N(0, I)
            x, t, noise = training_batch(
                run.images, run.masks, len(run.classes), cfg, step, rank, world, sp.channels_last
            )
            # line 5: a gradient step on ||eps - eps_theta(x_t, t)||^2, with x_t from DDPM Eq. 4:
            # x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
            loss = train_step(model, run.opt, run.scaler, diffusion, x, t, noise, cfg, sp)
            # the EMA of the weights, which samples; warmed up, so early grids forget the init
            update_ema(ema_params, params, min(cfg.ema_decay, (1 + step) / (10 + step)))

            run.step = step + 1
            progress.add(run.step, loss)
            due = run.step % cfg.ckpt_every == 0 or run.step == cfg.steps
            if due or run.step % cfg.log_every == 0:
                progress.report(run.step)  # the mean loss since the last line: waits for the GPU
            if due:
                pairs = save_run(run, out, progress)
        finish(run, out, progress, pairs)
    return out / "ckpt.pt"


# ========================================================================================== sample


@torch.no_grad()
def generate(
    model,
    diffusion,
    cfg,
    sp,
    num_classes,
    n,
    generator,
    device,
    sampler="ddpm",
    steps=None,
    given=None,
    resample=1,
    batch=None,
):
    """Sample n pairs (DDPM Algorithm 2, or another sampler) and decode their masks.

    :param sampler, steps: GaussianDiffusion.sample_loop's; steps is ignored by ddpm (T steps)
    :param given: None, or ("images", uint8 (n, 3, S, S)) or ("masks", class ids (n, S, S)):
        that half is kept and the other generated from it (sample_loop's conditional sampling)
    :param batch: draw this many (>= n) and keep the first n: one shape for every batch, so a
        compiled model is not compiled again for a shorter last batch.
    :return: images uint8 (n, 3, S, S), masks long (n, S, S) class ids, and the mask pixels
        whose code was ambiguous (cfl.ambiguous), bool (n, S, S); all on the CPU
    """
    b, size = batch or n, cfg.image_size
    known = keep = None
    if given is not None:
        known, keep = given_half(*given, num_classes, cfg.mask_scheme, b, device)
    with autocast(sp, device):
        x = diffusion.sample_loop(
            model, (b, 6, size, size), sampler, steps, known, keep, resample, generator, device
        )
    x = x[:n].float()  # (n, 3+3, S, S) in [-1, 1]
    # §3.4: each mask pixel is the class whose lattice point is nearest in cosine similarity
    mask = cfl.decode(x[:, 3:], num_classes, cfg.mask_scheme)
    unsure = cfl.ambiguous(x[:, 3:], num_classes, cfg.mask_scheme)
    if given is not None and given[0] == "masks":  # the given mask, class for class
        mask, unsure = given[1].long().to(device), torch.zeros_like(unsure)
    return data.to_uint8(x[:, :3]).cpu(), mask.cpu(), unsure.cpu()


def given_half(half, value, num_classes, scheme, batch, device):
    """The known channels and their mask for conditional sampling -> (known (batch, 6, S, S),
    keep (1, 6, 1, 1) bool), padded to the batch shape with copies of the first pair."""
    value = value.to(device)
    if half == "images":  # the first 3 channels are known, the CFL mask is generated
        image = data.to_unit(value)
        known = torch.cat([image, torch.zeros_like(image)], 1)
    else:  # the mask's code is known, the image is generated
        code = cfl.encode(value, num_classes, scheme)
        known = torch.cat([torch.zeros_like(code), code], 1)
    known = torch.cat([known, known[:1].expand(batch - len(known), -1, -1, -1)])
    keep = torch.tensor([half == "images"] * 3 + [half == "masks"] * 3, device=device)
    return known, keep.view(1, 6, 1, 1)


def sample(
    ckpt_path,
    out,
    n=None,
    sampler="ddpm",
    steps=20,
    seed=0,
    batch_size=16,
    force=False,
    fast=None,
    given=None,
    data_root=None,
    split="val",
    resample=1,
):
    """Generate pairs with the EMA weights and write them as a dataset folder.

    out/images/*.png, out/masks/*.png in the dataset's own mask values, out/classes.json, so that
    data.PairedFolder(out) reads them back with the same class ids; plus out/masks_color/*.png,
    out/grid.png and out/boxes.json ({stem: {class name: [[x0, y0, x1, y1], ...]}}).
    :param n: pairs to generate (default 16); with given, at most n of the split's (default all)
    :param sampler, steps: GaussianDiffusion.sample_loop's (ddpm ignores steps)
    :param given: None (both halves generated), "images" (image -> mask: keep each image of
        data_root's split, generate its mask) or "masks" (mask -> image); named by its stems
    :param resample: RePaint's rounds per step for given (1: plain replacement)
    :param fast: {"amp"/"compile"/"channels_last": bool} given on the command line; they override
        the checkpoint's config, and on a CPU they alone are used (see speed()).
    """
    out = Path(out)
    check_sample_flags(n, sampler, steps, seed, batch_size, resample, given, data_root)
    device = pick_device()
    model, diffusion, cfg, classes, sp = load_sampler(ckpt_path, fast, device)
    ds = truth = halves = None
    if given is None:
        n = n or 16
        stems = [f"{i:05d}" for i in range(n)]
    else:  # the given halves, at the model's size, in the checkpoint's class ids
        ds = data.PairedFolder(data_root, cfg.image_size, split)
        n = min(n or len(ds), len(ds))
        stems = ds.stems[:n]
        truth = class_map(ds.classes, classes, data_root)[ds.masks[:n].long()]
        halves = ds.images[:n] if given == "images" else truth
    batch_size = min(batch_size, n)

    # every batch is drawn at full size, the last one cut: one shape, one compilation
    settings = dict(sampler=sampler, steps=steps, resample=resample, batch=batch_size)

    def draw(k, first):  # the k-th batch: pairs first, first + 1, ...
        g = make_generator(device, SAMPLE_STREAM, seed, k)  # same seed and batch size: same pairs
        m = min(batch_size, n - first)
        half = (given, halves[first : first + m]) if given else None
        return generate(
            model, diffusion, cfg, sp, len(classes), m, g, device, given=half, **settings
        )

    with folder_lock(out):
        images, masks = write_pairs(out, stems, classes, cfg.mask_scheme, batch_size, draw, force)
    if given is not None:
        score_given(given, images, masks, truth, ds, classes, data_root, split)
    return out


# ================================================================================ a run's plumbing
# What train and sample stand on: devices, random streams, checkpoints, the training state and
# its log, folder locks. None of it changes the algorithm above.

# make_generator's first key: what the generator draws. The other keys follow it.
BATCH_STREAM = 0  # (seed, step): a step's global batch (train), its batch and flips (segment)
RANK_STREAM = 1  # (seed, step, rank): one DDP rank's flips, t and noise
SAMPLE_STREAM = 2  # (seed, k): the k-th batch of samples (k = 0: the grids made in training)
SUBSET_STREAM = 3  # (seed,): segment's subset of the real pairs (--real-fraction)


def make_generator(device, stream, *key):
    """A torch.Generator on device for one random stream, seeded from non-negative integers:
    each draw is a function of (stream, key), so a resumed or re-run job repeats it."""
    state = np.random.SeedSequence([stream, *map(int, key)]).generate_state(1, np.uint64)[0]
    return torch.Generator(device).manual_seed(int(state))


def pick_device(name=None):
    """torch.device(name); without a name, the GPU when there is one, else the CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name (cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here")
    return device


def setup_distributed():
    """(rank, world size, device): DDP under torchrun (nccl on CUDA, gloo on CPU), else one
    process."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


# ------------------------------------------------------------------------------------- checkpoints

# The fields a resumed run may change; the others must be those it was trained with.
RESUMABLE = {
    "steps",
    "amp",
    "compile",
    "channels_last",
    "log_every",
    "ckpt_every",
    "sample_n",
    "sampler",
    "sampler_steps",
}


def config_from(saved):
    """A checkpoint's config dict -> Config. Older checkpoints' fields are translated: log_seconds
    (now log_every) is dropped, sample_ddim_steps K > 0 becomes sampler ddim with K steps."""
    saved = dict(saved)
    saved.pop("log_seconds", None)
    ddim = saved.pop("sample_ddim_steps", 0)
    if ddim:
        saved.update(sampler="ddim", sampler_steps=ddim)
    return Config(**saved)


def load_checkpoint(path, device="cpu"):
    """A SimGen checkpoint as a dict, or a one-line DataError."""
    path = Path(path)
    if not path.is_file():
        raise data.DataError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated, foreign or pickled-code files alike
        raise data.DataError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    keys = {"model", "ema", "config", "classes"}
    if not isinstance(ckpt, dict) or ckpt.get("version") != VERSION or not keys <= set(ckpt):
        raise data.DataError(f"{path}: not a SimGen checkpoint of version {VERSION}")
    return ckpt


def save_checkpoint(path, state):
    """torch.save to a temporary file, then rename: a crash never leaves half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def resume(cfg, ckpt_path, explicit, log):
    """(cfg, checkpoint or None): a run folder's checkpoint decides every setting the user did not
    set; those set must agree with it, except the RESUMABLE ones, which override it."""
    if not ckpt_path.exists():
        return cfg, None
    ckpt = load_checkpoint(ckpt_path)  # on the CPU; each tensor is copied to the device once
    saved = config_from(ckpt["config"])
    for name in sorted(set(explicit) - RESUMABLE):
        if getattr(cfg, name) != getattr(saved, name):
            raise data.DataError(
                f"{ckpt_path}: trained with {name}={getattr(saved, name)}, not "
                f"{getattr(cfg, name)}; choose another --out to start a new run"
            )
    log(f"resuming {ckpt_path} at step {ckpt['step']}")
    return replace(saved, **{n: getattr(cfg, n) for n in set(explicit) & RESUMABLE}), ckpt


# ------------------------------------------------------------------------------ the training state


@dataclass
class Run:
    """A training run: its state (what the checkpoint holds) and what it trains with."""

    cfg: Config
    raw: nn.Module  # the ResUNet as trained, not wrapped: its state dict is what checkpoints hold
    ema: nn.Module  # the EMA of its weights, which samples
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # fp16's loss scaling; a no-op for bf16 and fp32
    speed: "Speed"
    diffusion: GaussianDiffusion
    images: torch.Tensor  # uint8 (N, 3, S, S), the whole training set on the device
    masks: torch.Tensor  # uint8 (N, S, S) class ids
    classes: list  # data.PairedFolder.classes
    rank: int
    world: int
    log: object  # print on rank 0, silent on the others
    grid_model: nn.Module = None  # the EMA as the grids sample it, on rank 0
    step: int = 0  # optimizer steps done
    seconds: float = 0.0  # training time before this process (from the checkpoint)


def setup(cfg, out, explicit, rank, world, device):
    """The Run in folder out: data, models, optimizer, diffusion; resumed from out/ckpt.pt."""
    log = print if rank == 0 else silent
    cfg, ckpt = resume(cfg, out / "ckpt.pt", explicit, log)
    if cfg.batch_size % world:
        raise data.DataError(f"--batch-size {cfg.batch_size}: not divisible by {world} processes")
    ds = data.PairedFolder(cfg.data, cfg.image_size, "train")
    if ckpt is not None and ckpt["classes"] != ds.classes:
        raise data.DataError(f"{cfg.data}: its classes differ from those {out / 'ckpt.pt'} has")
    sp = speed(cfg, device, explicit)
    log("config " + " ".join(f"{k}={v}" for k, v in asdict(cfg).items() if k not in SPEED_FIELDS))

    torch.manual_seed(cfg.seed)
    raw = ResUNet(cfg).to(device)
    ema = copy.deepcopy(raw).requires_grad_(False).eval()
    run = Run(
        cfg=cfg,
        raw=raw,
        ema=ema,
        opt=adam(raw, cfg, device),
        scaler=grad_scaler(sp, device),
        speed=sp,
        diffusion=GaussianDiffusion(cfg.timesteps, cfg.schedule).to(device),
        images=ds.images.to(device),
        masks=ds.masks.to(device),
        classes=ds.classes,
        rank=rank,
        world=world,
        log=log,
    )
    if ckpt is not None:
        load_state(run, ckpt)
    del ckpt  # else ~1 GB of loaded tensors per GPU (paper config) stays referenced for the run
    if rank == 0:  # the grids sample with the EMA, compiled like training
        run.grid_model = sampling_model(ema, sp, device)
    scaling = " + GradScaler (no bf16 tensor cores here)" if run.scaler.is_enabled() else ""
    log(
        f"{sum(p.numel() for p in raw.parameters()) / 1e6:.1f}M parameters; {world} x "
        f"{device.type}, {describe(sp)}{scaling}"
    )
    return run


def checkpoint_state(run, seconds):
    """The checkpoint of a run: its keys are the checkpoint format (VERSION)."""
    ckpt = dict(
        model=run.raw.state_dict(),
        ema=run.ema.state_dict(),
        optimizer=run.opt.state_dict(),
        step=run.step,
        config=asdict(run.cfg),
        classes=run.classes,
        version=VERSION,
        seconds=seconds,
    )
    if run.scaler.is_enabled():
        ckpt["scaler"] = run.scaler.state_dict()
    return ckpt


def load_state(run, ckpt):
    """checkpoint_state()'s inverse: the run goes on where the checkpoint stopped."""
    run.raw.load_state_dict(ckpt["model"])
    run.ema.load_state_dict(ckpt["ema"])
    run.opt.load_state_dict(ckpt["optimizer"])
    run.opt.param_groups[0]["fused"] = run.opt.defaults["fused"]  # this device's choice
    if "scaler" in ckpt and run.scaler.is_enabled():
        run.scaler.load_state_dict(ckpt["scaler"])
    run.step, run.seconds = ckpt["step"], ckpt.get("seconds", 0.0)


def save_run(run, out, progress):
    """At a checkpoint step: out/ckpt.pt and a sample grid (rank 0) -> the grid's pairs.
    The grid's noise is the same every time, so grids show the training, not the draw."""
    if not finite(run.raw, run.ema):  # never write a checkpoint that outputs NaN
        progress.fail("weights are not finite", run.step)
    if run.rank != 0:
        return None
    with progress.paused():  # the grid's sampling is not training time
        save_checkpoint(out / "ckpt.pt", checkpoint_state(run, progress.seconds))
        progress.advice = what_is_kept(out, run.step)
        cfg, n, device = run.cfg, len(run.classes), run.images.device
        g = make_generator(device, SAMPLE_STREAM, cfg.seed, 0)
        how = dict(sampler=cfg.sampler, steps=cfg.sampler_steps)
        pairs = generate(
            run.grid_model, run.diffusion, cfg, run.speed, n, cfg.sample_n, g, device, **how
        )
        pairs = pairs[:2]  # images and masks
        Image.fromarray(grid(*pairs, n, cfg.mask_scheme)).save(out / f"grid_{run.step:07d}.png")
    return pairs


def what_is_kept(out, step):
    """What is left of a run stopped by a non-finite loss, for its error message."""
    if not step:
        return "stopped, no checkpoint was written"
    return f"stopped, {out / 'ckpt.pt'} (step {step}) is kept"


def finish(run, out, progress, pairs):
    """After the last step: the summary, and on the built-in set the alignment of the last grid's
    pairs (a grid is made first when there was nothing left to train)."""
    if run.rank == 0:
        pairs = pairs or save_run(run, out, progress)
        run.log(
            f"{out / 'ckpt.pt'}: step {run.step}, {progress.seconds:.0f}s of training; "
            f"grids in {out}"
        )
        k = data.synthetic_classes(run.cfg.data)
        if k is not None:  # the built-in set's colours tell each pixel's class from the image
            images, masks = pairs
            real_images = run.images[: len(images)].cpu()
            real_masks = run.masks[: len(images)].cpu()
            run.log(
                f"alignment of generated pairs {data.alignment_score(images, masks, k):.3f}  "
                f"(same images, shuffled masks "
                f"{data.alignment_score(images, masks.roll(1, 0), k):.3f}; real pairs "
                f"{data.alignment_score(real_images, real_masks, k):.3f})"
            )
    if run.world > 1:
        dist.barrier()
        dist.destroy_process_group()


def silent(*args, **kwargs):  # the log of ranks other than 0
    pass


def finite(*modules):
    """Whether every weight of the modules is finite (one host sync: call it rarely)."""
    return bool(torch.stack([p.isfinite().all() for m in modules for p in m.parameters()]).all())


def adam(model, cfg, device):
    # fused on CUDA: the whole update in a few kernels instead of several per tensor; a CPU
    # keeps PyTorch's default, so CPU runs are unchanged.
    fused = True if device.type == "cuda" else None
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=fused)


def grad_scaler(sp, device):
    # fp16 needs loss scaling (its range underflows small gradients); bf16 and fp32 do not
    return torch.amp.GradScaler(device.type, enabled=sp.amp == torch.float16)


def optimizer_step(loss, opt, scaler, grad_clip):
    """Backward, clip the global gradient norm, Adam step: train's and segment's update."""
    params = opt.param_groups[0]["params"]
    scaler.scale(loss).backward()  # DDP averages the gradients over the ranks here
    scaler.unscale_(opt)  # fp16: the true gradients, for clipping; otherwise a no-op
    nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(opt)  # fp16: skips the step if a gradient overflowed; otherwise opt.step()
    scaler.update()
    opt.zero_grad(set_to_none=True)


@torch.no_grad()
def update_ema(ema_params, params, decay):
    """ema <- decay * ema + (1 - decay) * param, in place, for two lists of tensors.

    One multi-tensor kernel launch per chunk of tensors on CUDA instead of one lerp_ per tensor
    (142 at the paper's config); on a CPU it is that loop, so the numbers are the same.
    """
    torch._foreach_lerp_(ema_params, params, 1 - decay)


class Progress:
    """The log of a training loop, train's and segment's: every log_every steps a line with the
    mean loss, images per second and time left (and a row of log.csv, if given).

    The loss is summed on the device and read only for those lines: a read waits for the GPU.
    The first step (compilation, autotuning) is timed apart and left out of the rates.
    """

    def __init__(
        self, cfg, start=0, seconds=0.0, log=print, world=1, csv=None, where="train", advice=""
    ):
        self.cfg, self.start, self.log, self.world, self.csv = cfg, start, log, world, csv
        self.seconds = seconds  # training time so far, the first step's included
        self.where = where  # names the run in the error of a non-finite loss
        self.advice = advice  # ... and ends it
        self.loss_sum, self.last_line = 0.0, start
        self.clock, self.timed_from = time.time(), start  # rates: steps since timed_from
        if csv is not None:  # on resume, rows past the checkpoint's step are dropped
            rows = csv.read_text().splitlines()[1:] if csv.exists() else []
            kept = [r for r in rows if r.split(",")[0].isdigit() and int(r.split(",")[0]) <= start]
            csv.write_text("".join(f"{r}\n" for r in ["step,loss,images_per_s,seconds", *kept]))

    def add(self, done, loss):
        """Count the loss (0-d tensor) of the step that made `done` steps."""
        self.loss_sum += loss
        if done == self.start + 1:  # compilation and autotuning: timed apart
            float(loss)  # waits for the GPU
            first = time.time() - self.clock
            self.seconds += first
            self.clock, self.timed_from = time.time(), done
            memory = ""
            if loss.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(loss.device) / 2**30
                memory = f"; peak GPU memory {peak:.1f} GiB"
            self.log(
                f"first step {first:.1f}s (compile, autotune; not counted in the rates){memory}",
                flush=True,
            )

    def report(self, done):
        """A line with the mean loss since the last one; a non-finite loss stops the run."""
        mean = self.loss_sum / (done - self.last_line)
        if self.world > 1:
            dist.all_reduce(mean)  # the sum over ranks: the loss of the whole global batch
            mean /= self.world
        mean, now = float(mean), time.time()  # the host sync
        if not math.isfinite(mean):
            self.fail(f"loss is {mean}", done)
        self.seconds += now - self.clock
        rate = (done - self.timed_from) * self.cfg.batch_size / (now - self.clock)
        eta = "-"
        if rate:
            eta = f"{(self.cfg.steps - done) * self.cfg.batch_size / rate / 60:.1f} min"
        self.log(
            f"step {done}/{self.cfg.steps}  loss {mean:.4f}  {rate:.1f} img/s  eta {eta}",
            flush=True,
        )
        if self.csv is not None:
            with open(self.csv, "a") as f:
                f.write(f"{done},{mean:.6f},{rate:.2f},{self.seconds:.1f}\n")
        self.loss_sum, self.last_line = 0.0, done
        self.clock, self.timed_from = time.time(), done

    @contextlib.contextmanager
    def paused(self):
        """Time spent in the block (a checkpoint, a sample grid) is not training time."""
        yield
        self.clock = time.time()

    def fail(self, why, done):
        raise FloatingPointError(f"{self.where}: {why} near step {done}; {self.advice}")


# ----------------------------------------------------------------------------- folders

LOCK_FILE = ".simgen.lock"  # in a run or output folder while a process writes there; its PID


@contextlib.contextmanager
def folder_lock(folder):
    """Hold an exclusive lock on folder (made if absent) while the `with` block runs.

    Two processes writing one run folder corrupt each other's checkpoints. flock is dropped by the
    kernel when the process ends, however it ends, so a killed run never blocks its own resume.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise data.DataError(
                f"{folder}: in use by another simgen process (PID {holder}); "
                "wait for it to end, or choose another folder"
            ) from None
        f.truncate(0)  # "a+" appends: the PID is now the whole file
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


# ---------------------------------------------------------------------------------- sample's parts


def check_sample_flags(n, sampler, steps, seed, batch_size, resample, given, data_root):
    """sample's flags, checked before any work: a one-line ValueError each."""
    checks = [
        ("--n", 1 if n is None else n, 1),
        ("--batch-size", batch_size, 1),
        ("--steps", steps, 1),
        ("--seed", seed, 0),
        ("--resample", resample, 1),
    ]
    for flag, value, least in checks:
        if value < least:
            raise ValueError(f"{flag} {value}: must be at least {least}")
    if sampler not in SAMPLERS:
        raise ValueError(f"--sampler {sampler}: use one of {', '.join(SAMPLERS)}")
    if (given is None) != (data_root is None):
        raise ValueError("--given and --data go together: --given images|masks --data DATASET")
    if data_root is not None:
        data.check_root(data_root)


def load_sampler(ckpt_path, fast, device):
    """A checkpoint's EMA model as sample runs it -> (model, diffusion, cfg, classes, speed).
    The checkpoint carries the config and the classes: no flags to re-type, no size mismatch."""
    ckpt = load_checkpoint(ckpt_path)  # on the CPU: only the EMA weights go to the device
    cfg, classes = config_from(ckpt["config"]), ckpt["classes"]
    sp = speed(replace(cfg, **(fast or {})), device, explicit=fast or {})
    model = ResUNet(cfg).eval()
    model.load_state_dict(ckpt["ema"])
    model = sampling_model(model.to(device), sp, device)
    return model, GaussianDiffusion(cfg.timesteps, cfg.schedule).to(device), cfg, classes, sp


def score_given(given, images, masks, truth, ds, classes, data_root, split):
    """image -> mask is segmentation: scored against the dataset's masks (truth). mask -> image on
    the built-in set: by how well the images' colours tell the given classes."""
    n = len(images)
    if given == "images":
        per_class, mean = iou(masks, truth, len(classes))
        accuracy = (masks == truth).float().mean().item()
        scores = ", ".join(f"{c['name']} {fmt(v, 3)}" for c, v in zip(classes, per_class))
        print(
            f"image -> mask against {data_root} [{split}]: pixel accuracy {accuracy:.3f}, "
            f"mean IoU {fmt(mean, 3)} ({scores})"
        )
    k = data.synthetic_classes(data_root)
    if given == "masks" and k is not None:  # the built-in set's colours tell each pixel's class
        print(
            f"mask -> image alignment {data.alignment_score(images, masks, k):.3f} (shuffled "
            f"masks {data.alignment_score(images, masks.roll(1, 0), k):.3f}; real pairs "
            f"{data.alignment_score(ds.images[:n], ds.masks[:n], k):.3f})"
        )


# =============================================================================== the GPU fast path
# Everything here is on by default on CUDA only; on a CPU only what a flag names explicitly.

SPEED_FIELDS = ("amp", "compile", "channels_last")  # the Config fields speed() reads


@dataclass(frozen=True)
class Speed:
    """The speed-ups a run uses; `speed()` chooses them. None of them changes the algorithm."""

    amp: torch.dtype = None  # autocast dtype: bf16, fp16 (V100, T4), or None for fp32
    compile: bool = False  # torch.compile of the model
    channels_last: bool = False  # NHWC memory format for model and batches


def speed(cfg, device, explicit=()):
    """cfg's amp, compile and channels_last on CUDA; on a CPU only those named in `explicit`
    (given on the command line), so the fast path can be run and tested without a GPU.

    bf16 autocast where the tensor cores do bf16 (compute capability >= 8.0, and any CPU);
    fp16 with a GradScaler on older GPUs (the paper's V100, T4): they have fp16 tensor cores only.
    """
    on = {k: getattr(cfg, k) and (device.type == "cuda" or k in explicit) for k in SPEED_FIELDS}
    old_gpu = device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0)
    half = torch.float16 if old_gpu else torch.bfloat16
    return Speed(half if on["amp"] else None, on["compile"], on["channels_last"])


def describe(sp):  # for the startup line
    names = [f"{str(sp.amp)[6:]} autocast" if sp.amp else "fp32"]
    names.append("compile" if sp.compile else "eager")
    return ", ".join(names + (["channels_last"] if sp.channels_last else []))


def autocast(sp, device):
    # sp.amp's autocast on the device, or a no-op context for fp32
    return torch.autocast(device.type, dtype=sp.amp or torch.float32, enabled=sp.amp is not None)


def allow_tf32():
    """TF32 for float32 matrix products and convolutions: 10-bit mantissas on the tensor cores."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9; mixing APIs raises
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def fast_path(raw, ema, opt, sp, device, world):
    """Every speed-up of training, in one place -> the model the training step calls.
    (Elsewhere only: the fused Adam in adam(), the batches made on the device.)"""
    if device.type == "cuda":
        allow_tf32()
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN times its algorithms once
    if sp.channels_last:  # NHWC, the layout tensor cores read; the EMA too, for update_ema
        raw.to(memory_format=torch.channels_last)
        ema.to(memory_format=torch.channels_last)
    # Adam moments in their weight's memory layout: the fused update wants one layout, and a
    # checkpoint from a CPU run holds them in NCHW.
    for p, moments in opt.state.items():
        moments.update({k: torch.empty_like(p).copy_(v) for k, v in moments.items() if k != "step"})
    model = raw
    if world > 1:  # gradient_as_bucket_view: gradients live in DDP's buckets, no copy per step
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=ids, gradient_as_bucket_view=True
        )
    return torch.compile(model) if sp.compile else model


def sampling_model(model, sp, device):
    """The model as the sampling loops call it: channels_last and compiled when sp says so.

    The default compile mode, not "reduce-overhead" (CUDA graphs): one U-Net call on 16 pairs at
    256 x 256 is 2.8 TFLOP, ~7 ms at 40 % of an H100, longer than the CPU takes to launch it, so
    graphs would gain little. Noise is drawn outside the model, from the caller's generator, so
    compiling does not change which numbers are drawn.
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN times its conv algorithms once
    if sp.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if sp.compile else model


# ================================================================================== output folders
# sample writes a dataset folder that data.PairedFolder reads back; train and sample draw grids.

SAMPLE_MANIFEST = ".simgen-sample.json"  # in sample's output folder: every file sample writes


def prepare_output(out, files, force):
    """Make out ready for sample to write `files` (paths relative to out) into it.

    A folder that holds anything sample did not write is refused, even with --force: --force
    removes only the files listed in the manifest an earlier sample left there. The new manifest
    is written before the first file, so a killed run is cleaned up by the next --force.
    """
    manifest = out / SAMPLE_MANIFEST
    present = []
    if out.is_dir():
        present = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
        present = [p for p in present if p not in (LOCK_FILE, SAMPLE_MANIFEST)]
    if present:
        try:
            written = set(json.loads(manifest.read_text())["files"])
        except (OSError, ValueError, KeyError, TypeError):
            raise data.DataError(
                f"{out}: not empty, and not written by sample (no readable {SAMPLE_MANIFEST}); "
                "choose a new or empty folder"
            ) from None
        foreign = [p for p in present if p not in written]
        if foreign:
            raise data.DataError(
                f"{out}: holds {len(foreign)} files sample did not write (e.g. {foreign[0]}); "
                "not touched, even with --force: choose another folder"
            )
        if not force:
            raise data.DataError(f"{out}: holds an earlier sample; pass --force to replace it")
        for p in present:  # every one of them listed in the manifest: sample's own files
            (out / p).unlink()
    out.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"files": sorted(files)}))
    for sub in {Path(f).parent for f in files}:
        (out / sub).mkdir(parents=True, exist_ok=True)


def write_pairs(out, stems, classes, scheme, batch_size, draw, force):
    """Write the pairs draw(k, first) makes, batch by batch, as a dataset folder (see sample).
    -> all images uint8 (N, 3, S, S) and masks long (N, S, S), for scoring."""
    files = [f"{sub}/{stem}.png" for sub in ("images", "masks", "masks_color") for stem in stems]
    prepare_output(out, files + ["grid.png", "boxes.json", "classes.json"], force)
    names, boxes, start, pairs = [c["name"] for c in classes], {}, time.time(), []
    for k, first in enumerate(range(0, len(stems), batch_size)):
        images, masks, unsure = draw(k, first)
        pairs.append((images, masks, unsure))
        colours = cfl.colorize(masks, len(classes), scheme)
        for i, stem in enumerate(stems[first : first + len(images)]):
            Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(out / "images" / f"{stem}.png")
            # class ids -> the dataset's own grey levels or colours, lossless: a drop-in dataset
            values = data.mask_to_values(masks[i], classes)
            Image.fromarray(values).save(out / "masks" / f"{stem}.png")
            Image.fromarray(colours[i].numpy()).save(out / "masks_color" / f"{stem}.png")
            boxes[stem] = {names[c]: b for c, b in data.connected_boxes(masks[i]).items()}
        if k == 0:  # the overview: up to 16 pairs of the first batch
            picture = grid(images[:16], masks[:16], len(classes), scheme)
            Image.fromarray(picture).save(out / "grid.png")
        print(f"{first + len(images)}/{len(stems)} pairs, {time.time() - start:.0f}s", flush=True)
    (out / "boxes.json").write_text(json.dumps(boxes))
    # Names every class, present or not, so PairedFolder(out) keeps the training ids.
    (out / "classes.json").write_text(json.dumps({c["name"]: c["value"] for c in classes}))
    print(f"{out}: {len(stems)} pairs (images/, masks/, masks_color/, grid.png, boxes.json)")
    images, masks, unsure = (torch.cat(p) for p in zip(*pairs))
    print(
        f"mask decoding: {unsure.float().mean().item():.2%} of pixels ambiguous (a code farther "
        f"than half the smallest code distance, {cfl.min_distance(len(classes), scheme):.3f}, "
        "from every code)"
    )
    return images, masks


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
        canvas[y : y + s, x : x + w] = triplets[k]
    zoom = max(1, 128 // s)  # small samples are enlarged (nearest) to be seen
    return canvas.repeat_interleave(zoom, 0).repeat_interleave(zoom, 1).numpy()


# ================================================================================= evaluate (§3.5)


def fmt(v, digits):  # a score in eval's and segment's tables; "-": nothing to score
    return "-" if v is None else f"{v:.{digits}f}"


def class_map(classes, target, where):
    """Lookup table from the class ids of `classes` to the ids in `target` of the same mask value.

    :param classes, target: PairedFolder.classes lists; where: the folder named in the error
    :return: long tensor (len(classes),): target_ids = table[ids]
    """

    # ids follow each folder's own sorted values, so classes are matched by value; grey v is
    # [v, v, v].
    def rgb(v):
        return (v,) * 3 if isinstance(v, int) else tuple(v)

    same = {rgb(c["value"]): c for c in target}
    unknown = [f"{c['name']} ({c['value']})" for c in classes if rgb(c["value"]) not in same]
    if unknown:
        raise data.DataError(
            f"{where}: classes {', '.join(unknown)} have no class of that mask "
            "value in the reference set"
        )
    # Same value, other name: maybe another dataset's classes (synthetic tissue as background).
    renamed = [
        f"{c['name']} as {same[rgb(c['value'])]['name']} ({c['value']})"
        for c in classes
        if c["name"] != same[rgb(c["value"])]["name"]
    ]
    if renamed:
        print(
            f"warning: {where}: classes matched by mask value but named differently: "
            f"{', '.join(renamed)}; check that both folders hold the same classes"
        )
    return torch.tensor([same[rgb(c["value"])]["id"] for c in classes])


def folder_image_size(root):
    """S when every image of root/images is S pixels on its shorter side and all share one size,
    else None."""
    folder, sizes = Path(str(root)) / "images", set()
    # "synthetic" and bad folders have no images/ here: PairedFolder reports the latter
    for p in folder.iterdir() if folder.is_dir() else []:
        if p.suffix.lower() in data.EXTENSIONS:
            with Image.open(p) as im:  # reads the header only
                sizes.add(im.size)
    return min(sizes.pop()) if len(sizes) == 1 else None


def evaluate(
    real, fake, image_size=None, real_split="all", fake_split="all", batch_size=50, device=None
):
    """FID, KID, sFID and sKID (§3.5, metrics.py) of the FAKE pairs against the REAL ones.

    :param real, fake: dataset folders or "synthetic"; fake is usually what `sample` wrote
    :param image_size: S for both sets; None = fake's own size (256 if its images differ in size)
    :param device: a device name; None: the GPU if there is one
    :return: metrics.distances' dict (per_class rows get name and value) plus the sets, splits, S
    """
    for flag, value in (("--image-size", image_size), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: must be at least 1")
    device = pick_device(device)
    for root in (real, fake):  # before any work: the real set's features take minutes
        data.check_root(root)
    size = image_size or folder_image_size(fake)
    if size is None:
        size = 256
        print(f"{fake}: no single image size; evaluating at 256x256 (set --image-size)")
    # Real images get the resize and crop of training; fake ones at their own size are left as
    # they are. FAKE first: a bad FAKE fails before the real set's features are computed.
    fake_ds = data.PairedFolder(fake, size, fake_split)
    real_ds = data.PairedFolder(real, size, real_split)
    fake_masks = class_map(fake_ds.classes, real_ds.classes, fake)[fake_ds.masks.long()]
    model, start = metrics.load_inception(), time.time()
    report = progress_report()
    real_feats, how = real_features(
        model, real_ds, real, real_split, size, batch_size, device, report
    )
    fake_feats = metrics.dataset_features(
        model, fake_ds.images, fake_masks, None, batch_size, device, report("fake")
    )
    scores = metrics.distances(real_feats, fake_feats)
    for row in scores["per_class"]:
        c = real_ds.classes[row["class"]]
        row.update(name=c["name"], value=c["value"])
    print_scores(scores, size, time.time() - start)
    k = data.synthetic_classes(real)
    if k is not None:  # the built-in set's colours tell each pixel's class from the image alone
        scores["alignment"] = data.alignment_score(fake_ds.images, fake_masks, k)
        shuffled = data.alignment_score(fake_ds.images, fake_masks.roll(1, 0), k)
        scores["alignment_shuffled"] = shuffled
        print(
            f"alignment of the fake pairs {scores['alignment']:.3f} (shuffled masks {shuffled:.3f})"
        )
    return dict(
        real=str(real),
        real_split=real_split,
        fake=str(fake),
        fake_split=fake_split,
        image_size=size,
        real_features=how,
        **scores,
    )


def progress_report(every=5.0):
    """report(set) -> a progress callback(stage, done, total) for metrics.dataset_features that
    prints a line every `every` seconds and at the end of each stage."""
    last = [0.0]

    def report(name):
        def show(stage, done, total):
            if done == total or time.time() - last[0] >= every:
                print(f"  {name} {stage}: {done}/{total}", flush=True)
                last[0] = time.time()

        return show

    return report


def real_features(model, ds, real, split, size, batch_size, device, report):
    """metrics.dataset_features of the real set, cached on disk -> (features, "cached" or
    "computed"). The key is all they depend on: pixels, classes, network weights, region rule."""
    key = hashlib.sha256(repr((ds.classes, metrics.MIN_REGION_PIXELS, metrics.BLANK)).encode())
    for t in [ds.images, ds.masks, *model.state_dict().values()]:
        key.update(t.contiguous().numpy())  # the weights' content, whatever file holds them
    where = Path(str(real)).resolve()  # in the name: folders of the same name keep their own
    tag = hashlib.sha256(str(where).encode()).hexdigest()[:8]
    path = data.cache_file(f"eval-{where.name}-{tag}-{split}-{size}", key.hexdigest(), ".npz")
    if path.exists():
        try:
            with np.load(path) as f:
                feats = dict(f)
            print(f"{real} [{split}]: Inception features cached in {path}")
            return feats, "cached"
        except Exception:  # a truncated or foreign file is recomputed, never fatal
            pass
    feats = metrics.dataset_features(
        model, ds.images, ds.masks, None, batch_size, device, report("real")
    )

    def write(tmp):  # np.savez given a path would append ".npz" to the temporary name
        with open(tmp, "wb") as f:
            np.savez(f, **feats)

    data.save_cache(path, write)
    return feats, "computed"


def print_scores(scores, size, seconds):
    """eval's table: FID, KID, sFID, sKID and each class's FID and KID."""
    print(
        f"FID  {scores['fid']:.2f}  ({scores['n_real']} real, {scores['n_fake']} fake images "
        f"at {size}x{size}, {seconds:.0f}s)"
    )
    print(
        f"KID  {scores['kid']:.4f} ± {scores['kid_std']:.4f}  "
        f"(subsets of {scores['kid_subset_size']})"
    )
    scored = sum(r["fid"] is not None for r in scores["per_class"])
    print(
        f"sFID {fmt(scores['sfid'], 2)}  sKID {fmt(scores['skid'], 4)}  (mean over the "
        f"{scored} classes with >= 2 regions of >= {metrics.MIN_REGION_PIXELS} pixels in both "
        "sets)"
    )
    print(f"{'class':<20}{'value':>16}{'n_real':>8}{'n_fake':>8}{'FID':>10}{'KID':>10}")
    for r in scores["per_class"]:
        print(
            f"{r['name']:<20}{str(r['value']):>16}{r['n_real']:>8}{r['n_fake']:>8}"
            f"{fmt(r['fid'], 2):>10}{fmt(r['kid'], 4):>10}"
        )
    if min(scores["n_real"], scores["n_fake"]) < 2048:
        print(
            "warning: fewer than 2048 images in a set: FID is biased upwards there; "
            "compare sets of equal size"
        )


# ================================================================================== segment (§5.5)

# Deviation: a 16-channel ResUNet (3.8M parameters) at 64 x 64 for 300 steps, to train in minutes
# on a CPU; the paper's downstream ResUNet (its ref. [19]) is full size, its training not stated.
SEGMENT = dict(
    image_size=64, base_channels=16, channel_mults=(1, 2, 4, 8), steps=300, batch_size=16, lr=2e-3
)


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


def segment(
    train_roots,
    test_root,
    cfg,
    test_split="val",
    train_split=("train",),
    real_fraction=1.0,
    out=None,
):
    """Train a segmentation ResUNet on dataset folders; per-class and mean IoU on a real test split.

    :param train_roots: folders or "synthetic", real or generated; the first is "the real one"
    :param cfg: Config; image_size, base_channels, channel_mults, steps, batch_size, lr, seed
    :param train_split: one split for all train_roots, or one each (a generated folder: "all")
    :param real_fraction: fixed random fraction of the first folder's pairs used, all of the
        others' (Fig. 15)
    :param out: folder for segment.pt ({model, config, classes, version}); never overwritten
    :return: dict for the JSON: train (folder, split, pairs used, of), test, classes with iou, ...
    """
    splits, ckpt_path = check_segment_flags(train_roots, train_split, real_fraction, out)
    device, start = pick_device(), time.time()
    test = data.PairedFolder(test_root, cfg.image_size, test_split)
    images, masks, used = segment_pairs(
        train_roots, splits, test, test_root, test_split, real_fraction, cfg
    )
    images, masks = images.to(device), masks.to(device)

    torch.manual_seed(cfg.seed)
    model = ResUNet(cfg, 3, test.num_classes, time_embedding=False).to(device)
    sp = speed(cfg, device)
    print(
        f"segmentation ResUNet {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
        f"parameters; {len(images)} training pairs at {cfg.image_size}x{cfg.image_size}; "
        f"{device.type}"
    )
    train_segmenter(model, images, masks, cfg, sp, device)
    pred = predict(model, test.images, cfg.batch_size, sp, device)
    per_class, mean = iou(pred, test.masks, test.num_classes)
    print_iou(test, per_class, mean, f"{test_root} [{test_split}]", time.time() - start)
    if ckpt_path:
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        weights = dict(model=model.state_dict(), config=asdict(cfg), classes=test.classes)
        save_checkpoint(ckpt_path, dict(weights, version=VERSION))
        print(f"weights in {ckpt_path}")
    return dict(
        train=used,
        test=str(test_root),
        test_split=test_split,
        n_test=len(test),
        real_fraction=real_fraction,
        config={k: getattr(cfg, k) for k in (*SEGMENT, "seed")},
        classes=[dict(c, iou=v) for c, v in zip(test.classes, per_class)],
        mean_iou=mean,
        seconds=round(time.time() - start, 1),
    )


def check_segment_flags(train_roots, train_split, real_fraction, out):
    """segment's flags, checked before any work -> (a split per TRAIN folder, segment.pt path)."""
    splits = list(train_split) * len(train_roots) if len(train_split) == 1 else list(train_split)
    if len(splits) != len(train_roots):
        raise data.DataError(
            f"--train-split {','.join(train_split)}: give one split, or one per TRAIN folder"
        )
    if not 0 < real_fraction <= 1:
        raise ValueError(f"--real-fraction {real_fraction}: must be in (0, 1]")
    ckpt_path = Path(out) / "segment.pt" if out else None
    if ckpt_path and ckpt_path.exists():
        raise data.DataError(f"{ckpt_path}: exists; choose another --out")
    return splits, ckpt_path


def print_iou(test, per_class, mean, where, seconds):
    """segment's table: each class's IoU and their mean."""
    print(f"{'class':<20}{'value':>16}{'IoU':>8}   ({len(test)} pairs of {where})")
    for c, v in zip(test.classes, per_class):
        print(f"{c['name']:<20}{str(c['value']):>16}{fmt(v, 3):>8}")
    print(f"mean IoU {fmt(mean, 3)} over the classes in prediction or truth ({seconds:.0f}s)")


def segment_pairs(roots, splits, test, test_root, test_split, real_fraction, cfg):
    """segment's training pairs, in the test set's class ids -> (images uint8 (N, 3, S, S),
    masks uint8 (N, S, S), [dict(root, split, pairs, of)] for each folder)."""
    images, masks, used = [], [], []
    for i, (root, split) in enumerate(zip(roots, splits)):
        ds = data.PairedFolder(root, cfg.image_size, split)
        same = Path(str(root)).resolve() == Path(str(test_root)).resolve()
        if same and (split == test_split or "all" in (split, test_split)):
            print(
                f"warning: {root} [{split}] overlaps the test split [{test_split}]: the IoU is "
                "no test score"
            )
        keep = torch.arange(len(ds))
        if i == 0 and real_fraction < 1:  # the same subset for a seed, whatever the others are
            keep = torch.randperm(len(ds), generator=make_generator("cpu", SUBSET_STREAM, cfg.seed))
            keep = keep[: round(real_fraction * len(ds))].sort().values  # round(4.5) = 4
            if not len(keep):
                raise data.DataError(
                    f"{root}: --real-fraction {real_fraction} of {len(ds)} pairs is none"
                )
        images.append(ds.images[keep])
        ids = class_map(ds.classes, test.classes, root)[ds.masks[keep].long()]
        masks.append(ids.to(torch.uint8))
        used.append(dict(root=str(root), split=split, pairs=len(keep), of=len(ds)))
    return torch.cat(images), torch.cat(masks), used


def train_segmenter(model, images, masks, cfg, sp, device):
    """segment's training: train's batches and bookkeeping, a per-pixel cross-entropy loss.

    :param images: uint8 (N, 3, S, S), masks: uint8 (N, S, S) class ids, on the device
    """
    opt, scaler = adam(model, cfg, device), grad_scaler(sp, device)
    progress = Progress(cfg, where="segment", advice="try a lower --lr")
    model.train()
    for step in range(cfg.steps):  # the batch and its flips from (seed, step), as in train
        g = make_generator(device, BATCH_STREAM, cfg.seed, step)
        idx = torch.randint(len(images), (cfg.batch_size,), generator=g, device=device)
        image, mask = data.flip(images[idx], masks[idx], g)
        with autocast(sp, device):
            logits = model(data.to_unit(image))  # (B, K, S, S)
        # Note: plain per-pixel cross-entropy, no class weights, no augmentation but flips.
        loss = F.cross_entropy(logits.float(), mask.long())
        optimizer_step(loss, opt, scaler, cfg.grad_clip)
        progress.add(step + 1, loss.detach())
        if step + 1 == cfg.steps or (step + 1) % cfg.log_every == 0:
            progress.report(step + 1)


@torch.no_grad()
def predict(model, images, batch_size, sp, device):
    """The class of each pixel: uint8 images (N, 3, S, S) -> long (N, S, S), on the CPU.
    Note: IoU is taken at S x S, the test masks resized and cropped as the images are."""
    model.eval()
    preds = []
    for i in range(0, len(images), batch_size):
        with autocast(sp, device):
            logits = model(data.to_unit(images[i : i + batch_size].to(device)))
        preds.append(logits.argmax(1).cpu())
    return torch.cat(preds)


# =============================================================================== bench: speed here

# Dense peak TFLOP/s of the tensor cores, (bf16, tf32), matched in this order against the CUDA
# device's name. From NVIDIA's datasheets (H100, H200, A100, L40S, L40, L4, V100) and the Ada
# whitepaper (RTX 4090, FP32 accumulate); figures given "with sparsity" there are halved.
# V100 (SXM2): fp16 tensor cores, no bf16 and no tf32: (fp16, fp32 CUDA cores).
PEAK_TFLOPS = {
    "H100 NVL": (835, 418),
    "H100 PCIe": (756, 378),
    "H100": (989, 495),
    "H200 NVL": (835, 418),
    "H200": (989, 495),
    "A100": (312, 156),
    "L40S": (362, 183),
    "L40": (181, 90.5),
    "L4": (121, 60),
    "RTX 4090": (165, 82.6),
    "V100": (125, 15.7),
}
BENCH_CONFIGS = {"paper": "paper", "small": "demo", "tiny": "tiny"}  # bench --config -> preset


def peak_tflops(name):
    """(half, tf32) dense peak TFLOP/s of the CUDA device called name, half being the autocast
    dtype speed() picks there (bf16; fp16 on a V100); (None, None) if unknown."""
    return next((p for key, p in PEAK_TFLOPS.items() if key in name), (None, None))


def show(label, value, note=""):  # a row of bench's table
    print(f"  {label:<34}{value:>14}  {note}", flush=True)


def repeat(fn, times):
    for _ in range(times):
        fn()


def timed(fn, repeats, device, warmup=True):
    """Median seconds of fn() over repeats calls, after one untimed call if warmup (compilation,
    cuDNN autotuning, caches). On CUDA the queued work is waited for before and after each call."""
    times = []
    for _ in range(repeats + warmup):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times[warmup:]))


def bench(config=None, repeats=None, json_path=None, profile=False):
    """Speed of training, sampling, FID features and data loading on this machine -> dict.

    Training runs the paper config on CUDA (a small one on a CPU) three ways: eager fp32 (TF32 on,
    as train sets it), autocast (bf16; fp16 on pre-Ampere GPUs), and autocast + compile +
    channels_last. MFU is the step's model FLOPs (forward + backward, counted by torch's
    FlopCounterMode) per second over the peak. profile: the top 10 kernels of the fastest variant.
    """
    started, device = time.time(), pick_device()
    cuda = device.type == "cuda"
    config = config or ("paper" if cuda else "small")
    repeats = repeats or (10 if cuda else 3)
    cfg = replace(Config(), **PRESETS[BENCH_CONFIGS[config]])
    name = (
        f"CPU ({torch.backends.cpu.get_cpu_capability()}, torch threads: {torch.get_num_threads()})"
    )
    if cuda:
        name = torch.cuda.get_device_name(device)
    # Other processes slow a CPU run, many times over when torch's threads outnumber free cores.
    load = round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None
    peak = peak_tflops(name) if cuda else (None, None)
    res = dict(
        device=name,
        torch=torch.__version__,
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
        config=config,
        image_size=cfg.image_size,
        batch_size=cfg.batch_size,
        repeats=repeats,
        load_average=load,
        peak_tflops=dict(bf16=peak[0], tf32=peak[1]),
    )
    print(
        f"bench on {name}, torch {torch.__version__}: {config} config ({cfg.image_size}x"
        f"{cfg.image_size}, batch {cfg.batch_size}), median of {repeats}; load average {load} "
        f"on {os.cpu_count()} cores",
        flush=True,
    )
    # cached; on the device, as in train
    ds = data.PairedFolder("synthetic", cfg.image_size, "train")
    images, masks = ds.images.to(device), ds.masks.to(device)
    k = ds.num_classes
    res["train"], res["train_flops_per_step"], step = bench_training(
        cfg, images, masks, k, peak, repeats, device
    )
    if profile:
        res["profile"] = profile_step(step, device)
    res["sample"] = bench_sampling(cfg, k, repeats, device)
    res["fid"] = bench_features(images, repeats, device)
    res["distances_s"] = bench_distances(repeats)
    res["data_images_per_s"] = bench_batches(cfg, images, masks, k, repeats, device)
    res["total_s"] = time.time() - started
    print(f"total {res['total_s']:.0f}s")
    if json_path:
        Path(json_path).write_text(json.dumps(res, indent=1))
        print(f"numbers in {json_path}")
    return res


def bench_training(cfg, images, masks, num_classes, peak, repeats, device):
    """Three variants of train's step -> ({variant: numbers}, FLOPs per step, the last step)."""
    print("training", flush=True)
    cuda, rows, flops = device.type == "cuda", {}, None
    diffusion = GaussianDiffusion(cfg.timesteps, cfg.schedule).to(device)
    half = speed(cfg, device, {"amp"}).amp
    dtype = str(half)[6:]
    for label, sp in (
        ("eager fp32", Speed()),
        (f"{dtype} autocast", Speed(amp=half)),
        (f"{dtype} + compile + channels_last", Speed(half, True, True)),
    ):
        if not cuda and sp != Speed():  # train uses none of them on a CPU unless asked
            rows[label] = dict(skipped="CUDA default only: a CPU trains in fp32 eager")
            show(label, "skipped", rows[label]["skipped"])
            continue
        batch = training_batch(images, masks, num_classes, cfg, 0, 0, 1, sp.channels_last)
        step = bench_step(cfg, sp, batch, diffusion, device)
        if flops is None:  # the same for every variant: count once, eager
            with FlopCounterMode(display=False) as counter:
                step()
            flops = counter.get_total_flops()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        inner = 5 if cuda else 1  # steps per timed call: a GPU step is short

        seconds = timed(partial(repeat, step, inner), repeats, device) / inner
        tflops = flops / seconds / 1e12
        top = peak[0] if sp.amp else peak[1]  # fp32 runs on the TF32 tensor cores
        mfu = tflops / top if top else None
        memory = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
        rows[label] = dict(
            images_per_s=cfg.batch_size / seconds,
            step_s=seconds,
            tflops=tflops,
            mfu=mfu,
            peak_memory_gib=memory,
        )
        note = f"{tflops:.3g} TFLOP/s, MFU {f'{mfu:.1%}' if mfu else 'n/a (peak unknown)'}"
        note += f", peak memory {memory:.1f} GiB" if cuda else ""
        show(label, f"{cfg.batch_size / seconds:.1f} img/s", note)
    return rows, flops, step


def bench_step(cfg, sp, batch, diffusion, device):
    """train's step on one fixed batch (x, t, noise), fresh weights, sp's speed-ups -> step()."""
    torch.manual_seed(0)  # random weights: the speed does not depend on them
    raw = ResUNet(cfg).to(device)
    ema = copy.deepcopy(raw).requires_grad_(False)
    opt = adam(raw, cfg, device)
    scaler = grad_scaler(sp, device)
    model = fast_path(raw, ema, opt, sp, device, 1)
    params, ema_params = list(raw.parameters()), list(ema.parameters())

    def step():  # what train does per step, the batch aside
        train_step(model, opt, scaler, diffusion, *batch, cfg, sp)
        update_ema(ema_params, params, cfg.ema_decay)

    return step


def profile_step(step, device, top=10):
    """torch.profiler over three calls of step() -> the table of the top operators and kernels by
    their own time on the device (on a CPU: the host), printed and returned as text."""
    cuda = device.type == "cuda"
    kinds = torch.profiler.ProfilerActivity
    activities = [kinds.CPU] + ([kinds.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            step()
        if cuda:
            torch.cuda.synchronize()
    table = prof.key_averages().table(
        sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
        row_limit=top,
        max_name_column_width=70,
    )
    print(f"profile: three training steps, top {top} by self time\n{table}", flush=True)
    return table


def bench_sampling(cfg, num_classes, repeats, device):
    """Seconds to sample 16 pairs with each sampler, as the sample command runs them."""
    print("sampling 16 pairs", flush=True)
    torch.manual_seed(0)
    fast = speed(cfg, device)  # what sample uses here
    net = sampling_model(ResUNet(cfg).to(device).eval(), fast, device)
    diffusion = GaussianDiffusion(cfg.timesteps, cfg.schedule).to(device)

    def draw(sampler, k):
        g = make_generator(device, SAMPLE_STREAM, 0, 0)
        return generate(net, diffusion, cfg, fast, num_classes, 16, g, device, sampler, k)

    draw("ddim", 2)  # warm-up (compilation) with 2 steps: 250 would double a CPU's time
    rows = {}
    for sampler, k in (
        ("ddpm", cfg.timesteps),
        ("ddim", 50),
        ("dpm++", 20),
        ("dpm++", 10),
        ("dpm++sde", 20),
    ):
        k = min(k, cfg.timesteps)
        rows[f"{sampler}_{k}_s"] = timed(partial(draw, sampler, k), repeats, device, warmup=False)
        show(f"{sampler}, {k} steps", f"{rows[f'{sampler}_{k}_s']:.2f} s")
    return rows


def bench_features(images, repeats, device):
    """Images per second through the FID Inception (299 x 299): metrics' network, and the
    TorchScript file it was loaded from when $SIMGEN_INCEPTION names one (the reference)."""
    print("FID features (299x299)", flush=True)
    try:
        inception, weights = metrics.load_inception(), "FID"
    except metrics.MetricsError as e:  # no weights here: the speed does not depend on them
        inception, weights = metrics.InceptionV3().eval(), f"random: no FID weights ({e})"
    n = 50 if device.type == "cuda" else 4  # images per call: metrics' default batch on a GPU

    def rate(net):
        run = partial(metrics.inception_features, net, images[:n], n, device)
        return n / timed(run, repeats, device)

    res = dict(weights=weights, images=n, hand_rolled_images_per_s=rate(inception))
    show(
        "hand-rolled InceptionV3",
        f"{res['hand_rolled_images_per_s']:.1f} img/s",
        f"{weights} weights",
    )
    script = os.environ.get(metrics.WEIGHTS_ENV)
    script = script if script and metrics.is_torchscript(script) else None
    res["reference_images_per_s"] = None
    if script:
        res["reference_images_per_s"] = rate(torch.jit.load(script, map_location=device))
    show(
        "reference TorchScript",
        f"{res['reference_images_per_s']:.1f} img/s" if script else "n/a",
        "" if script else f"${metrics.WEIGHTS_ENV} names no TorchScript FID Inception",
    )
    return res


def bench_distances(repeats):
    """Seconds of eval's distances for 120 fake against 120 real images and 5 classes of 100
    regions each: the sizes of a val split. Random features: the time does not depend on them."""
    rng = np.random.default_rng(0)
    sets = [
        {
            k: rng.normal(size=(120 if k == "images" else 100, metrics.FEATURE_DIM))
            for k in ("images", *(f"class_{c}" for c in range(5)))
        }
        for _ in range(2)
    ]
    seconds = timed(partial(metrics.distances, *sets), repeats, torch.device("cpu"), warmup=False)
    show("FID, KID, 5 x sFID/sKID (120 images)", f"{seconds:.2f} s", "float64 on the CPU")
    return seconds


def bench_batches(cfg, images, masks, num_classes, repeats, device):
    """Training batches per second, as train's loop makes them (on the device)."""
    print("data loading (cached set, on the device)", flush=True)
    channels_last = speed(cfg, device).channels_last

    def batches():
        for step in range(10):
            training_batch(images, masks, num_classes, cfg, step, 0, 1, channels_last)

    rate = 10 * cfg.batch_size / timed(batches, repeats, device)
    show("training batches", f"{rate:.0f} img/s", "gather, flip, encode, draw t and noise")
    return rate


# ==================================================================================== command line


def int_tuple(text):  # --channel-mults 1,2,4
    return tuple(int(v) for v in text.split(","))


def add_config_flags(parser, defaults, keep_defaults=False):
    """A flag per Config field (--image-size 64, --channel-mults 1,2,4, --no-amp); unset: None
    unless keep_defaults."""
    for name, default in defaults.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = int_tuple if isinstance(default, tuple) else type(default)
            parser.add_argument(
                flag,
                type=kind,
                default=default if keep_defaults else None,
                help=f"default {default}",
            )


def build_parser():
    """The commands; train gets one flag per Config field, segment one per SEGMENT field."""
    parser = argparse.ArgumentParser(prog="simgen.py", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (add_train, add_sample, add_eval, add_segment, add_bench):
        add(commands)
    return parser


def add_train(commands):
    p = commands.add_parser("train", help="train on a dataset folder or 'synthetic'")
    p.add_argument("data", nargs="?", help="dataset folder or 'synthetic' (default: the demo)")
    p.add_argument("--out", help="run folder (default runs/<data>-<preset>); rerun to resume")
    p.add_argument("--preset", choices=PRESETS, help="tiny (tests), demo (CPU), paper (default)")
    defaults = {f.name: f.default for f in fields(Config) if f.name != "data"}
    add_config_flags(p, defaults)  # unset flags are None: not chosen


def add_sample(commands):
    p = commands.add_parser("sample", help="generate image-mask pairs from a checkpoint")
    p.add_argument("ckpt")
    p.add_argument("--out", help="output folder (default samples/<run folder name>)")
    p.add_argument("--n", type=int, help="pairs (default 16; with --given, all of the split's)")
    p.add_argument("--sampler", default="ddpm", choices=SAMPLERS, help="ddpm: T steps (paper)")
    p.add_argument("--steps", type=int, default=20, help="steps of the other samplers (20)")
    p.add_argument("--given", choices=("images", "masks"), help="keep this half of --data's")
    p.add_argument("--data", help="dataset folder or 'synthetic' whose pairs --given takes")
    p.add_argument("--split", default="val", help="split of --data (default val)")
    p.add_argument("--resample", type=int, default=1, help="RePaint's rounds per step (1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--force", action="store_true", help="replace an earlier sample in --out")
    for name in SPEED_FIELDS:  # default: the checkpoint's config, on CUDA only
        p.add_argument("--" + name.replace("_", "-"), action=argparse.BooleanOptionalAction)


def add_eval(commands):
    p = commands.add_parser("eval", help="FID, KID, sFID, sKID of generated pairs against real")
    p.add_argument("real", help="dataset folder or 'synthetic'; its features are cached")
    p.add_argument("fake", help="dataset folder, e.g. sample's; classes matched by mask value")
    p.add_argument("--json", help="write the scores here")
    p.add_argument("--real-split", default="all")
    p.add_argument("--fake-split", default="all")
    p.add_argument("--image-size", type=int, help="default: FAKE's image size (else 256)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", help="default cuda if available, else cpu")


def add_segment(commands):
    p = commands.add_parser("segment", help="train a segmentation ResUNet, IoU on a real split")
    p.add_argument("train", nargs="+", help="dataset folders (real, generated); first: the real")
    p.add_argument("--test", required=True, help="real dataset folder for the IoU")
    p.add_argument("--test-split", default="val")
    p.add_argument("--train-split", default="train", help="one split, or one each: train,all")
    p.add_argument("--real-fraction", type=float, default=1.0, help="of the first TRAIN folder")
    p.add_argument("--out", help="folder for segment.pt")
    p.add_argument("--json", help="write the IoU table here")
    add_config_flags(p, {**SEGMENT, "seed": 0}, keep_defaults=True)


def add_bench(commands):
    p = commands.add_parser("bench", help="speed of training, sampling, features, data here")
    p.add_argument("--json", help="also write every number here")
    p.add_argument("--config", choices=BENCH_CONFIGS, help="paper (CUDA), small (CPU), tiny")
    p.add_argument("--repeats", type=int, help="timed repeats, median shown (10 CUDA, 3 CPU)")
    p.add_argument("--profile", action="store_true", help="also profile the fastest step")


def train_config(args):
    """Parsed train arguments -> (Config, names of the fields set by preset or flag, run folder)."""
    preset = args.preset or ("demo" if args.data is None else "paper")
    if args.data is None and args.preset is None:
        print("no DATA given: training on the built-in synthetic dataset with --preset demo")
    chosen = dict(PRESETS[preset])  # the paper preset is the defaults: nothing chosen
    chosen.update(
        {
            f.name: getattr(args, f.name)
            for f in fields(Config)
            if f.name != "data" and getattr(args, f.name) is not None
        }
    )
    chosen["data"] = args.data or "synthetic"
    cfg = replace(Config(), **chosen)
    return cfg, set(chosen), Path(args.out or Path("runs") / f"{Path(cfg.data).name}-{preset}")


def flags(args, *names):  # the parsed values of names, as keyword arguments
    return {name: getattr(args, name) for name in names}


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:  # errors the user can fix are one line and exit status 1, never a traceback
        if args.command == "train":
            cfg, chosen, out = train_config(args)
            train(cfg, out, explicit=chosen)
        elif args.command == "sample":
            out = args.out or Path("samples") / Path(args.ckpt).resolve().parent.name
            fast = {k: v for k, v in flags(args, *SPEED_FIELDS).items() if v is not None}
            names = ("n", "sampler", "steps", "seed", "batch_size", "force", "given", "split")
            sample(
                args.ckpt,
                out,
                fast=fast,
                data_root=args.data,
                resample=args.resample,
                **flags(args, *names),
            )
        elif args.command == "bench":
            bench(args.config, args.repeats, args.json, args.profile)
        elif args.command == "eval":
            names = ("image_size", "real_split", "fake_split", "batch_size", "device")
            result = evaluate(args.real, args.fake, **flags(args, *names))
        elif args.command == "segment":
            cfg = replace(Config(), **flags(args, *SEGMENT, "seed"))
            splits = args.train_split.split(",")
            result = segment(
                args.train,
                args.test,
                cfg,
                train_split=splits,
                **flags(args, "test_split", "real_fraction", "out"),
            )
        if args.command in ("eval", "segment") and args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
            print(f"scores in {args.json}")
    except (data.DataError, metrics.MetricsError, FloatingPointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
