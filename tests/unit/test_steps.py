"""asyndm.steps against scalar float64 statements of the updates.

ref_ddim is method.md's DDIM; ref_ancestral and ref_dpmpp_2m restate k-diffusion's
sample_euler_ancestral / sample_dpmpp_2m steps for one number. The tests apply them one element at
a time with plain Python floats and never call asyndm to compute an expected value.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asyndm.steps import ancestral_step, ddim_step, ddpm_step, dpmpp_2m_step

SETTINGS = settings(max_examples=40, deadline=None)
SHAPE = (2, 3, 4, 4)  # (B, C, H, W); maps are (B, 1, H, W)


def sd_alphas_cumprod(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Stable Diffusion's scaled-linear schedule (T = 1000)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0).to(dtype)


# ------------------------------------------------------------------------------------------------
# Scalar references.


def ref_ddim(x: float, eps: float, a_t: float, a_p: float, same: bool, eta: float, z: float) -> float:
    if same:
        return x
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    var = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
    std = eta * math.sqrt(var)
    return math.sqrt(a_p) * x0 + math.sqrt(1 - a_p - std**2) * eps + std * z


def ref_ancestral(x: float, den: float, s: float, sn: float, eta: float, z: float, s_noise: float = 1.0) -> float:
    if sn == s:
        return x
    if eta == 0:
        down, up = sn, 0.0
    else:
        up = min(sn, eta * math.sqrt(sn**2 * (s**2 - sn**2) / s**2))
        down = math.sqrt(sn**2 - up**2)
    if down == 0:
        return den
    return x + (x - den) / s * (down - s) + z * s_noise * up


def ref_dpmpp_2m(x: float, den: float, old: float | None, s: float, sn: float, sp: float | None) -> float:
    if sn == s:
        return x
    if sn == 0:
        return den
    t, t_next = -math.log(s), -math.log(sn)
    h = t_next - t
    if old is None or sp is None or sp == s:
        return (sn / s) * x - math.expm1(-h) * den
    r = (t - (-math.log(sp))) / h
    d = (1 + 1 / (2 * r)) * den - (1 / (2 * r)) * old
    return (sn / s) * x - math.expm1(-h) * d


def elementwise(fn: Callable[..., float], shape: tuple[int, ...], *tensors: torch.Tensor | None) -> torch.Tensor:
    """Apply a scalar function element by element after broadcasting every tensor to `shape`."""
    expanded = [None if t is None else t.double().expand(shape).flatten().tolist() for t in tensors]
    out = [fn(*[None if e is None else e[i] for e in expanded]) for i in range(math.prod(shape))]
    return torch.tensor(out, dtype=torch.float64).view(shape)


def pixel_map(values: list[float], g: torch.Generator) -> torch.Tensor:
    """A (B, 1, H, W) map whose pixels are drawn from `values`."""
    idx = torch.randint(0, len(values), (SHAPE[0], 1, *SHAPE[2:]), generator=g)
    return torch.tensor(values, dtype=torch.float64)[idx]


# ------------------------------------------------------------------------------------------------
# DDIM (alpha space).


@SETTINGS
@given(eta=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_ddim_matches_reference(eta: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ac = sd_alphas_cumprod()
    t = torch.randint(0, 1000, (SHAPE[0], 1, *SHAPE[2:]), generator=g)
    t_prev = (t - torch.randint(0, 60, t.shape, generator=g)).clamp_min(0)
    x, eps, z = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(3))
    got = ddim_step(x, eps, ac, t, t_prev, eta=eta, noise=z)
    a_t, a_p = ac[t], ac[t_prev]
    same = (t == t_prev).double()
    want = elementwise(lambda xi, ei, at, ap, sm, zi: ref_ddim(xi, ei, at, ap, sm > 0, eta, zi),
                       SHAPE, x, eps, a_t, a_p, same, z)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_ddim_last_step_uses_alphas_cumprod_0_and_still_adds_noise() -> None:
    ac = sd_alphas_cumprod()
    x = torch.full((1, 1, 1, 1), 0.3, dtype=torch.float64)
    eps = torch.full_like(x, -0.2)
    z = torch.full_like(x, 1.5)
    t = torch.full((1, 1, 1, 1), 21)
    got = ddim_step(x, eps, ac, t, torch.zeros_like(t), eta=1.0, noise=z).item()
    want = ref_ddim(0.3, -0.2, ac[21].item(), ac[0].item(), False, 1.0, 1.5)
    x0 = (0.3 - math.sqrt(1 - ac[21].item()) * -0.2) / math.sqrt(ac[21].item())
    assert got == pytest.approx(want, abs=1e-14)
    assert abs(got - x0) > 1e-3  # not the clean x0 an alpha of 1 would give


def test_ddim_keeps_pixels_whose_timestep_does_not_move() -> None:
    ac = sd_alphas_cumprod(torch.float32)
    g = torch.Generator().manual_seed(0)
    x, eps, z = (torch.randn(SHAPE, generator=g) for _ in range(3))
    t = torch.randint(1, 1000, (SHAPE[0], 1, *SHAPE[2:]), generator=g)
    keep = torch.rand(t.shape, generator=g) < 0.5
    t_prev = torch.where(keep, t, t - 1)
    out = ddim_step(x, eps, ac, t, t_prev, eta=1.0, noise=z)
    kept = keep.expand(SHAPE)
    assert torch.equal(out[kept], x[kept])
    assert not torch.equal(out[~kept], x[~kept])


@SETTINGS
@given(eta=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_ddim_is_euler_ancestral_in_sigma_space(eta: float, seed: int) -> None:
    """sigma = sqrt((1 - a) / a), x~ = x / sqrt(a), denoised = x0, same noise z: equal steps."""
    g = torch.Generator().manual_seed(seed)
    ac = sd_alphas_cumprod()
    t = torch.randint(0, 1000, (SHAPE[0], 1, *SHAPE[2:]), generator=g)
    t_prev = (t - torch.randint(0, 80, t.shape, generator=g)).clamp_min(0)
    x, eps, z = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(3))
    a_t, a_p = ac[t], ac[t_prev]
    sigma, sigma_next = ((1 - a_t) / a_t).sqrt(), ((1 - a_p) / a_p).sqrt()
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    ve = ancestral_step(x / a_t.sqrt(), x0, sigma, sigma_next, eta=eta, noise=z)
    vp = ddim_step(x, eps, ac, t, t_prev, eta=eta, noise=z)
    assert torch.allclose(ve * a_p.sqrt(), vp, rtol=1e-10, atol=1e-10)


def test_ddim_caps_noise_like_k_diffusion_for_eta_above_one() -> None:
    ac = sd_alphas_cumprod()
    x = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    t, t_prev = torch.full((1, 1, 1, 1), 500), torch.full((1, 1, 1, 1), 100)
    out = ddim_step(x, torch.zeros_like(x), ac, t, t_prev, eta=50.0, noise=torch.zeros_like(x))
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------
# Euler / Euler ancestral (sigma space).


def _denoiser(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A deterministic stand-in for a model's x0 prediction."""
    return torch.tanh(x / (1 + sigma)) * 0.8 - 0.1


SIGMAS = [14.6, 9.7, 6.1, 3.3, 1.7, 0.81, 0.3, 0.029, 0.0]


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ancestral_constant_map_is_the_scalar_sampler(eta: float) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64) * SIGMAS[0]
    noises = [torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in SIGMAS]
    ref = x.clone()
    for i in range(len(SIGMAS) - 1):
        s, sn = SIGMAS[i], SIGMAS[i + 1]
        den = _denoiser(x, s)
        x_last = x
        x = ancestral_step(x, den, torch.full((SHAPE[0], 1, 1, 1), s, dtype=torch.float64),
                           torch.full((1, 1, 1, 1), sn, dtype=torch.float64), eta=eta, noise=noises[i])
        den_ref = _denoiser(ref, s)
        ref = elementwise(lambda xi, di, zi, s=s, sn=sn: ref_ancestral(xi, di, s, sn, eta, zi), SHAPE, ref, den_ref, noises[i])
        assert torch.allclose(x, ref, rtol=1e-12, atol=1e-12), i
    if eta > 0:  # as sample_euler_ancestral, the last step (sigma_next = 0) returns the denoised estimate itself
        assert torch.equal(x, den)
    else:  # as sample_euler, the last step is x + d * dt with dt = -sigma
        assert torch.equal(x, x_last + (x_last - den) / SIGMAS[-2] * (0.0 - SIGMAS[-2]))


@SETTINGS
@given(eta=st.floats(0.0, 1.5), s_noise=st.floats(0.5, 1.5), seed=st.integers(0, 2**16))
def test_ancestral_per_pixel_matches_reference(eta: float, s_noise: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    sigma = pixel_map(SIGMAS[:-1], g)
    drop = pixel_map([0.0, 0.0, 0.3, 0.6, 1.0], g)  # 1.0: the pixel stays where it is
    sigma_next = torch.where(drop == 1.0, sigma, sigma * drop)
    x, den, z = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(3))
    got = ancestral_step(x, den, sigma, sigma_next, eta=eta, noise=z, s_noise=s_noise)
    want = elementwise(lambda xi, di, s, sn, zi: ref_ancestral(xi, di, s, sn, eta, zi, s_noise),
                       SHAPE, x, den, sigma, sigma_next, z)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(seed=st.integers(0, 2**16))
def test_ddpm_per_pixel_is_ancestral_with_eta_one(seed: int) -> None:
    """ComfyUI's DDPM step, computed in alpha space, is the Euler-ancestral step with eta = 1
    (method.md: DDIM(1) in sigma space): checked per pixel against the scalar reference."""
    g = torch.Generator().manual_seed(seed)
    sigma = pixel_map(SIGMAS[:-1], g)
    drop = pixel_map([0.0, 0.3, 0.6, 1.0], g)  # 0.0: last step to sigma 0; 1.0: the pixel stays
    sigma_next = torch.where(drop == 1.0, sigma, sigma * drop)
    x, den, z = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(3))
    got = ddpm_step(x, den, sigma, sigma_next, noise=z)
    want = elementwise(lambda xi, di, s, sn, zi: ref_ancestral(xi, di, s, sn, 1.0, zi), SHAPE, x, den, sigma,
                       sigma_next, z)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-9)
    still = (sigma_next == sigma).expand(SHAPE)
    assert torch.equal(got[still], x[still])


def test_ddpm_without_noise_is_the_deterministic_mean() -> None:
    """noise=None (the carrier's next sigma is 0) adds nothing: the ancestral step with z = 0."""
    g = torch.Generator().manual_seed(5)
    x, den = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(2))
    sigma = torch.full((SHAPE[0], 1, 1, 1), 3.3, dtype=torch.float64)
    sigma_next = torch.full_like(sigma, 1.7)
    got = ddpm_step(x, den, sigma, sigma_next, noise=None)
    want = elementwise(lambda xi, di: ref_ancestral(xi, di, 3.3, 1.7, 1.0, 0.0), SHAPE, x, den)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_ancestral_special_pixels_are_exact() -> None:
    g = torch.Generator().manual_seed(3)
    x, den, z = (torch.randn(SHAPE, generator=g) for _ in range(3))
    sigma = torch.full((SHAPE[0], 1, *SHAPE[2:]), 2.0)
    sigma_next = torch.full_like(sigma, 1.0)
    sigma_next[:, :, 0] = 2.0  # row 0 stays
    sigma_next[:, :, 1] = 0.0  # row 1 finishes
    sigma[:, :, 2] = 0.0
    sigma_next[:, :, 2] = 0.0  # row 2 was already clean
    out = ancestral_step(x, den, sigma, sigma_next, eta=1.0, noise=z)
    assert torch.equal(out[:, :, 0], x[:, :, 0])
    assert torch.equal(out[:, :, 1], den[:, :, 1])
    assert torch.equal(out[:, :, 2], x[:, :, 2])
    assert torch.isfinite(out).all()


def test_eta_zero_is_euler_and_needs_no_noise() -> None:
    g = torch.Generator().manual_seed(4)
    x, den = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(2))
    sigma = pixel_map([5.0, 2.0, 1.0], g)
    sigma_next = sigma * 0.7
    got = ancestral_step(x, den, sigma, sigma_next, eta=0.0, noise=None)
    euler = x + (x - den) / sigma * (sigma_next - sigma)  # k-diffusion's sample_euler step
    assert torch.allclose(got, euler, rtol=1e-14, atol=1e-14)


# ------------------------------------------------------------------------------------------------
# DPM++ 2M (sigma space).


def test_dpmpp_2m_constant_map_is_the_scalar_sampler() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64) * SIGMAS[0]
    ref = x.clone()
    old: torch.Tensor | None = None
    old_ref: torch.Tensor | None = None
    for i in range(len(SIGMAS) - 1):
        s, sn = SIGMAS[i], SIGMAS[i + 1]
        sp = SIGMAS[i - 1] if i > 0 else None
        den = _denoiser(x, s)
        x = dpmpp_2m_step(x, den, old, torch.full((SHAPE[0], 1, 1, 1), s, dtype=torch.float64),
                          torch.tensor(sn, dtype=torch.float64).view(1, 1, 1, 1),
                          None if sp is None else torch.full((1, 1, 1, 1), sp, dtype=torch.float64))
        old = den
        den_ref = _denoiser(ref, s)
        ref = elementwise(lambda xi, di, oi, s=s, sn=sn, sp=sp: ref_dpmpp_2m(xi, di, oi, s, sn, sp), SHAPE, ref, den_ref, old_ref)
        old_ref = den_ref
        assert torch.allclose(x, ref, rtol=1e-12, atol=1e-12), i
    assert torch.equal(x, old)  # the last step lands on the denoised estimate (sigma_next = 0)


@SETTINGS
@given(seed=st.integers(0, 2**16), first=st.booleans())
def test_dpmpp_2m_per_pixel_matches_reference(seed: int, first: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    sigma = pixel_map(SIGMAS[1:-1], g)
    rise = pixel_map([1.0, 1.0, 1.3, 2.0], g)  # 1.0: the pixel did not move last step (h_last = 0)
    sigma_prev = sigma * rise
    drop = pixel_map([0.0, 0.4, 0.8, 1.0], g)  # 0: finishes, 1: stays
    sigma_next = sigma * drop
    x, den, old = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(3))
    got = dpmpp_2m_step(x, den, None if first else old, sigma, sigma_next, None if first else sigma_prev)
    want = elementwise(
        lambda xi, di, oi, s, sn, sp: ref_dpmpp_2m(xi, di, None if first else oi, s, sn, None if first else sp),
        SHAPE, x, den, old, sigma, sigma_next, sigma_prev,
    )
    assert torch.isfinite(got).all()
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    still = (sigma_next == sigma).expand(SHAPE)
    assert torch.equal(got[still], x[still])


def test_dpmpp_2m_uses_history_where_the_pixel_moved() -> None:
    x = torch.zeros(1, 1, 1, 2, dtype=torch.float64)
    den = torch.ones_like(x)
    old = torch.full_like(x, -1.0)
    sigma = torch.tensor([[[[2.0, 2.0]]]], dtype=torch.float64)
    sigma_prev = torch.tensor([[[[4.0, 2.0]]]], dtype=torch.float64)  # pixel 1 did not move
    out = dpmpp_2m_step(x, den, old, sigma, sigma * 0.5, sigma_prev)
    first_order = dpmpp_2m_step(x, den, None, sigma, sigma * 0.5, None)
    assert out[..., 1].item() == first_order[..., 1].item()
    assert out[..., 0].item() != pytest.approx(first_order[..., 0].item())


# ------------------------------------------------------------------------------------------------
# Bad input.


def _ok() -> dict[str, torch.Tensor]:
    x = torch.zeros(SHAPE)
    return dict(x=x, denoised=x.clone(), sigma=torch.full((SHAPE[0], 1, *SHAPE[2:]), 2.0),
                sigma_next=torch.full((SHAPE[0], 1, *SHAPE[2:]), 1.0))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(sigma_next=torch.full((1, 1, 1, 1), 3.0)), "sigma_next is larger than sigma"),
        (dict(sigma_next=torch.full((1, 1, 1, 1), -1.0)), "sigma_next holds negative values"),
        (dict(sigma=torch.full((1, 1, 1, 1), float("nan"))), "sigma holds NaN"),
        (dict(sigma=torch.ones(3, 1, 1, 1)), "does not broadcast to x's shape"),
        (dict(denoised=torch.zeros(2, 3, 4, 5)), "denoised has shape (2, 3, 4, 5)"),
        (dict(x=torch.zeros(SHAPE, dtype=torch.long)), "floating-point"),
    ],
)
def test_sigma_steps_reject_bad_input(change: dict[str, torch.Tensor], message: str) -> None:
    args = _ok()
    args.update(change)
    with pytest.raises(ValueError, match=re.escape(message)):
        ancestral_step(args["x"], args["denoised"], args["sigma"], args["sigma_next"], eta=0.0, noise=None)
    with pytest.raises(ValueError, match=re.escape(message)):
        dpmpp_2m_step(args["x"], args["denoised"], None, args["sigma"], args["sigma_next"], None)


def test_ancestral_rejects_bad_eta_and_missing_noise() -> None:
    a = _ok()
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        ancestral_step(a["x"], a["denoised"], a["sigma"], a["sigma_next"], eta=-0.5, noise=a["x"])
    with pytest.raises(ValueError, match="pass noise"):
        ancestral_step(a["x"], a["denoised"], a["sigma"], a["sigma_next"], eta=1.0, noise=None)
    with pytest.raises(ValueError, match="noise has shape"):
        ancestral_step(a["x"], a["denoised"], a["sigma"], a["sigma_next"], eta=1.0, noise=torch.zeros(1))


def test_dpmpp_2m_rejects_history_without_sigma_prev() -> None:
    a = _ok()
    with pytest.raises(ValueError, match="sigma_prev is needed"):
        dpmpp_2m_step(a["x"], a["denoised"], a["x"], a["sigma"], a["sigma_next"], None)
    with pytest.raises(ValueError, match="sigma_prev is smaller than sigma"):
        dpmpp_2m_step(a["x"], a["denoised"], a["x"], a["sigma"], a["sigma_next"], a["sigma_next"])


@pytest.mark.parametrize(
    ("t", "t_prev", "message"),
    [
        (torch.full((1, 1, 1, 1), 1000), torch.zeros(1, 1, 1, 1, dtype=torch.long), "t_prev <= t < 1000"),
        (torch.full((1, 1, 1, 1), 10), torch.full((1, 1, 1, 1), 11), "t_prev <= t"),
        (torch.full((1, 1, 1, 1), 10), torch.full((1, 1, 1, 1), -1), "0 <= t_prev"),
        (torch.full((1, 1, 1, 1), 10.0), torch.zeros(1, 1, 1, 1, dtype=torch.long), "t must be an integer tensor"),
        (torch.full((3, 1, 1, 1), 10), torch.zeros(1, 1, 1, 1, dtype=torch.long), "does not broadcast"),
    ],
)
def test_ddim_rejects_bad_timesteps(t: torch.Tensor, t_prev: torch.Tensor, message: str) -> None:
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match=re.escape(message)):
        ddim_step(x, x, sd_alphas_cumprod(), t, t_prev, eta=0.0, noise=None)


def test_ddim_rejects_bad_table_and_eta() -> None:
    x = torch.zeros(SHAPE)
    t = torch.full((1, 1, 1, 1), 10)
    with pytest.raises(ValueError, match="1-D table"):
        ddim_step(x, x, sd_alphas_cumprod().view(10, 100), t, t, eta=0.0, noise=None)
    with pytest.raises(ValueError, match="eta must be a finite number"):
        ddim_step(x, x, sd_alphas_cumprod(), t, t, eta=float("inf"), noise=x)
    with pytest.raises(ValueError, match="eps has shape"):
        ddim_step(x, torch.zeros(1), sd_alphas_cumprod(), t, t, eta=0.0, noise=None)
