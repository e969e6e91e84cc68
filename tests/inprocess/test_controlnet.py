"""ControlNet under asynchronous sampling.

A small random-weight ControlNet of ComfyUI's own classes (comfy.cldm.cldm.ControlNet wrapped in
comfy.controlnet.ControlNet, as load_controlnet_state_dict builds it) matching the factory's
SD1.5-shaped UNet is applied with ComfyUI's ControlNetApplyAdvanced node. The ControlNet sees the
per-image carrier sigma (its hint residuals are computed at the background's noise level, an
accepted approximation), so:

* with a constant timestep map the asynchronous run must equal stock sampling, ControlNet included;
* with fixed masks it must be finite, deterministic and different from the synchronous run;
* nothing the pack adds may outlive a run (hooks on the UNet or ControlNet modules, options, the
  ControlNet's per-run state), and stock sampling afterwards is bit-identical.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import comfy.model_management
import comfy.sample
import comfy.samplers
import pytest
import torch

import tests.inprocess.sampling as shared
from tests.inprocess.sampling import SAME_AS_KSAMPLER, fixed_masks, hook_state, rel_err
from tests.model_factory import _fill, build_sd15, make_conditioning

LATENT = (1, 4, 8, 8)  # hint image 64 x 64
SEED = 4


# ------------------------------------------------------------------------------ helpers
stock = functools.partial(shared.stock, seed=SEED)
asyn = functools.partial(shared.asyn, seed=SEED)


def build_controlnet(model: Any, *, seed: int = 7, zero_conv_scale: float = 0.5) -> Any:
    """A random-weight ControlNet for the model's UNet config, built as load_controlnet_state_dict does."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops

    config = dict(model.model.model_config.unet_config)
    config.pop("out_channels")
    config["hint_channels"] = 3
    config["operations"] = comfy.ops.disable_weight_init
    config["dtype"] = torch.float32
    config["device"] = comfy.model_management.unet_offload_device()
    control_model = comfy.cldm.cldm.ControlNet(**config)
    # disable_weight_init leaves memory uninitialised: fill every parameter deterministically.
    # The "zero" convs get real (scaled) weights, otherwise the ControlNet would have no effect.
    _fill(control_model, seed)
    with torch.no_grad():
        for name, param in control_model.named_parameters():
            if name.startswith(("zero_convs.", "middle_block_out.")):
                param.mul_(zero_conv_scale)
    control_model.eval()
    return comfy.controlnet.ControlNet(control_model, global_average_pooling=False,
                                       load_device=comfy.model_management.get_torch_device(), manual_cast_dtype=None)


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two OpenMP threads can be >10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def comfy_nodes():
    mod = importlib.import_module("nodes")
    assert hasattr(mod, "ControlNetApplyAdvanced"), "imported the pack's nodes/ instead of ComfyUI's nodes.py"
    return mod


@pytest.fixture(scope="module")
def setup(comfy_nodes):
    model = build_sd15()
    control_net = build_controlnet(model)
    pos, neg = make_conditioning(model, seed=1), make_conditioning(model, seed=2)
    b, _, h, w = LATENT
    hint = torch.rand(b, h * 8, w * 8, 3, generator=torch.Generator().manual_seed(11))

    def apply(start: float = 0.0, end: float = 1.0, strength: float = 1.0):
        return comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, control_net, hint, strength, start, end)

    cn_pos, cn_neg = apply()
    return {"model": model, "control_net": control_net, "pos": pos, "neg": neg, "apply": apply,
            "cn_pos": cn_pos, "cn_neg": cn_neg, "latent": torch.zeros(LATENT)}


@pytest.fixture(scope="module")
def stock_cn(setup):
    """Stock sampling with the ControlNet, per sampler (cached)."""
    cache: dict[str, torch.Tensor] = {}

    def get(sampler: str) -> torch.Tensor:
        if sampler not in cache:
            s = setup
            cache[sampler] = stock(s["model"], s["cn_pos"], s["cn_neg"], s["latent"], sampler=sampler)
        return cache[sampler]

    return get


# ------------------------------------------------------------------------------ tests

def test_controlnet_changes_stock_sampling(setup, stock_cn):
    s = setup
    plain = stock(s["model"], s["pos"], s["neg"], s["latent"])
    with_cn = stock_cn("euler")
    assert torch.isfinite(with_cn).all()
    assert rel_err(with_cn, plain) > 1e-2, f"the ControlNet barely changed the output: {rel_err(with_cn, plain):.3g}"


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral"])
@pytest.mark.parametrize("case", list(SAME_AS_KSAMPLER))
def test_constant_map_with_controlnet_equals_stock(setup, stock_cn, sampler, case):
    s = setup
    a = stock_cn(sampler)
    b = asyn(s["model"], s["cn_pos"], s["cn_neg"], s["latent"], sampler=sampler,
             schedule=SAME_AS_KSAMPLER[case](*LATENT[:1], *LATENT[2:]))
    assert torch.equal(b, a), rel_err(b, a)


def test_asynchronous_map_with_controlnet(setup):
    s = setup
    model, latent = s["model"], s["latent"]
    b, _, h, w = LATENT
    control_model = s["control_net"].control_model
    seen: list[torch.Tensor] = []

    def record(_module, _args, kwargs):
        seen.append(kwargs["timesteps"].detach().clone())

    sync = asyn(model, s["cn_pos"], s["cn_neg"], latent)
    handle = control_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        a = asyn(model, s["cn_pos"], s["cn_neg"], latent, schedule=fixed_masks(b, h, w))
    finally:
        handle.remove()
    again = asyn(model, s["cn_pos"], s["cn_neg"], latent, schedule=fixed_masks(b, h, w))
    no_cn = asyn(model, s["pos"], s["neg"], latent, schedule=fixed_masks(b, h, w))

    assert torch.isfinite(a).all()
    assert torch.equal(a, again), "asynchronous run with a ControlNet is not deterministic"
    assert rel_err(a, sync) > 1e-3, f"masks did not change the ControlNet run: {rel_err(a, sync):.3g}"
    assert rel_err(a, no_cn) > 1e-2, f"the ControlNet did not change the asynchronous run: {rel_err(a, no_cn):.3g}"
    # The ControlNet ran once per step (cond + uncond batched) at the carrier (background) timestep.
    sigmas = comfy.samplers.KSampler(model, steps=4, device=model.load_device, sampler="euler", scheduler="normal",
                                     denoise=1.0, model_options=model.model_options).sigmas
    carrier_t = model.model.model_sampling.timestep(sigmas[:-1]).float()
    assert len(seen) == 4
    for t, expected in zip(seen, carrier_t, strict=True):
        assert t.shape == (2 * b,)
        assert torch.allclose(t.float(), expected.expand(2 * b)), (t, expected)


def _controlnet_state(cnet: Any) -> dict[str, Any]:
    """The per-run fields ComfyUI's ControlNet keeps (cleared by cleanup()) plus its patcher's options."""
    return {
        "cond_hint": cnet.cond_hint is None,
        "timestep_range": cnet.timestep_range,
        "model_sampling_current": cnet.model_sampling_current is None,
        "extra_args": repr(cnet.extra_args),
        "strength": cnet.strength,
        "timestep_percent_range": cnet.timestep_percent_range,
        "patcher_options": repr(cnet.control_model_wrapped.model_options),
        "attrs": sorted(vars(cnet)),
    }


def test_nothing_outlives_asynchronous_runs(setup):
    s = setup
    model, latent = s["model"], s["latent"]
    b, _, h, w = LATENT
    cnet_in_cond = s["cn_pos"][0][1]["control"]
    control_model = s["control_net"].control_model
    before = stock(model, s["cn_pos"], s["cn_neg"], latent, sampler="euler_ancestral")
    unet_hooks, cn_hooks = hook_state(model.model), hook_state(control_model)
    options = repr(model.model_options)
    cn_state, orig_state = _controlnet_state(cnet_in_cond), _controlnet_state(s["control_net"])
    conds = repr([(c[0].shape, sorted(c[1])) for c in s["cn_pos"] + s["cn_neg"]])

    asyn(model, s["cn_pos"], s["cn_neg"], latent, sampler="euler_ancestral", schedule=fixed_masks(b, h, w))
    asyn(model, s["cn_pos"], s["cn_neg"], latent, sampler="euler_ancestral")

    assert hook_state(model.model) == unet_hooks
    assert hook_state(control_model) == cn_hooks
    assert all(n == 0 and p == 0 for _, n, p in cn_hooks)
    assert repr(model.model_options) == options
    assert _controlnet_state(cnet_in_cond) == cn_state
    assert _controlnet_state(s["control_net"]) == orig_state
    assert repr([(c[0].shape, sorted(c[1])) for c in s["cn_pos"] + s["cn_neg"]]) == conds
    after = stock(model, s["cn_pos"], s["cn_neg"], latent, sampler="euler_ancestral")
    assert torch.equal(after, before)


def test_controlnet_percent_range_matches_stock(setup, stock_cn):
    s = setup
    pos, neg = s["apply"](0.0, 0.5)
    a = stock(s["model"], pos, neg, s["latent"])
    assert rel_err(a, stock_cn("euler")) > 1e-3, "end_percent 0.5 made no difference: the range was not exercised"
    for case, schedule in SAME_AS_KSAMPLER.items():
        b = asyn(s["model"], pos, neg, s["latent"], schedule=schedule(*LATENT[:1], *LATENT[2:]))
        assert torch.equal(b, a), (case, rel_err(b, a))
    # and an asynchronous map with a partial ControlNet still runs cleanly
    bb, _, h, w = LATENT
    c = asyn(s["model"], pos, neg, s["latent"], schedule=fixed_masks(bb, h, w))
    assert torch.isfinite(c).all()
