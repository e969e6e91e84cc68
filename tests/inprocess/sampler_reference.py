"""Float64 per-pixel samplers written from the published update formulas, and the harness that runs them
beside the Asynchronous KSampler's sampler (AsynSampler) and ComfyUI's KSampler.

The reference never calls ComfyUI's sampler code: every update below is restated from its paper
(Karras et al. 2022 for Euler / Heun / Euler ancestral, Lu et al. 2022 for DPM-Solver++(2M) and
its SDE variant, Zhao et al. 2023 for UniPC, Zhang et al. 2023 for RES, Luo et al. 2023 for LCM,
and the third-order SDE multistep as k-diffusion documents it), element by element, with every
pixel's own current, next and previous sigmas. What it shares with the routes under study is the
per-pixel model call (the pack's APPLY_MODEL wrapper, one float32 forward per evaluation), the
tracks (the schedule: AsynSampler.fixed_tracks, whose state maths test_async_parity checks against
method.md) and the noise *sources*: the seeded Gaussian draws of ComfyUI's default noise
sampler and one torchsde Brownian tree on the union of the tracks' intervals, queried here directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import torch
import torchsde

from asyndm.comfy_adapter.families import time_adapter
from asyndm.comfy_adapter.model_wrapper import WRAPPER_KEY, AreaRecorder, PerPixelApplyModel, StepMaps
from asyndm.comfy_adapter.sampler import AsynSampler
from asyndm.comfy_adapter.track_model import PixelModel, TrackSet
from asyndm.schedule_spec import AsynSchedule

F64 = torch.float64
REFERENCE_SAMPLERS = ("euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "lcm",
                      "res_multistep", "uni_pc")


@contextmanager
def per_pixel_model(model_wrap: Any, extra_args: dict, latent_image: torch.Tensor,
                    sigmas: torch.Tensor) -> Iterator[PixelModel]:
    """The pack's per-pixel model call for one run: its APPLY_MODEL wrapper and the family's time hooks."""
    time_hooks = time_adapter(model_wrap.inner_model.diffusion_model)
    maps = StepMaps()
    options = extra_args["model_options"]
    comfy.patcher_extension.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                                                 PerPixelApplyModel(maps, time_hooks), options, is_model_options=True)
    comfy.patcher_extension.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY,
                                                 AreaRecorder(maps), options, is_model_options=True)
    with time_hooks:
        yield PixelModel(model_wrap, maps, latent_image, latent_image, None, sigmas)


class _Noise:
    """The noise sources: seeded Gaussian draws (one full-size draw per call, as ComfyUI's default
    noise sampler makes them) and the Brownian path W on [min positive sigma, max sigma]."""

    def __init__(self, shape: torch.Size, seed: int, seq: torch.Tensor, tracks: TrackSet) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.shape = shape
        self.tracks = tracks
        sig = tracks.sigmas
        t0, t1 = sig[sig > 0].min().cpu(), sig.max().cpu()
        self.tree = torchsde.BrownianTree(t0, torch.zeros(shape), t1, entropy=seed)

    def gaussian(self) -> torch.Tensor:
        return torch.randn(self.shape, generator=self.gen).to(F64)

    def brownian(self, i: int, j: int = 1) -> torch.Tensor:
        """Per pixel: (W(sigma_p[i + j]) - W(sigma_p[i])) / sqrt(sigma_p[i] - sigma_p[i + j])."""
        out = torch.zeros(self.shape, dtype=F64)
        for track in range(self.tracks.count):
            a, b = self.tracks.sigmas[track, i].cpu(), self.tracks.sigmas[track, i + j].cpu()
            if bool(a == b):  # a track holding still: no increment (the step leaves it as it is)
                continue
            increment = self.tree(b, a).to(F64)  # W(a) - W(b), b < a
            z = -increment / (a.double() - b.double()).sqrt()
            out = torch.where(self.tracks.mask(track).cpu(), z, out)
        return out


class ReferenceSampler(comfy.samplers.Sampler):
    """A comfy SAMPLER whose update is the float64 per-pixel statement of `name`."""

    def __init__(self, name: str, tracks_fn: Callable[[Any, torch.Tensor, torch.Tensor], TrackSet]) -> None:
        if name not in REFERENCE_SAMPLERS:
            raise ValueError(name)
        self.name = name
        self.tracks_fn = tracks_fn
        self.model_calls = 0

    def sample(self, model_wrap: Any, sigmas: torch.Tensor, extra_args: dict, callback: Callable | None,
               noise: torch.Tensor, latent_image: torch.Tensor | None = None, denoise_mask: torch.Tensor | None = None,
               disable_pbar: bool = False) -> torch.Tensor:
        if latent_image is None:
            latent_image = torch.zeros_like(noise)
        ms = model_wrap.inner_model.model_sampling
        tracks = self.tracks_fn(model_wrap, sigmas, noise)
        seq = tracks.sigmas.to(F64).T[:, tracks.index][:, :, None]  # (N + 1, B, 1, H, W) float64
        carrier = tracks.sigmas[0]
        seed = int(extra_args.get("seed") or 0)
        opts = extra_args["model_options"]
        # start: the seed's noise at every pixel's own first sigma (x = latent + sigma n; with the
        # model's largest sigma, unit-variance input: n sqrt(1 + sigma^2), KSampler's max_denoise)
        top = float(ms.sigma_max)
        s0 = seq[0]
        scale = torch.where(s0 >= top * (1 - 1e-5), (1 + s0**2).sqrt(), s0)
        x = noise.to(F64) * scale + latent_image.to(F64)
        with per_pixel_model(model_wrap, extra_args, latent_image, sigmas) as pm:
            def model(x64: torch.Tensor, sigma_map: torch.Tensor, carrier_sigma: torch.Tensor) -> torch.Tensor:
                flat = sigma_map.reshape(-1)
                uniform = bool((flat == flat[0]).all())
                b = x64.shape[0]
                sig = None if uniform else sigma_map.expand(b, 1, *x64.shape[-2:]).float()
                out = pm(x64.float(), sig, carrier_sigma.float().expand(b).contiguous(), opts, seed)
                return out.to(F64)

            # the step each pixel's own run begins at (after the steps its track holds still)
            held = torch.cumprod((seq[1:-1] == seq[0]).to(torch.long), dim=0)
            start = held.sum(dim=0)
            run = getattr(self, f"_{self.name}")
            x = run(model, x, seq, carrier, _Noise(noise.shape, seed, seq, tracks), start)
            self.model_calls = pm.calls
        return x.float()

    # ------------------------------------------------------------------------------------------
    # Every method gets `start` (B, 1, H, W): the step at which the pixel's own run begins. A pixel
    # whose track holds still for its first m steps (sigma_0 = ... = sigma_m: key pixels waiting at
    # the model's largest sigma) is left exactly as it is until step m, and its run begins there
    # (first order, no history), as the Asynchronous KSampler treats a pixel that does not move.

    # Karras et al. 2022, Algorithm 2 without churn: d = (x - D) / sigma, Euler step.
    def _euler(self, model, x, seq, carrier, noise, start):
        for i in range(seq.shape[0] - 1):
            s, s_next = seq[i], seq[i + 1]
            d = (x - model(x, s, carrier[i])) / s
            x = torch.where(i < start, x, x + d * (s_next - s))
        return x

    # Ancestral Euler (eta 1): split sigma_next into sigma_down (deterministic) and sigma_up (fresh noise).
    def _euler_ancestral(self, model, x, seq, carrier, noise, start):
        n = seq.shape[0] - 1
        for i in range(n):
            s, s_next = seq[i], seq[i + 1]
            den = model(x, s, carrier[i])
            up = torch.minimum(s_next, (s_next**2 * (s**2 - s_next**2) / s**2).sqrt())
            down = (s_next**2 - up**2).sqrt()
            if i == n - 1:  # sigma_next = 0 at every pixel: the last step returns the prediction
                x = den
                continue
            x = torch.where(i < start, x, x + (x - den) / s * (down - s) + noise.gaussian() * up)
        return x

    # Karras et al. 2022, Algorithm 2 (Heun's second-order correction, Euler on the last step).
    def _heun(self, model, x, seq, carrier, noise, start):
        n = seq.shape[0] - 1
        for i in range(n):
            s, s_next = seq[i], seq[i + 1]
            d = (x - model(x, s, carrier[i])) / s
            dt = s_next - s
            if i == n - 1:
                x = x + d * dt
                continue
            x2 = torch.where(i < start, x, x + d * dt)
            d2 = (x2 - model(x2, s_next, carrier[i + 1])) / s_next
            x = torch.where(i < start, x, x + (d + d2) / 2 * dt)
        return x

    # DPM-Solver++(2M), Lu et al. 2022: lambda = -log sigma, data prediction, multistep with the
    # pixel's own previous step ratio r = h_last / h; first order on the pixel's first step and the last.
    def _dpmpp_2m(self, model, x, seq, carrier, noise, start):
        n = seq.shape[0] - 1
        old = None
        for i in range(n):
            s, s_next = seq[i], seq[i + 1]
            den = model(x, s, carrier[i])
            if i == n - 1:
                x = den
                continue
            h = torch.log(s) - torch.log(s_next)
            first = (s_next / s) * x - torch.expm1(-h) * den
            if old is None:
                new = first
            else:
                r = (torch.log(seq[i - 1]) - torch.log(s)) / h
                d = (1 + 1 / (2 * r)) * den - (1 / (2 * r)) * old
                new = torch.where(i == start, first, (s_next / s) * x - torch.expm1(-h) * d)
            x = torch.where(i < start, x, new)
            old = den
        return x

    # DPM-Solver++(2M) SDE (midpoint), eta 1: x <- (s'/s) e^-h x + (1 - e^-2h) D
    #   + (1/2)(1 - e^-2h)(D - D_prev) / r + s' sqrt(1 - e^-2h) z; alpha = 1 for an eps model.
    def _dpmpp_2m_sde(self, model, x, seq, carrier, noise, start):
        n = seq.shape[0] - 1
        old, h_last = None, None
        for i in range(n):
            s, s_next = seq[i], seq[i + 1]
            den = model(x, s, carrier[i])
            if i == n - 1:
                x = den
                continue
            h = torch.log(s) - torch.log(s_next)
            new = (s_next / s) * torch.exp(-h) * x + (-torch.expm1(-2 * h)) * den
            if old is not None:
                r = h_last / h
                second = new + 0.5 * (-torch.expm1(-2 * h)) * (1 / r) * (den - old)
                new = torch.where(i == start, new, second)
            new = new + noise.brownian(i) * s_next * (-torch.expm1(-2 * h)).sqrt()
            x = torch.where(i < start, x, new)
            old, h_last = den, h
        return x

    # Third-order SDE multistep (eta 1): the 2M SDE step plus divided differences of the last three
    # predictions with phi_2 = (e^-2h - 1)/(2h) + 1 and phi_3 = phi_2 / (2h) - 1/2.
    def _dpmpp_3m_sde(self, model, x, seq, carrier, noise, start):
        n = seq.shape[0] - 1
        d_1 = d_2 = h_1 = h_2 = None
        for i in range(n):
            s, s_next = seq[i], seq[i + 1]
            den = model(x, s, carrier[i])
            if i == n - 1:
                x = den
                continue
            h = torch.log(s) - torch.log(s_next)
            he = 2 * h
            new = (s_next / s) * torch.exp(-h) * x + (-torch.expm1(-he)) * den
            phi2 = torch.expm1(-he) / he + 1
            lag = i - start
            if h_1 is not None:
                second = new + phi2 * (den - d_1) / (h_1 / h)
                if h_2 is not None:
                    r0, r1 = h_1 / h, h_2 / h
                    d1_0 = (den - d_1) / r0
                    d1_1 = (d_1 - d_2) / r1
                    d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                    d2 = (d1_0 - d1_1) / (r0 + r1)
                    phi3 = phi2 / he - 0.5
                    third = new + phi2 * d1 - phi3 * d2
                    second = torch.where(lag >= 2, third, second)
                new = torch.where(lag >= 1, second, new)
            new = new + noise.brownian(i) * s_next * (-torch.expm1(-2 * h)).sqrt()
            x = torch.where(lag < 0, x, new)
            d_1, d_2 = den, d_1
            h_1, h_2 = h, h_1
        return x

    # LCM (Luo et al. 2023): jump to the prediction, re-noise to the next sigma with fresh noise.
    def _lcm(self, model, x, seq, carrier, noise, start):
        n = seq.shape[0] - 1
        for i in range(n):
            den = model(x, seq[i], carrier[i])
            if i == n - 1:
                x = den
            else:
                x = torch.where(i < start, x, den + seq[i + 1] * noise.gaussian())
        return x

    # RES second-order multistep (Zhang et al. 2023), deterministic: exponential integrator in
    # lambda = -log sigma with c2 = (lambda_prev - lambda) / h, b2 = phi_2(-h) / c2,
    # b1 = phi_1(-h) - b2; Euler on the pixel's first step and the last.
    def _res_multistep(self, model, x, seq, carrier, noise, start):
        n = seq.shape[0] - 1
        old = None
        for i in range(n):
            s, s_next = seq[i], seq[i + 1]
            den = model(x, s, carrier[i])
            euler = x + (x - den) / s * (s_next - s)
            if i == n - 1 or old is None:
                new = euler
            else:
                h = torch.log(s) - torch.log(s_next)
                c2 = (torch.log(s) - torch.log(seq[i - 1])) / h
                phi1 = torch.expm1(-h) / (-h)
                phi2 = (phi1 - 1) / (-h)
                b2 = phi2 / c2
                b1 = phi1 - b2
                new = torch.where(i == start, euler, torch.exp(-h) * x + h * (b1 * den + b2 * old))
            x = torch.where(i < start, x, new)
            old = den
        return x

    # UniPC (Zhao et al. 2023), B(h) = h (bh1), data prediction, multistep of order min(3, n - 1)
    # for a run of n steps, lower orders at its start and end, the corrector on every step but the
    # last; in the variance-preserving scale x_vp = x / sqrt(1 + sigma^2), lambda = -log sigma, the
    # final sigma 0 replaced by 1e-3. Pixels are grouped by the step their run starts at (their own
    # n and orders); every coefficient is per pixel (a small solve per pixel).
    def _uni_pc(self, model, x, seq, carrier, noise, start):
        n_all = seq.shape[0] - 1
        ts = seq.clone()
        ts[-1] = 1e-3
        alpha = lambda s: 1 / (1 + s**2).sqrt()  # noqa: E731
        lam = lambda s: -torch.log(s)  # noqa: E731

        def coefficients(prev_i, i, k, group):
            t, t0 = ts[i], ts[prev_i[-1]]
            h = lam(t) - lam(t0)
            rks = [(lam(ts[prev_i[-(q + 1)]]) - lam(t0)) / h for q in range(1, k)] + [torch.ones_like(h)]
            hh = -h
            h_phi_1 = torch.expm1(hh)
            h_phi_k = h_phi_1 / hh - 1
            fact = 1
            rows, bs = [], []
            for q in range(1, k + 1):
                rows.append(torch.stack([r ** (q - 1) for r in rks], dim=-1))
                bs.append(h_phi_k * fact / hh)
                fact *= q + 1
                h_phi_k = h_phi_k / hh - 1 / fact
            big_r, b = torch.stack(rows, dim=-2), torch.stack(bs, dim=-1)
            # other groups' pixels (which may still be waiting, h = 0) get a harmless system
            mine = (start == group)[..., None]
            eye = torch.eye(k, dtype=F64).expand_as(big_r)
            return h, hh, h_phi_1, rks, torch.where(mine[..., None], big_r, eye), torch.where(mine, b, 1.0)

        groups = sorted({int(v) for v in start.unique()})
        state = {}
        for g in groups:
            n = n_all - g
            state[g] = {"order": min(3, n - 1), "n": n, "m": [], "i": []}
        xv = x * alpha(ts[0])
        m0 = model(xv / alpha(ts[0]), seq[0], carrier[0])
        for g in groups:
            if g == 0:
                state[g]["m"], state[g]["i"] = [m0], [0]
        for i in range(1, n_all + 1):
            # predictor (and the pieces of the corrector) for every group whose run has begun
            pending = {}
            xt_all = xv
            for g in groups:
                st = state[g]
                step = i - g
                if step < 1:
                    continue
                order, n = st["order"], st["n"]
                k = min(order, step) if step < order else min(order, n + 1 - step)
                h, hh, h_phi_1, rks, big_r, b = coefficients(st["i"], i, k, g)
                mprev = st["m"][-1]
                d1s = [(st["m"][-(q + 1)] - mprev) / rks[q - 1] for q in range(1, k)]
                t, tp = ts[i], ts[st["i"][-1]]
                xt_ = (t * alpha(t)) / (tp * alpha(tp)) * xv - alpha(t) * h_phi_1 * mprev
                if d1s:
                    if k == 2:
                        rho_p = [torch.full_like(h, 0.5)]
                    else:
                        sol = torch.linalg.solve(big_r[..., :-1, :-1], b[..., :-1])
                        rho_p = [sol[..., q] for q in range(k - 1)]
                    xt = xt_ - alpha(t) * hh * sum(rp * d for rp, d in zip(rho_p, d1s, strict=True))
                else:
                    xt = xt_
                pending[g] = (k, xt_, xt, d1s, big_r, b, mprev, hh)
                xt_all = torch.where(start == g, xt, xt_all)
            if i == n_all:  # no corrector (and no model call) on the last step
                xv = xt_all
                break
            # one model call at every pixel's own sigma (groups not begun wait at their first sigma)
            mt = model(xt_all / alpha(ts[i]), seq[i], carrier[i])
            new_xv = xt_all
            for g in groups:
                st = state[g]
                if i == g:  # this group's run begins: its first evaluation
                    st["m"], st["i"] = [mt], [i]
                    continue
                if g not in pending:
                    continue
                k, xt_, xt, d1s, big_r, b, mprev, hh = pending[g]
                if k == 1:
                    rho_c = [torch.full_like(hh, 0.5)]
                else:
                    sol = torch.linalg.solve(big_r, b)
                    rho_c = [sol[..., q] for q in range(k)]
                corr = sum(rc * d for rc, d in zip(rho_c[:-1], d1s, strict=True)) if d1s else 0
                xc = xt_ - alpha(ts[i]) * hh * (corr + rho_c[-1] * (mt - mprev))
                new_xv = torch.where(start == g, xc, new_xv)
                st["m"], st["i"] = (st["m"] + [mt])[-st["order"]:], (st["i"] + [i])[-st["order"]:]
            xv = new_xv
        return xv / alpha(ts[-1])


# ------------------------------------------------------------------------------------------------
# The harness.


def drawn_mask(b: int, h: int, w: int) -> torch.Tensor:
    """A 'drawn' key region: a disc covering about half of the latent, (B, H, W) bool."""
    yy, xx = torch.meshgrid(torch.arange(h, dtype=F64), torch.arange(w, dtype=F64), indexing="ij")
    r2 = (yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 3) ** 2
    radius2 = torch.quantile(r2.flatten(), 0.5)
    return (r2 <= radius2).expand(b, h, w)


def drawn_schedule(b: int, h: int, w: int, k: float = 0.8, curve: str = "bin") -> AsynSchedule:
    """The drawn disc as the key item of a schedule (what 'Attention Mask to Timestep Map' gives)."""
    return AsynSchedule(curve=curve, k=(k,), mask_source="masks", masks=drawn_mask(b, h, w).float()[:, None])


def tracks_fn_for(k_map: torch.Tensor | None, curve: str = "bin") -> Callable[[Any, torch.Tensor, torch.Tensor], TrackSet]:
    """The tracks AsynSampler runs for a fixed priority map (B, H, W) (None: one track)."""

    def make(model_wrap: Any, sigmas: torch.Tensor, noise: torch.Tensor) -> TrackSet:
        b, _, h, w = noise.shape
        k = torch.zeros(b, h, w) if k_map is None else k_map.expand(b, h, w)
        sampler = AsynSampler("euler", AsynSchedule(curve=curve))
        return sampler.fixed_tracks(model_wrap, sigmas, k.to(sigmas.device))

    return make


class Case:
    """One model, conditioning, latent, seed and schedule, run through any sampler."""

    def __init__(self, model: Any, positive: list, negative: list, latent: torch.Tensor, *, seed: int = 3,
                 steps: int = 8, cfg: float = 4.0, scheduler: str = "karras", k: float = 0.8) -> None:
        self.model, self.positive, self.negative = model, positive, negative
        self.latent, self.seed, self.steps, self.cfg, self.scheduler = latent, seed, steps, cfg, scheduler
        b, h, w = latent.shape[0], latent.shape[-2], latent.shape[-1]
        self.k = k
        self.k_map = drawn_mask(b, h, w).float() * k

    def sigmas(self, sampler_name: str) -> torch.Tensor:
        return comfy.samplers.KSampler(self.model, steps=self.steps, device=self.model.load_device,
                                       sampler=sampler_name, scheduler=self.scheduler,
                                       model_options=self.model.model_options).sigmas

    def noise(self) -> torch.Tensor:
        return comfy.sample.prepare_noise(self.latent, self.seed)

    @torch.inference_mode()
    def ksampler(self, sampler_name: str) -> torch.Tensor:
        return comfy.sample.sample(self.model, self.noise(), self.steps, self.cfg, sampler_name, self.scheduler,
                                   self.positive, self.negative, self.latent, disable_pbar=True, seed=self.seed)

    @torch.inference_mode()
    def custom(self, sampler: comfy.samplers.Sampler, sampler_name: str, callback: Callable | None = None) -> torch.Tensor:
        """As ComfyUI's executor runs a sampler: under inference_mode, progress bar off."""
        return comfy.sample.sample_custom(self.model, self.noise(), self.cfg, sampler, self.sigmas(sampler_name),
                                          self.positive, self.negative, self.latent, callback=callback,
                                          disable_pbar=True, seed=self.seed)

    def asyn(self, sampler_name: str, *, one_track: bool = False, base: Any = None, **kw: Any) -> torch.Tensor:
        """The Asynchronous KSampler's sampler with the drawn key item (one_track: a mask that covers no pixel)."""
        b, h, w = self.latent.shape[0], self.latent.shape[-2], self.latent.shape[-1]
        schedule = drawn_schedule(b, h, w, self.k)
        if one_track:
            schedule = AsynSchedule(curve="bin", k=(self.k,), mask_source="masks", masks=torch.zeros(b, 1, h, w))
        sampler = AsynSampler(sampler_name, schedule, base=base)
        self.last_sampler = sampler
        return self.custom(sampler, sampler_name, **kw)

    def reference(self, sampler_name: str) -> torch.Tensor:
        return self.custom(ReferenceSampler(sampler_name, tracks_fn_for(self.k_map)), sampler_name)


def rel_dev(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref|."""
    return float((a.double() - ref.double()).abs().max() / ref.double().abs().max())
