"""Ready for a GPU, checked on the CPU: the aten ops and host syncs of whole sampling runs, counted.

On a GPU every read of a device value back to the host (.item(), bool(t), torch.equal, unique,
nonzero, ...) waits for the queued kernels, and every op is a launch. A TorchDispatchMode
(benchmarks/bench/dispatch_count.py) sees every op of a run, the lock-step instance threads
included, and attributes each host sync to the pack or to ComfyUI (the sampler functions read
their own sigmas). Per-step figures are the slope between a short and a long run of the same job,
so set-up cancels; "extra" is beyond ComfyUI's KSampler on the same model, seed and sigmas.

What must hold: the pack makes no host sync inside the step loop with fixed masks (drawn, or the
static mask after its pre-pass), on every family and every sampler; with dynamic masks neither (their
one read per step, of the re-partitioned tracks, is pipelined: taken only after the next model call
was queued, see README "GPU readiness"); the host maths runs
on CPU tensors only; and the extra ops per step stay within the bounds below (the issue's targets
where they are met, else the measured figure plus a margin, named as such).
"""

from __future__ import annotations

import comfy.samplers
import comfy.text_encoders.flux
import pytest
import torch

from asyndm.comfy_adapter.tokens import KEY, prompt_tokens
from asyndm.schedule_spec import AsynSchedule
from benchmarks.bench.dispatch_count import RunCount, count_run, per_step
from tests import model_factory as mf
from tests.inprocess import test_every_sampler as every
from tests.inprocess.sampler_reference import Case
from tests.inprocess.sampling import asyn, stock
from tests.model_factory import TokenizerOnly, build_flux, make_flux_conditioning

# The model: ComfyUI detects it as SD1.5 (320 channels, three levels of one ResBlock and one
# transformer block each, context 768); 128 px, euler / normal, cfg 5, key words "rabbit, basketball".
NODE_SHORT, NODE_LONG = 6, 12
# Extra ops per step beyond KSampler's on that model. The issue asks <= 80 with a fixed or drawn mask
# and <= 150 with dynamic masks (attention observer included). euler, ddim, euler_ancestral and dpmpp_2m
# run on per-pixel sigma maps (map_steps.py); the other samplers run one instance per track (the lock
# step), whose ops grow with the number of tracks: that bound is the measured figure plus about 10 %, named.
NODE_BOUNDS = {
    "drawn": 80,  # measured 29 (69 before the time MLP's table rode in the stock call)
    # NOT a target of the issue's: the pre-pass's observer and the asynchronous pass, measured 24 (33 while the observer
    # scored the CPU's sub-quadratic attention from q and k; 74 before its scoring in one batched product)
    "static": 90,
    # On the CPU ComfyUI's attention is its sub-quadratic one, whose probabilities the observer keeps on the observed
    # layers (sub_quad.py); "dynamic-fused" runs both KSampler and the pack on PyTorch's fused attention, as on an
    # NVIDIA GPU, where the observer scores those layers from their q and k.
    "dynamic": 150,  # measured 78 (euler), 66 (euler_ancestral) and 85 (dpmpp_2m), beyond their KSampler's
    "dynamic-fused": 150,  # measured 91 (euler): the observed layers scored from q and k
    "dynamic-ancestral": 150,
    "dynamic-2m": 150,
    "dynamic-lockstep": 790,  # NOT the 150: heun in the lock step, measured 641 (715 before; about 10 tracks)
}
SETUP_READS = 20  # the pack's host reads outside the loop (input checks, sigma tables): measured 10 and 17
# The small family models of test_every_sampler, a drawn key item (two tracks): measured + ~15 %.
FAMILY_SHORT, FAMILY_LONG = 4, 8
FAMILY_BOUNDS = {
    "flux": 148, "sd3": 95, "qwen-image": 113, "chroma-radiance": 122, "sd2-v": 103, "sdxl": 108, "flux2": 113,
    "chroma": 140, "hunyuan-image": 112, "lumina2": 126, "z-image": 122, "hidream": 116, "auraflow": 103,
}


def slope(run, short: int, long: int) -> dict:
    run(short)  # warm-up: model loading and first-call caches are not per-step work
    a, _ = count_run(lambda: run(short))
    b, _ = count_run(lambda: run(long))
    assert a.host_violations == 0 and b.host_violations == 0, "host maths touched a device tensor"
    return {**per_step(a, b, long - short), "short": a, "long": b}


def describe(counts: RunCount) -> str:
    return ", ".join(f"{site} x{n}" for site, n in counts.sync_sites.items() if site.startswith("pack")) or "none"


# ------------------------------------------------------------------------------------------------
# The model through the Asynchronous KSampler node


@pytest.fixture(scope="module")
def node_runs(pack_nodes, sd15_checkpoint, conds):
    import nodes as comfy_nodes

    model = sd15_checkpoint[0]
    pos, neg = conds
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    masks = torch.zeros(1, 1, 16, 16)
    masks[..., 4:12, 4:12] = 1.0
    drawn = AsynSchedule(curve="bin", k=(0.7,), mask_source="masks", masks=masks)

    def node(words: str, mode: str, schedule=None, sampler="euler"):
        return lambda steps: pack_nodes.AsynDMKSampler.execute(
            model, pos, neg, latent, 1, steps, 5.0, sampler, "normal", 1.0, words, 0.7, "bin", 1.0, mode, 0.0, False,
            schedule).args[0]["samples"]

    def fused(job):
        """The job on ComfyUI's PyTorch (fused) attention, as on an NVIDIA GPU, instead of the CPU's default."""
        import comfy.ldm.modules.attention as comfy_attention

        def run(steps: int):
            previous = comfy_attention.optimized_attention
            comfy_attention.optimized_attention = comfy_attention.attention_pytorch
            try:
                return job(steps)
            finally:
                comfy_attention.optimized_attention = previous
        return run

    def ksampler(sampler: str):
        return lambda steps: comfy_nodes.common_ksampler(model, 1, steps, 5.0, sampler, "normal", pos, neg,
                                                         latent)[0]["samples"]

    jobs = {
        "ksampler": ksampler("euler"),
        "ksampler-ancestral": ksampler("euler_ancestral"),
        "ksampler-2m": ksampler("dpmpp_2m"),
        "ksampler-lockstep": ksampler("heun"),
        "drawn": node("", "dynamic", drawn),
        "static": node("rabbit, basketball", "static"),
        "dynamic": node("rabbit, basketball", "dynamic"),
        "ksampler-fused": fused(ksampler("euler")),
        "dynamic-fused": fused(node("rabbit, basketball", "dynamic")),
        "dynamic-ancestral": node("rabbit, basketball", "dynamic", sampler="euler_ancestral"),
        "dynamic-2m": node("rabbit, basketball", "dynamic", sampler="dpmpp_2m"),
        "dynamic-lockstep": node("rabbit, basketball", "dynamic", sampler="heun"),
    }
    return {name: slope(job, NODE_SHORT, NODE_LONG) for name, job in jobs.items()}


BASELINE = {"dynamic-fused": "ksampler-fused", "dynamic-ancestral": "ksampler-ancestral", "dynamic-2m": "ksampler-2m", "dynamic-lockstep": "ksampler-lockstep"}


def test_ksampler_baseline_is_counted(node_runs):
    """The counter sees the whole run: ComfyUI's own per-step work is there (the check that counting works)."""
    base = node_runs["ksampler"]
    assert base["ops"] > 500 and base["pack_syncs"] == 0
    assert node_runs["ksampler-fused"]["ops"] != base["ops"]  # the fused runs did change ComfyUI's attention


@pytest.mark.parametrize("mode", ["drawn", "static"])
def test_fixed_masks_make_no_host_sync_in_the_loop(node_runs, mode):
    got = node_runs[mode]
    assert got["short"].pack_syncs() == got["long"].pack_syncs(), (
        f"{mode}: the pack's host syncs grow with the steps: {describe(got['short'])} vs {describe(got['long'])}")
    assert got["long"].pack_syncs() <= SETUP_READS, describe(got["long"])


@pytest.mark.parametrize("mode", ["dynamic", "dynamic-fused", "dynamic-ancestral", "dynamic-2m", "dynamic-lockstep"])
def test_dynamic_masks_read_the_host_once_per_step_pipelined(node_runs, mode):
    """The re-partition's one read per step is started before the step's model call is queued and taken
    after it (host.HostCopy): no sync of the pack per step, and no read taken before its call; on sigma
    maps and in the lock step."""
    got = node_runs[mode]
    assert got["short"].pack_syncs() == got["long"].pack_syncs(), (
        f"dynamic: the pack's host syncs grow with the steps: {describe(got['short'])} vs {describe(got['long'])}")
    assert got["long"].pack_syncs() <= SETUP_READS, describe(got["long"])
    assert 0.5 <= got["pipelined_reads"] <= 1.0, got["pipelined_reads"]  # the masks are re-read at (almost) every step
    assert got["early_waits"] == 0


@pytest.mark.parametrize("mode", list(NODE_BOUNDS))
def test_extra_ops_per_step_within_bounds(node_runs, mode):
    extra = node_runs[mode]["ops"] - node_runs[BASELINE.get(mode, "ksampler")]["ops"] * (2 if mode == "static" else 1)
    assert 0 < extra <= NODE_BOUNDS[mode], f"{mode}: {extra:.1f} extra ops per step (bound {NODE_BOUNDS[mode]})"


# ------------------------------------------------------------------------------------------------
# Every family, a drawn key item


def _family(name: str):
    if name in ("flux", "sd3", "qwen-image", "chroma-radiance"):
        return every._transformers()[name]
    build, condition, shape = every.OTHER_FAMILIES[name]
    model = build()
    if condition is None:
        pos, neg = mf.make_conditioning(model, seed=1), mf.make_conditioning(model, seed=2)
    else:
        pos, neg = condition(seed=1), condition(seed=2)
    return model, pos, neg, torch.zeros(shape)


@pytest.mark.parametrize("family", list(FAMILY_BOUNDS))
def test_every_family_makes_no_host_sync_in_the_loop(family):
    model, pos, neg, latent = _family(family)
    scheduler = "karras" if family in ("sd2-v", "sdxl") else "simple"

    def run(asynchronous: bool):
        def job(steps: int) -> torch.Tensor:
            case = Case(model, pos, neg, latent, steps=steps, scheduler=scheduler, cfg=2.0)
            return case.asyn("euler") if asynchronous else case.ksampler("euler")
        return job

    base = slope(run(False), FAMILY_SHORT, FAMILY_LONG)
    got = slope(run(True), FAMILY_SHORT, FAMILY_LONG)
    assert got["short"].pack_syncs() == got["long"].pack_syncs(), (describe(got["short"]), describe(got["long"]))
    extra = got["ops"] - base["ops"]
    assert 0 < extra <= FAMILY_BOUNDS[family], f"{family}: {extra:.1f} extra ops per step"


# ------------------------------------------------------------------------------------------------
# Every sampler (the small SD1.5-layout UNet of test_every_sampler, a drawn key item)


@pytest.mark.parametrize("name", [n for n in comfy.samplers.KSampler.SAMPLERS if n not in every.ALWAYS_REFUSED])
def test_every_sampler_adds_no_host_sync_in_the_loop(every_tiny, name):
    """The sampler functions' own reads (``if sigmas[i + 1] == 0``) are ComfyUI's, once per track
    instance; the pack adds none that grows with the steps."""
    scheduler = "ddim_uniform" if name == "sa_solver_pece" else "karras"  # pece refuses a waiting track

    def job(steps: int) -> torch.Tensor:
        return every.case_for(every_tiny, scheduler, steps).asyn(name)

    got = slope(job, 4, 8)
    assert got["short"].pack_syncs() == got["long"].pack_syncs(), (name, describe(got["short"]), describe(got["long"]))


@pytest.fixture(scope="module")
def every_tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = mf.build_sd15(model_channels=32)
    yield model, mf.make_conditioning(model, seed=1), mf.make_conditioning(model, seed=2)
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------
# Key words on a transformer (Flux: the joint-attention observer)


def test_flux_key_words_read_the_host_once_per_step_pipelined():
    tokens = prompt_tokens(TokenizerOnly(comfy.text_encoders.flux.FluxTokenizer(), ("l", "t5xxl")),
                           "a photo of a rabbit wearing sunglasses, next to a teddy bear")
    model = build_flux(True)
    pos = make_flux_conditioning(tokens=tokens.context_length(["t5xxl"]), seed=1)
    pos[0][1][KEY] = tokens
    schedule = AsynSchedule(curve="bin", k=(0.7,), mask_source="attention", words=("rabbit",), threshold=1.0)
    latent = torch.zeros(1, 16, 16, 16)
    kw = dict(seed=3, cfg=1.0, scheduler="simple")
    base = slope(lambda steps: stock(model, pos, pos, latent, steps=steps, **kw), 4, 8)
    got = slope(lambda steps: asyn(model, pos, pos, latent, steps=steps, schedule=schedule, **kw), 4, 8)
    assert got["short"].pack_syncs() == got["long"].pack_syncs(), (describe(got["short"]), describe(got["long"]))
    assert 0.5 <= got["pipelined_reads"] <= 1.0 and got["early_waits"] == 0, got
    assert got["ops"] > base["ops"]
