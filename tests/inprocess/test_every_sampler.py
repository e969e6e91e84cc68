"""Every ComfyUI sampler, asynchronously: ComfyUI's own sampler function per track, in lock step.

The models are random-weight models of ComfyUI's own classes (a tiny SD1.5-layout UNet for the
float64 reference, every transformer family's test model for the list). The float64 reference
(sampler_reference.py) restates each sampler's published update element by element with every
pixel's own sigmas; it shares with the pack only the per-pixel model call, the tracks and the
noise sources. The drawn key item is a disc over about half the latent (k = 0.8, bin). karras makes
key pixels wait at the model's largest sigma for their first steps (a track that holds); with
ddim_uniform they sit above the background from the first step.
"""

from __future__ import annotations

import threading

import comfy.model_management
import comfy.samplers
import pytest
import torch

from asyndm.comfy_adapter.sampler import REFUSED_SAMPLERS, AsynSampler, sampler_names
from tests import model_factory as mf
from tests.factory_auraflow import build_auraflow, make_auraflow_conditioning
from tests.factory_flux_family import (
    build_chroma,
    build_chroma_radiance,
    build_flux2,
    build_hunyuan_image,
    make_chroma_conditioning,
    make_flux2_conditioning,
    make_hunyuan_image_conditioning,
)
from tests.factory_hidream import build_hidream, make_hidream_conditioning
from tests.factory_lumina import build_lumina2, build_z_image, make_lumina_conditioning
from tests.factory_qwen_image import build_qwen_image, make_qwen_conditioning
from tests.inprocess.sampler_reference import REFERENCE_SAMPLERS, Case, drawn_mask, rel_dev
from tests.inprocess.sampling import hook_state

SIZE, STEPS = 8, 8
TOL = 1e-4  # float32 node against the float64 reference over 8 steps: measured 1e-6 .. 2e-5 (UniPC's solves)
REFUSED = dict(REFUSED_SAMPLERS)
ALWAYS_REFUSED = ("dpm_fast", "dpm_adaptive")


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared 2-core machine: one thread is faster and steadier
    model = mf.build_sd15(model_channels=32)
    yield model, mf.make_conditioning(model, seed=1), mf.make_conditioning(model, seed=2)
    torch.set_num_threads(threads)


def case_for(tiny, scheduler: str = "karras", steps: int = STEPS) -> Case:
    model, pos, neg = tiny
    return Case(model, pos, neg, torch.zeros(1, 4, SIZE, SIZE), steps=steps, scheduler=scheduler)


def runs_with_key_items(name: str) -> list[str]:
    """The schedulers a sampler runs asynchronously on here (sa_solver_pece: only where nothing waits)."""
    if name in ALWAYS_REFUSED:
        return []
    return ["ddim_uniform"] if name == "sa_solver_pece" else ["karras", "ddim_uniform"]


def test_the_sampler_list_is_comfyuis_own(pack_nodes):
    """Both nodes offer KSampler's whole list, read from ComfyUI (at least the 42 samplers of 0.3.75)."""
    assert sampler_names() == list(comfy.samplers.KSampler.SAMPLERS) and len(sampler_names()) >= 42
    for node in (pack_nodes.AsynDMKSampler, pack_nodes.AsynDMSampler):
        options = next(i for i in node.define_schema().inputs if i.id == "sampler_name").options
        assert options == list(comfy.samplers.KSampler.SAMPLERS)
    description = pack_nodes.AsynDMKSampler.define_schema().description
    assert all(name in description for name, _ in REFUSED_SAMPLERS)


# ------------------------------------------------------------------------------------------------
# No key pixel: ComfyUI's sampler, bit for bit, on every name and family.


@pytest.mark.parametrize("name", list(comfy.samplers.KSampler.SAMPLERS))
def test_one_track_is_the_ksampler_bit_for_bit_for_every_sampler(tiny, name):
    """A key item whose mask covers no pixel: the lock-step machinery runs one track, which is KSampler."""
    case = case_for(tiny, steps=4)
    assert torch.equal(case.asyn(name, one_track=True), case.ksampler(name)), name


def _transformers():
    flux = mf.build_flux()
    sd3 = mf.build_sd3("large")
    qwen = build_qwen_image(depth=1)
    radiance = build_chroma_radiance(depth=1)
    return {
        "flux": (flux, mf.make_flux_conditioning(seed=1), mf.make_flux_conditioning(seed=2), torch.zeros(1, 16, 8, 8)),
        "sd3": (sd3, mf.make_sd3_conditioning(seed=1), mf.make_sd3_conditioning(seed=2), torch.zeros(1, 16, 8, 8)),
        "qwen-image": (qwen, make_qwen_conditioning(seed=1), make_qwen_conditioning(seed=2),
                       torch.zeros(1, 16, 1, 8, 8)),
        "chroma-radiance": (radiance, make_chroma_conditioning(seed=1), make_chroma_conditioning(seed=2),
                            torch.zeros(1, 3, 32, 32)),
    }


@pytest.fixture(scope="module")
def transformers():
    return _transformers()


@pytest.mark.parametrize("family", ["flux", "sd3", "qwen-image", "chroma-radiance"])
def test_every_sampler_on_flow_transformers(transformers, family):
    """Every name on the flow-matching transformers (sigma = t there): one track is KSampler bit for bit, a
    drawn key item gives a finite result that differs (the refused names are refused)."""
    model, pos, neg, latent = transformers[family]
    case = Case(model, pos, neg, latent, steps=3, scheduler="simple", cfg=2.0)
    ran = []
    for name in comfy.samplers.KSampler.SAMPLERS:
        plain = case.ksampler(name)
        assert torch.equal(case.asyn(name, one_track=True), plain), (family, name)
        if name in ALWAYS_REFUSED:
            with pytest.raises(ValueError, match=f"cannot use {name}"):
                case.asyn(name)
            continue
        out = case.asyn(name)
        assert torch.isfinite(out).all() and rel_dev(out, plain) > 1e-3, (family, name, rel_dev(out, plain))
        ran.append(name)
    assert len(ran) >= len(comfy.samplers.KSampler.SAMPLERS) - 3


# The other families: (model builder, conditioning builder, latent shape); their adapters are what differ.
OTHER_FAMILIES = {
    "sd2-v": (lambda: mf.build_sd2v(model_channels=32), None, (1, 4, 8, 8)),
    "sdxl": (lambda: mf.build_sdxl(model_channels=32), None, (1, 4, 8, 8)),
    "flux2": (build_flux2, make_flux2_conditioning, (1, 128, 4, 4)),
    "chroma": (lambda: build_chroma(depth=1, depth_single=1), make_chroma_conditioning, (1, 16, 8, 8)),
    "hunyuan-image": (build_hunyuan_image, make_hunyuan_image_conditioning, (1, 64, 4, 4)),
    "lumina2": (build_lumina2, make_lumina_conditioning, (1, 16, 8, 8)),
    "z-image": (build_z_image, make_lumina_conditioning, (1, 16, 8, 8)),
    "hidream": (lambda: build_hidream(n_double=1, n_single=1), lambda seed: make_hidream_conditioning(layers=2, seed=seed),
                (1, 16, 8, 8)),
    "auraflow": (lambda: build_auraflow(n_double=1, n_single=1), make_auraflow_conditioning, (1, 4, 8, 8)),
}


@pytest.mark.parametrize("family", list(OTHER_FAMILIES))
def test_one_track_is_the_ksampler_on_every_family_for_every_sampler(family):
    """The lock-step layer is the same on every family: with no key pixel it is KSampler, bit for bit, on every
    name (the key-item runs of every name are above, on the UNet and four transformer layouts)."""
    build, condition, shape = OTHER_FAMILIES[family]
    model = build()
    if condition is None:
        pos, neg = mf.make_conditioning(model, seed=1), mf.make_conditioning(model, seed=2)
    else:
        pos, neg = condition(seed=1), condition(seed=2)
    case = Case(model, pos, neg, torch.zeros(shape), steps=3, scheduler="simple" if condition else "karras", cfg=2.0)
    for name in comfy.samplers.KSampler.SAMPLERS:
        assert torch.equal(case.asyn(name, one_track=True), case.ksampler(name)), (family, name)


# ------------------------------------------------------------------------------------------------
# Two tracks: the float64 per-pixel reference.


REFERENCE_CASES = [(name, "karras") for name in REFERENCE_SAMPLERS]
REFERENCE_CASES += [(name, "ddim_uniform") for name in ("euler_ancestral", "dpmpp_2m_sde", "lcm", "uni_pc", "heun",
                                                        "dpmpp_3m_sde", "res_multistep")]


@pytest.mark.parametrize(("name", "scheduler"), REFERENCE_CASES)
def test_each_pixel_takes_its_samplers_own_update(tiny, name, scheduler):
    """The node's sampler against the float64 per-pixel statement of the published update, two tracks."""
    case = case_for(tiny, scheduler)
    ref = case.reference(name)
    out = case.asyn(name)
    assert torch.isfinite(out).all()
    dev = rel_dev(out, ref)
    print(f"\n[samplers] {name} on {scheduler}: max deviation from the float64 reference {dev:.3g}")
    assert dev <= TOL, dev
    assert rel_dev(out, case.ksampler(name)) > 1e-2  # the key pixels really went their own way


# ------------------------------------------------------------------------------------------------
# Every name with a key item; refusals.


@pytest.mark.parametrize("name", [n for n in comfy.samplers.KSampler.SAMPLERS if n not in ALWAYS_REFUSED])
def test_every_sampler_with_a_key_item_is_finite_and_differs(tiny, name):
    for scheduler in runs_with_key_items(name):
        case = case_for(tiny, scheduler, steps=6)
        out = case.asyn(name)
        assert torch.isfinite(out).all(), (name, scheduler)
        assert rel_dev(out, case.ksampler(name)) > 1e-3, (name, scheduler)


@pytest.mark.parametrize("name, scheduler", [("dpm_fast", "karras"), ("dpm_adaptive", "ddim_uniform"),
                                             ("sa_solver_pece", "karras")])
def test_the_refused_samplers_name_themselves_before_any_step(tiny, name, scheduler):
    case = case_for(tiny, scheduler)  # karras, 8 steps: the key pixels wait at sigma_max for their first steps
    steps = []
    with pytest.raises(ValueError, match=f"cannot use {name}: .*choose another sampler"):
        case.asyn(name, callback=lambda *a: steps.append(a))
    assert steps == []
    assert torch.equal(case.asyn(name, one_track=True), case.ksampler(name))  # no key pixel: KSampler


def counting(model):
    m = model.clone()
    count = [0]

    def wrapper(apply_model, args):
        count[0] += 1
        return apply_model(args["input"], args["timestep"], **args["c"])

    m.set_model_unet_function_wrapper(wrapper)
    return m, count


@pytest.mark.parametrize("name", ["heun", "dpm_2", "uni_pc", "dpmpp_sde", "heunpp2", "sa_solver_pece", "dpmpp_2s_ancestral"])
def test_multi_stage_samplers_make_ksamplers_model_calls(tiny, name):
    """One call of the model per evaluation, for the whole image: as many as KSampler makes."""
    model, pos, neg = tiny
    counted, count = counting(model)
    case = Case(counted, pos, neg, torch.zeros(1, 4, SIZE, SIZE), steps=STEPS, scheduler="ddim_uniform")
    case.ksampler(name)
    stock, count[0] = count[0], 0
    out = case.asyn(name)
    assert torch.isfinite(out).all() and count[0] == stock


def test_stochastic_samplers_repeat_for_a_seed(tiny):
    case = case_for(tiny)
    for name in ("dpmpp_2m_sde", "euler_ancestral", "dpmpp_sde", "er_sde"):
        assert torch.equal(case.asyn(name), case.asyn(name)), name


def test_a_sampler_node_with_options_is_made_asynchronous(tiny):
    """A SAMPLER with its own options (SamplerEulerAncestral's eta 0.5, s_noise 0.9): no key pixel is that
    sampler exactly; with a key item it differs; anything but a KSAMPLER is refused by type."""
    case = case_for(tiny)
    base = comfy.samplers.ksampler("euler_ancestral", {"eta": 0.5, "s_noise": 0.9})
    plain = case.custom(base, "euler_ancestral")
    assert torch.equal(case.asyn("euler_ancestral", one_track=True, base=base), plain)
    assert rel_dev(case.asyn("euler_ancestral", base=base), plain) > 1e-2
    assert not torch.equal(plain, case.ksampler("euler_ancestral"))  # the options were kept
    with pytest.raises(ValueError, match="not one of ComfyUI's k-diffusion samplers"):
        AsynSampler("euler", None, base=AsynSampler("euler", None))


# ------------------------------------------------------------------------------------------------
# Interrupts, errors, progress.


def _lockstep_threads():
    return [t for t in threading.enumerate() if t.name.startswith("asyndm-lockstep")]


def test_an_interrupt_or_an_error_unwinds_every_instance(tiny):
    case = case_for(tiny)
    model = tiny[0]
    hooks = hook_state(model.model)
    seen = []

    def interrupt(step, x0, x, total):
        seen.append(step)
        if step == 2:
            raise comfy.model_management.InterruptProcessingException()

    with pytest.raises(comfy.model_management.InterruptProcessingException):
        case.asyn("dpmpp_2m_sde", callback=interrupt)
    assert seen == [0, 1, 2] and _lockstep_threads() == []
    assert hook_state(model.model) == hooks

    def broken(model, x, sigmas, extra_args=None, callback=None, disable=None):
        """Jumps to the prediction every step, and fails on the key track's second step."""
        s_in = x.new_ones([x.shape[0]])
        for i in range(len(sigmas) - 1):
            denoised = model(x, sigmas[i] * s_in, **extra_args)
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
            if len(sigmas) < STEPS + 1 and i == 1:  # the key track starts late, after its hold
                raise ArithmeticError("boom in one track")
            x = denoised
        return x

    with pytest.raises(ArithmeticError, match="boom"):
        case.asyn("euler", base=comfy.samplers.KSAMPLER(broken))
    assert _lockstep_threads() == [] and hook_state(model.model) == hooks
    assert torch.equal(case.ksampler("euler"), case.ksampler("euler"))


def test_progress_reports_once_per_step(tiny):
    case = case_for(tiny)
    reports = []
    out = case.asyn("heun", callback=lambda i, x0, x, total: reports.append((i, x.clone(), total)))
    assert [r[0] for r in reports] == list(range(STEPS)) and all(r[2] == STEPS for r in reports)
    mask = drawn_mask(1, SIZE, SIZE)[:, None].expand_as(out)
    assert torch.isfinite(reports[-1][1][mask]).all()


# ------------------------------------------------------------------------------------------------
# Key words (dynamic masks: the tracks are re-partitioned as the masks move) on every name.


@pytest.mark.parametrize("name", [n for n in comfy.samplers.KSampler.SAMPLERS if n not in ALWAYS_REFUSED])
def test_every_sampler_with_key_words_is_finite_and_differs(sd15_checkpoint, conds, pack_nodes, name):
    """Key words through the node on the random SD1.5 checkpoint (CLIP Text Encode (AsynDM)): the masks come
    from the cross-attention at every step, pixels change tracks as they move, and each track's run is
    continued from its recorded model outputs. Finite, and not KSampler's result (which the same node gives
    with no key words)."""
    model = sd15_checkpoint[0]
    scheduler = "ddim_uniform" if name == "sa_solver_pece" else "normal"
    latent = {"samples": torch.zeros(1, 4, 16, 16)}

    def run(key_words: str) -> torch.Tensor:
        return pack_nodes.AsynDMKSampler.execute(model, conds[0], conds[1], latent, 5, 5, 5.0, name, scheduler, 1.0,
                                                 key_words, 0.7, "bin", 1.0, "dynamic", 0.0, False).args[0]["samples"]

    plain = run("")
    out = run("rabbit, basketball:0.9")
    assert torch.isfinite(out).all(), name
    assert rel_dev(out, plain) > 1e-3, (name, rel_dev(out, plain))
