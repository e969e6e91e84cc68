"""The paper's sampler, exactly: an independent float64 re-statement of its loop against the node.

Everything on the paper's side is written here from ../shared/design/method.md and never calls
the pack: the timestep maps (linear background, concave `bin` curve from 1001), the per-pixel
time embedding (the reference's naive scheme: the time MLP and every ResBlock's projection on
every latent pixel, strided down to the block's size), classifier-free guidance in epsilon space
and the DDIM(eta) update in alpha space with alphas_cumprod[0] at the last step. Only the UNet
itself (ComfyUI's module, float32 weights of the default random SD1.5-layout checkpoint) and
ComfyUI's seeded noise are shared with the node.
"""

from __future__ import annotations

import comfy.k_diffusion.sampling as kdiff
import comfy.sample
import pytest
import torch
from comfy.ldm.modules.diffusionmodules import openaimodel

from asyndm.schedule_spec import AsynSchedule
from tests.inprocess.sampling import keep_samplers, unet_hooks_class

T, OFFSET = 1000, 1
STEPS, CFG, SEED, K = 50, 5.0, 21, 0.7


# ------------------------------------------------------------------ the paper, from method.md
def alphas_cumprod() -> torch.Tensor:
    """Stable Diffusion's scaled-linear schedule, float64."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def next_value(s: torch.Tensor, k: torch.Tensor, r: int, n: int) -> torch.Tensor:
    """One step of the per-pixel curves: linear where k = 0, the `bin` parabola elsewhere."""
    if r == 0:
        return torch.zeros_like(s)
    target = float(OFFSET)
    linear = s + (target - s) / r
    c = -k * T / n**2
    safe_c = torch.where(k > 0, c, torch.ones_like(c))
    x0 = (safe_c * r**2 - (target - s)) / (2 * safe_c * r)
    y0 = s - safe_c * x0**2
    curved = safe_c * (1 - x0) ** 2 + y0
    return torch.minimum(torch.where(k > 0, curved, linear), s)


def paper_states(k_maps: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    """s_0 .. s_N (float64 (B, H, W)); k_maps[i] is the priority map used by the transition out of step i."""
    s = next_value(torch.full_like(k_maps[0], float(T + OFFSET)), k_maps[0], n, n)
    states = [s]
    for i in range(n):
        s = next_value(s, k_maps[i], n - i - 1, n)
        states.append(s)
    return states


def integer_t(s: torch.Tensor) -> torch.Tensor:
    return torch.round(s).clamp(0, T - 1).long()


class PerPixelUNet:
    """ComfyUI's UNet module called with one integer timestep per latent pixel, the naive way."""

    def __init__(self, model) -> None:
        self.dm = model.model.diffusion_model
        self.blocks = [m for m in self.dm.modules() if isinstance(m, openaimodel.ResBlock)]

    @torch.no_grad()
    def eps(self, x_vp: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x_vp (R, C, H, W) float32, t (R, H, W) long, context (R, L, D) -> epsilon (R, C, H, W)."""
        rows, _, h, w = x_vp.shape
        per_pixel = openaimodel.timestep_embedding(t.reshape(-1).float(), self.dm.model_channels)
        emb = self.dm.time_embed(per_pixel.to(x_vp.dtype))  # (R*H*W, E)
        sizes: dict[int, tuple[int, int]] = {}
        handles = []
        for i, block in enumerate(self.blocks):
            handles.append(block.register_forward_pre_hook(
                lambda _m, args, i=i: sizes.__setitem__(i, tuple(args[0].shape[-2:]))))
            handles.append(block.emb_layers.register_forward_hook(
                lambda m, _a, _out, i=i: self._strided(m, emb, sizes[i], rows, h, w)))
        try:
            return self.dm(x_vp, t[:, 0, 0].float(), context=context).float()
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def _strided(layers, emb, size, rows, h, w) -> torch.Tensor:
        out = torch.nn.Sequential(*layers)(emb)  # every pixel's projection, (R*H*W, C)
        full = out.view(rows, h, w, -1).permute(0, 3, 1, 2)
        stride = h // size[0]
        return full[:, :, ::stride, ::stride].contiguous()


def paper_loop(unet: PerPixelUNet, noise: torch.Tensor, k_maps: list[torch.Tensor], cond: torch.Tensor,
               uncond: torch.Tensor, *, eta: float, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The paper's DDIM(eta) sampler with per-pixel timesteps, float64 outside the UNet."""
    ac = alphas_cumprod()
    states = paper_states(k_maps, STEPS)
    generator = torch.Generator().manual_seed(seed)  # the same stream as ComfyUI's default noise sampler
    x = noise.double()  # x_T
    context = torch.cat([uncond, cond])
    for i in range(STEPS):
        t, t_prev = integer_t(states[i]), integer_t(states[i + 1])
        rows = torch.cat([x, x]).float()
        eps_u, eps_c = unet.eps(rows, torch.cat([t, t]), context).double().chunk(2)
        eps = eps_u + CFG * (eps_c - eps_u)
        a_t, a_p = ac[t][:, None], ac[t_prev][:, None]
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        std = eta * ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)).sqrt()
        z = torch.randn(noise.shape, generator=generator).double()
        x_next = a_p.sqrt() * x0 + (1 - a_p - std**2).sqrt() * eps + std * z
        x = torch.where((t_prev == t)[:, None], x, x_next)
    return x, states


# ------------------------------------------------------------------ the node
def left_half_mask(h: int, w: int) -> torch.Tensor:
    masks = torch.zeros(1, 1, h, w)
    masks[..., : w // 2] = 1.0
    return masks


def run_node(pack_nodes, model, conds, size, *, schedule=None, key_words="", scheduler="ddim_uniform",
             reference=True, eta=1.0):
    latent = {"samples": torch.zeros(1, 4, *size)}
    out = pack_nodes.AsynDMKSampler.execute(model, conds[0], conds[1], latent, SEED, STEPS, CFG, "ddim", scheduler,
                                            1.0, key_words, K, "bin", 1.0, "dynamic", eta, reference, schedule)
    return out.args[0]["samples"]


class UNetInputs:
    """The diffusion model's input and the per-pixel timesteps it was given, call by call."""

    def __init__(self, monkeypatch, model) -> None:
        self.x: list[torch.Tensor] = []
        self.t: list[torch.Tensor] = []
        self._map: list[torch.Tensor | None] = [None]
        original = unet_hooks_class().set_map

        def set_map(hooks, *args, **kwargs):
            out = original(hooks, *args, **kwargs)
            self._map[0] = hooks.t_map()
            return out

        monkeypatch.setattr(unet_hooks_class(), "set_map", set_map)
        model.model.diffusion_model.register_forward_pre_hook(self._record)
        self.model = model

    def _record(self, _module, args) -> None:
        x, timesteps = args[0], args[1]
        per_pixel = self._map[0]
        if per_pixel is None:  # one timestep per row: the stock call
            per_pixel = timesteps.float()[:, None, None].expand(-1, *x.shape[-2:])
        self.x.append(x.detach().clone())
        self.t.append(per_pixel.detach().clone())

    def close(self) -> None:
        self.model.model.diffusion_model._forward_pre_hooks.clear()


@pytest.fixture()
def adapter():
    import importlib

    from tests.inprocess.conftest import PACK_MODULE, load_pack

    load_pack()
    return importlib.import_module(f"{PACK_MODULE}.asyndm.comfy_adapter.sampler")


@pytest.fixture()
def recorder(monkeypatch, sd15_checkpoint):
    rec = UNetInputs(monkeypatch, sd15_checkpoint[0])
    yield rec
    rec.close()


def k_map_of(masks: torch.Tensor) -> torch.Tensor:
    return masks[:, 0].double() * K


@pytest.mark.parametrize("reference", [False, True], ids=["ddim_uniform", "reference"])
def test_the_unet_is_given_the_papers_timesteps_from_the_first_step(pack_nodes, sd15_checkpoint, conds, recorder,
                                                                    reference):
    """With ddim_uniform (or reference) every pixel is called at round(s) of method.md's curves,
    key pixels above the scheduler's first timestep included (995, 988, 980, ... for k = 0.7)."""
    h, w = 8, 8
    masks = left_half_mask(h, w)
    schedule = AsynSchedule(curve="bin", k=(K,), mask_source="masks", masks=masks)
    run_node(pack_nodes, sd15_checkpoint[0], conds, (h, w), schedule=schedule, reference=reference)
    want = paper_states([k_map_of(masks)] * STEPS, STEPS)
    assert len(recorder.t) == STEPS
    for i, seen in enumerate(recorder.t):
        expected = integer_t(want[i]).float()
        assert torch.equal(seen, expected.expand_as(seen)), f"step {i}: {seen[0, 0].tolist()} vs {expected[0, 0].tolist()}"
    key = [int(t[0, 0, 0]) for t in recorder.t[:3]]
    background = [int(t[0, 0, -1]) for t in recorder.t[:3]]
    assert key == [995, 988, 980] and background == [981, 961, 941], (key, background)


def test_reference_starts_from_the_unit_noise(pack_nodes, sd15_checkpoint, conds, recorder):
    """The paper's x_T: the first model input is the seed's noise itself at every pixel (the key
    pixels' higher timestep included), not the noise scaled to the first sigma."""
    h, w = 8, 8
    schedule = AsynSchedule(curve="bin", k=(K,), mask_source="masks", masks=left_half_mask(h, w))
    run_node(pack_nodes, sd15_checkpoint[0], conds, (h, w), schedule=schedule, reference=True)
    noise = comfy.sample.prepare_noise(torch.zeros(1, 4, h, w), SEED)
    first = recorder.x[0]
    assert first.shape == (2, 4, h, w)
    for row in first:
        assert torch.allclose(row, noise[0], rtol=1e-6, atol=1e-6), float((row - noise[0]).abs().max())


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def as_comfy_latent(model, x: torch.Tensor) -> torch.Tensor:
    """The sampler's latent as ComfyUI hands it to the next node (SD1.5: divided by the VAE's 0.18215)."""
    return model.model.process_latent_out(x)


# Measured on the default checkpoint: 3e-7 (fixed mask) and 4e-7 (dynamic) relative to the largest
# value after 50 steps; float32 rounding of the node's loop and of the UNet's inputs accounts for it.
TOLERANCE = 1e-5


def test_fixed_mask_full_run_matches_the_float64_paper_loop(pack_nodes, sd15_checkpoint, conds):
    h, w = 8, 8
    model = sd15_checkpoint[0]
    masks = left_half_mask(h, w)
    schedule = AsynSchedule(curve="bin", k=(K,), mask_source="masks", masks=masks)
    ours = run_node(pack_nodes, model, conds, (h, w), schedule=schedule, reference=True)
    noise = comfy.sample.prepare_noise(torch.zeros(1, 4, h, w), SEED)
    paper, _ = paper_loop(PerPixelUNet(model), noise, [k_map_of(masks)] * STEPS, conds[0][0][0], conds[1][0][0],
                          eta=1.0, seed=SEED)
    paper = as_comfy_latent(model, paper)
    err = relative(ours, paper)
    print(f"\n[fixed mask] node vs float64 paper loop, {STEPS} steps: max relative difference {err:.2e}")
    assert torch.isfinite(ours).all() and err < TOLERANCE
    sync, _ = paper_loop(PerPixelUNet(model), noise, [torch.zeros(1, h, w, dtype=torch.float64)] * STEPS,
                         conds[0][0][0], conds[1][0][0], eta=1.0, seed=SEED)
    assert relative(ours, as_comfy_latent(model, sync)) > 100 * TOLERANCE, "the key mask made no difference: the comparison is vacuous"


def test_dynamic_masks_full_run_matches_the_float64_paper_loop(monkeypatch, adapter, pack_nodes, sd15_checkpoint,
                                                               conds):
    """Key words with masks read from cross-attention: the loop takes the node's masks step by step."""
    h, w = 16, 16
    model = sd15_checkpoint[0]
    made = keep_samplers(monkeypatch, adapter)
    ours = run_node(pack_nodes, model, conds, (h, w), key_words="rabbit, basketball", reference=True)
    k_maps = [p.double() for p in made[-1].record.priorities]
    assert len(k_maps) == STEPS and len({tuple(p.flatten().tolist()) for p in k_maps}) > 1, "the masks never changed"
    noise = comfy.sample.prepare_noise(torch.zeros(1, 4, h, w), SEED)
    paper, _ = paper_loop(PerPixelUNet(model), noise, k_maps, conds[0][0][0], conds[1][0][0], eta=1.0, seed=SEED)
    paper = as_comfy_latent(model, paper)
    err = relative(ours, paper)
    print(f"\n[dynamic masks] node vs float64 paper loop, {STEPS} steps: max relative difference {err:.2e}")
    assert torch.isfinite(ours).all() and err < TOLERANCE


def test_the_noise_stream_is_comfyuis_default_sampler():
    """The loop above draws z with a generator seeded like k-diffusion's default noise sampler."""
    x = torch.zeros(1, 4, 8, 8)
    sampler = kdiff.default_noise_sampler(x, seed=SEED)
    g = torch.Generator().manual_seed(SEED)
    for _ in range(3):
        assert torch.equal(sampler(None, None), torch.randn(x.shape, generator=g))


def test_key_pixels_rise_above_the_first_sigma_on_other_schedulers(pack_nodes, sd15_checkpoint, conds, recorder):
    """Sigmas that are not the paper's timesteps (ddim_uniform's, nudged) but start near the top:
    key pixels start above the scheduler's first sigma, at a noise level of their own."""
    import comfy.samplers

    from tests.inprocess.conftest import PACK_MODULE

    sampler_mod = __import__(f"{PACK_MODULE}.asyndm.comfy_adapter.sampler", fromlist=["AsynSampler"])
    model = sd15_checkpoint[0]
    h, w = 8, 8
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", STEPS)
    sigmas = torch.cat([sigmas[:-1] * 1.001, sigmas[-1:]])  # off the table: the interpolating mapping
    schedule = AsynSchedule(curve="bin", k=(K,), mask_source="masks", masks=left_half_mask(h, w))
    latent = torch.zeros(1, 4, h, w)
    noise = comfy.sample.prepare_noise(latent, SEED)
    out = comfy.sample.sample_custom(model, noise, CFG, sampler_mod.AsynSampler("ddim", schedule, eta=1.0), sigmas,
                                     conds[0], conds[1], latent, seed=SEED)
    assert torch.isfinite(out).all()
    first = recorder.t[0][0]
    background, key = int(first[0, -1]), int(first[0, 0])
    assert background == 981 and 990 <= key <= 999, (background, key)
    # and the starting latent is each pixel's noise at its own sigma (ComfyUI's scaling below the
    # top: x = noise * sigma, so the model's input is noise * sigma / sqrt(sigma^2 + 1))
    scale = recorder.x[0][0] / noise[0]
    s0 = float(sigmas[0])
    assert torch.allclose(scale[:, :, w // 2:], torch.tensor(s0 / (s0**2 + 1) ** 0.5), rtol=1e-5)
    assert float(scale[:, :, : w // 2].min()) > s0 / (s0**2 + 1) ** 0.5 + 2e-4
