"""Sampler updates taken element by element, so every latent pixel can sit at its own noise level.

- ddim_step: the reference's DDIM(eta) update in alpha space with per-pixel integer timesteps.
- ancestral_step, ddpm_step, dpmpp_2m_step: ComfyUI's k-diffusion updates (VE coordinates: x = x0 + sigma eps,
  `denoised` is the model's x0 prediction) with sigma maps instead of one sigma per image. Their
  arithmetic follows comfy/k_diffusion/sampling.py operation for operation, so a constant sigma
  map reproduces the stock step to float rounding; Python branches on sigma become torch.where.

DDIM(eta) with sigma = sqrt((1 - a) / a) and x~ = x / sqrt(a) is exactly ancestral_step with the
same eta (method.md), which is why one sigma-space rule covers the reference sampler.
"""

from __future__ import annotations

import math

import torch

from .checks import all_true, broadcasts_to, describe_shape, require_float_tensor

__all__ = ["ddim_step", "ancestral_step", "ddpm_step", "dpmpp_2m_step"]


# ------------------------------------------------------------------------------------------------
# Checks.


def _same_shape(name: str, value: object, x: torch.Tensor) -> torch.Tensor:
    t = require_float_tensor(name, value)
    if t.shape != x.shape:
        raise ValueError(f"{name} has shape {describe_shape(t)} but x has {describe_shape(x)}; they must match")
    return t


def _map(name: str, value: object, x: torch.Tensor) -> torch.Tensor:
    t = require_float_tensor(name, value)
    if not broadcasts_to(t.shape, x.shape):
        raise ValueError(
            f"{name} of shape {describe_shape(t)} does not broadcast to x's shape {describe_shape(x)}; "
            "use e.g. (B, 1, H, W) for a per-pixel map"
        )
    return t


def _eta(eta: float) -> float:
    try:
        value = float(eta)
    except (TypeError, ValueError):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}") from None
    if not (0.0 <= value < math.inf):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    return value


def _noise(noise: object, x: torch.Tensor, needed: bool) -> torch.Tensor | None:
    if noise is None:
        if needed:
            raise ValueError("eta > 0 adds fresh noise: pass noise, a standard normal tensor shaped like x")
        return None
    return _same_shape("noise", noise, x)


def _check_sigmas(sigma: torch.Tensor, sigma_next: torch.Tensor, sigma_prev: torch.Tensor | None = None) -> None:
    """sigma finite, 0 <= sigma_next <= sigma (a pixel's noise never rises), sigma_prev >= sigma."""
    flags = [torch.isfinite(sigma), (sigma_next >= 0) & (sigma_next <= sigma)]
    if sigma_prev is not None:
        flags.append(torch.isfinite(sigma_prev) & (sigma_prev >= sigma))
    if all_true(flags):
        return
    if not bool(torch.isfinite(sigma).all()):
        raise ValueError("sigma holds NaN or infinite values; expected finite noise levels")
    if not bool((sigma_next >= 0).all()):
        raise ValueError("sigma_next holds negative values or NaN; expected noise levels >= 0")
    if not bool((sigma_next <= sigma).all()):
        raise ValueError("sigma_next is larger than sigma at some pixels; a pixel's noise level must never increase")
    raise ValueError("sigma_prev is smaller than sigma (or not finite) at some pixels; expected sigma_prev >= sigma")


# ------------------------------------------------------------------------------------------------
# Alpha space (the reference).


def ddim_step(
    x: torch.Tensor,
    eps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    *,
    eta: float,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """DDIM(eta) from integer timesteps t to t_prev, pixel by pixel (t, t_prev broadcast to x).

    t_prev = 0 uses alphas_cumprod[0] (not 1), as the reference's last step does; a pixel with
    t_prev == t is returned unchanged. std is capped at sqrt(1 - a_prev), which only matters for
    eta > 1 and mirrors k-diffusion's sigma_up <= sigma_next.
    """
    x = require_float_tensor("x", x)
    eps = _same_shape("eps", eps, x)
    table = require_float_tensor("alphas_cumprod", alphas_cumprod)
    if table.ndim != 1 or table.shape[0] < 1:
        raise ValueError(f"alphas_cumprod must be a non-empty 1-D table, got shape {describe_shape(table)}")
    for name, idx in (("t", t), ("t_prev", t_prev)):
        if not isinstance(idx, torch.Tensor) or idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor of timesteps (use timesteps.round_clamp)")
        if not broadcasts_to(idx.shape, x.shape):
            raise ValueError(f"{name} of shape {describe_shape(idx)} does not broadcast to x's shape {describe_shape(x)}")
    e = _eta(eta)
    z = _noise(noise, x, e > 0)
    size = table.shape[0]
    t_dev, tp_dev = t.to(table.device), t_prev.to(table.device)
    if not all_true([(t_dev >= 0) & (t_dev < size), (tp_dev >= 0) & (tp_dev <= t_dev)]):
        raise ValueError(
            f"timesteps must satisfy 0 <= t_prev <= t < {size} (the length of alphas_cumprod) at every pixel"
        )

    dtype = torch.promote_types(x.dtype, table.dtype)
    a_t = table[t_dev].to(device=x.device, dtype=dtype)
    a_p = table[tp_dev].to(device=x.device, dtype=dtype)
    xc, ec = x.to(dtype), eps.to(dtype)
    x0 = (xc - (1 - a_t).sqrt() * ec) / a_t.sqrt()
    var = ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)).clamp_min(0)
    std = torch.minimum(e * var.sqrt(), (1 - a_p).sqrt())
    out = a_p.sqrt() * x0 + (1 - a_p - std**2).clamp_min(0).sqrt() * ec
    if z is not None:
        out = out + std * z.to(dtype)
    return torch.where(t_prev.to(x.device) == t.to(x.device), x, out.to(x.dtype))


# ------------------------------------------------------------------------------------------------
# Sigma space (ComfyUI / k-diffusion).


def ancestral_step(
    x: torch.Tensor,
    denoised: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    *,
    eta: float,
    noise: torch.Tensor | None,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Euler-ancestral step with sigma maps; eta = 0 is Euler, eta = 1 is DDPM / DDIM(1).

    With eta > 0, where sigma_down is 0 (sigma_next == 0) the result is `denoised`, as in
    k-diffusion's sample_euler_ancestral; with eta = 0 the step is sample_euler's x + d * dt there
    too (the same value up to rounding, and KSampler's "euler" rounding). Where sigma_next == sigma
    the pixel is left exactly as it is and gets no noise.
    """
    x = require_float_tensor("x", x)
    denoised = _same_shape("denoised", denoised, x)
    sigma = _map("sigma", sigma, x)
    sigma_next = _map("sigma_next", sigma_next, x)
    e = _eta(eta)
    z = _noise(noise, x, e > 0)
    if not math.isfinite(float(s_noise)):
        raise ValueError(f"s_noise must be a finite number, got {s_noise!r}")
    _check_sigmas(sigma, sigma_next)

    still = sigma_next == sigma
    safe_sigma = torch.where(sigma == 0, torch.ones_like(sigma), sigma)  # only where still
    # get_ancestral_step, element by element.
    if e == 0 or z is None:
        sigma_down, sigma_up = sigma_next, None
    else:
        sigma_up = torch.minimum(
            sigma_next, e * (sigma_next**2 * (safe_sigma**2 - sigma_next**2) / safe_sigma**2) ** 0.5
        )
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    # to_d and the Euler step.
    d = (x - denoised) / safe_sigma
    dt = sigma_down - safe_sigma
    out = x + d * dt
    if sigma_up is not None and z is not None:
        out = out + z * s_noise * sigma_up
        out = torch.where(sigma_down == 0, denoised, out)
    return torch.where(still, x, out)


def ddpm_step(
    x: torch.Tensor,
    denoised: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    *,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """ComfyUI's DDPM step (k-diffusion's DDPMSampler_step inside generic_step_sampler) with sigma maps.

    Mathematically the Euler-ancestral step with eta = 1, but computed in alpha space with the
    stock sampler's own operations, so that a constant map gives ComfyUI's "ddpm" bit for bit.
    Fresh noise is added only where sigma_next > 0 (pass None when the carrier's next sigma is 0);
    where sigma_next == sigma the pixel is left exactly as it is.
    """
    x = require_float_tensor("x", x)
    denoised = _same_shape("denoised", denoised, x)
    sigma = _map("sigma", sigma, x)
    sigma_next = _map("sigma_next", sigma_next, x)
    z = _noise(noise, x, False)
    _check_sigmas(sigma, sigma_next)

    still = sigma_next == sigma
    safe_sigma = torch.where(sigma == 0, torch.ones_like(sigma), sigma)  # only where still
    eps = (x - denoised) / safe_sigma
    x_vp = x / torch.sqrt(1.0 + safe_sigma**2.0)
    alpha_cumprod = 1 / ((safe_sigma * safe_sigma) + 1)
    alpha_cumprod_next = 1 / ((sigma_next * sigma_next) + 1)
    alpha = alpha_cumprod / alpha_cumprod_next
    mu = (1.0 / alpha).sqrt() * (x_vp - (1 - alpha) * eps / (1 - alpha_cumprod).sqrt())
    if z is not None:
        added = mu + ((1 - alpha) * (1.0 - alpha_cumprod_next) / (1.0 - alpha_cumprod)).sqrt() * z
        mu = torch.where(sigma_next > 0, added, mu)
    out = torch.where(sigma_next != 0, mu * torch.sqrt(1.0 + sigma_next**2.0), mu)
    return torch.where(still, x, out)


def dpmpp_2m_step(
    x: torch.Tensor,
    denoised: torch.Tensor,
    old_denoised: torch.Tensor | None,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    sigma_prev: torch.Tensor | None,
) -> torch.Tensor:
    """DPM-Solver++(2M) with sigma maps (Lu et al. 2022, as in k-diffusion's sample_dpmpp_2m).

    First order on the first step (old_denoised is None), where sigma_next == 0 (giving
    `denoised`) and where the pixel did not move on the previous step (h_last == 0, no history to
    extrapolate from); a pixel with sigma_next == sigma is left exactly as it is.
    """
    x = require_float_tensor("x", x)
    denoised = _same_shape("denoised", denoised, x)
    sigma = _map("sigma", sigma, x)
    sigma_next = _map("sigma_next", sigma_next, x)
    if old_denoised is not None:
        old_denoised = _same_shape("old_denoised", old_denoised, x)
        if sigma_prev is None:
            raise ValueError("sigma_prev is needed with old_denoised: pass the sigma map of the previous step")
        sigma_prev = _map("sigma_prev", sigma_prev, x)
    _check_sigmas(sigma, sigma_next, sigma_prev if old_denoised is not None else None)

    still = sigma_next == sigma
    # Same lambdas as k-diffusion: t = -log(sigma), sigma = exp(-t).
    t = sigma.log().neg()
    t_next = sigma_next.log().neg()
    h = t_next - t
    ratio = t_next.neg().exp() / t.neg().exp()
    step = (-h).expm1()
    first = ratio * x - step * denoised
    if old_denoised is None or sigma_prev is None:
        out = first
    else:
        h_last = t - sigma_prev.log().neg()
        second_ok = (sigma_next != 0) & (h_last != 0) & ~still
        r = h_last / torch.where(second_ok, h, torch.ones_like(h))
        r = torch.where(second_ok, r, torch.ones_like(r))
        denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        second = ratio * x - step * denoised_d
        out = torch.where(second_ok, second, first)
    return torch.where(still, x, out)
