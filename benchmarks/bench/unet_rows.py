"""The UNet rows (SD1.x/SD2.x/SDXL shapes): variants, the profile's pieces, the UNet forward alone.

    ksampler  comfy.sample.sample, ComfyUI's KSampler path (the baseline)
    dynamic   comfy.sample.sample_custom with the pack's AsynSampler, two key words whose
              cross-attention is re-read every step (the pack's default mode)
    fixed     the same with two fixed item masks (mask_source="masks": no attention capture)
    naive     'dynamic' with the per-pixel time embedding computed the way the paper's reference
              does it (bench/naive.py). Second baseline.
"""

from __future__ import annotations

import contextlib
from typing import Any

from . import measure
from .fixtures import PRIORITIES, Case, SamplingBench, model_factory, patched, two_item_masks
from .measure import PieceTimer
from .naive import naive_hooks_class

FAMILY = "unet"
VARIANTS = ("ksampler", "dynamic", "fixed", "naive")
VARIANT_TITLES = {
    "ksampler": "KSampler",
    "dynamic": "async, 2 key words (dynamic)",
    "fixed": "async, fixed masks",
    "naive": "naive per-pixel (2 key words)",
}

# A prompt whose two key words are rabbit and basketball, as CLIP-L tokenizes it (start, words, end, padding).
PROMPT = "a rabbit playing basketball"
PROMPT_IDS = [49406, 320, 10274, 1629, 3835, 49407] + [49407] * 71
WORD_IDS = {"a": [320], "rabbit": [10274], "playing": [1629], "basketball": [3835]}
KEY_WORDS = ("rabbit", "basketball")


class Bench(SamplingBench):
    """A UNet case: SD conditioning carrying the prompt's tokens, a 4-channel latent, two schedules."""

    variants = VARIANTS

    def __init__(self, patcher: Any, case: Case, *, seed: int = 0, cfg: float = 5.0, sampler: str = "euler",
                 scheduler: str = "normal") -> None:
        import comfy.sample
        import torch

        from asyndm.comfy_adapter.tokens import KEY, PromptTokens
        from asyndm.schedule_spec import AsynSchedule

        super().__init__(patcher, case, seed=seed, cfg=cfg, sampler=sampler, scheduler=scheduler)
        mf = model_factory()
        positive = mf.make_conditioning(patcher, seed=1, width=case.width * 8, height=case.height * 8)
        tokens = PromptTokens(PROMPT, chunks=[list(PROMPT_IDS)], word_ids={k: list(v) for k, v in WORD_IDS.items()})
        positive[0][1][KEY] = tokens  # what 'CLIP Text Encode (AsynDM)' attaches
        self.positive = positive
        self.negative = mf.make_conditioning(patcher, seed=2, width=case.width * 8, height=case.height * 8)
        self.latent = torch.zeros(case.batch, 4, case.height, case.width)
        self.noise = comfy.sample.prepare_noise(self.latent, seed)
        self.schedules = {
            "dynamic": AsynSchedule(curve="bin", k=PRIORITIES, mask_source="attention", words=KEY_WORDS, dynamic=True),
            "fixed": AsynSchedule(curve="bin", k=PRIORITIES, mask_source="masks",
                                  masks=two_item_masks(case.height, case.width)),
        }

    def _prepare(self, variant: str, stack: contextlib.ExitStack) -> Any:
        if variant == "naive":
            from asyndm.comfy_adapter.families import unet as unet_family

            stack.enter_context(patched(unet_family, "PerPixelTimesteps", naive_hooks_class()))
        elif variant not in ("dynamic", "fixed"):
            raise ValueError(f"unknown variant {variant!r}: use one of {', '.join(VARIANTS)}")
        return self.schedules["fixed" if variant == "fixed" else "dynamic"]


def make_bench(patcher: Any, case: Case, *, model: str = "", **kwargs: Any) -> Bench:
    kwargs.pop("text_tokens", None)  # the UNet prompt is CLIP-L's 77 tokens
    return Bench(patcher, case, **kwargs)


def describe(patcher: Any, **_: Any) -> dict[str, Any]:
    dm = patcher.model.diffusion_model
    cfg = patcher.model.model_config.unet_config
    return {
        "class": type(patcher.model).__name__,
        "params_m": round(sum(p.numel() for p in dm.parameters()) / 1e6, 1),
        "model_channels": cfg["model_channels"],
        "channel_mult": list(cfg["channel_mult"]),
        "num_res_blocks": list(cfg["num_res_blocks"]),
        "transformer_depth": list(cfg["transformer_depth"]),
        "context_dim": cfg["context_dim"],
    }


def model_line(name: str, info: dict[str, Any]) -> str:
    return (f"Model `{name}`: {info['class']}, {info['params_m']}M UNet parameters, channels "
            f"{info['model_channels']} x {info['channel_mult']}, res blocks {info['num_res_blocks']}, "
            f"transformer depth {info['transformer_depth']}, context {info['context_dim']}.")


# ------------------------------------------------------------------------------------------------
# Profile


UNET_LABEL = "UNet compute (without the pack's hooks)"
EMB_LAYERS_LABEL = "ResBlock emb_layers (stock: B' rows; pack: U-row table; naive: every pixel)"
EMB_LABEL = "hooks: emb_layers pre/post (table in, per-pixel out)"
MODEL_LABEL = UNET_LABEL
NOT_PACK = (UNET_LABEL, EMB_LAYERS_LABEL)  # profiled, but the stock model's own work
STOCK_MODULE_LABEL = EMB_LAYERS_LABEL  # the stock model runs it too: only what it costs over the KSampler's counts
PIECES = [  # (label, what) in report order; the pieces are exclusive of each other
    (UNET_LABEL, "diffusion_model.forward minus the hooks and emb_layers that run inside it"),
    (EMB_LAYERS_LABEL, "every ResBlock's emb_layers module; the stock model runs it too, so it is not a pack piece"),
    (measure.OBSERVER_LABEL, "AttentionObserver: attn2_patch on every attn2, q/k kept, scored when read (mean); on "
                             "sub-quadratic attention the layer's own probabilities averaged (the attention itself "
                             "is the UNet's row)"),
    (measure.ITEM_MASKS_LABEL, "AsynSampler._priorities_from_attention"),
    *measure.STEP_PIECES,
    ("hooks: UNet/block pre/post", "PerPixelTimesteps._unet_pre/_unet_post/_block_pre"),
    ("hooks: time-MLP table", "PerPixelTimesteps._embedding_table, _time_pre / _time_post (the table's U rows in "
                              "the stock time MLP call)"),
    (EMB_LABEL, "rest of the emb_layers hooks"),
    ("hooks: index maps", "PerPixelTimesteps._index (block_index_map, cached per forward)"),
    ("hooks: per-pixel selection", "PerPixelTimesteps._per_pixel ((B', C, h, w) per ResBlock: one gather per image)"),
    ("naive: time MLP on every pixel", "naive baseline only"),
    ("naive: index positions", "naive baseline only"),
    *measure.SAMPLER_PIECES,
    *measure.LOOP_PIECES,
    *measure.STOCK_PIECES,
]
PACK_SUM_TITLE = ("**sum of the pack's pieces** (rows between the UNet and ComfyUI's own pieces, plus emb_layers and "
                  "the sampler's set-up and loop over the KSampler's; % of the KSampler total)")


def install_profile(bench: Bench, stack: contextlib.ExitStack, timer: PieceTimer) -> None:
    """The UNet's timing wrappers for one run (restored when stack closes), then the sampler's."""
    from asyndm.comfy_adapter.families import unet as unet_time

    dm = bench.patcher.model.diffusion_model
    naive = naive_hooks_class()
    stack.enter_context(patched(dm, "forward", timer.wrap(UNET_LABEL, dm.forward)))
    ppt = unet_time.PerPixelTimesteps
    for cls in (ppt, naive):
        for attr, label in (("_unet_pre", "hooks: UNet/block pre/post"), ("_unet_post", "hooks: UNet/block pre/post"),
                            ("_embedding_table", "hooks: time-MLP table"),
                            ("_time_pre", "hooks: time-MLP table"), ("_time_post", "hooks: time-MLP table"),
                            ("_index", "hooks: index maps"),
                            ("_per_pixel", "hooks: per-pixel selection"),
                            ("_pixel_embedding", "naive: time MLP on every pixel"),
                            ("_positions", "naive: index positions")):
            if attr in cls.__dict__:
                stack.enter_context(patched(cls, attr, timer.wrap(label, cls.__dict__[attr])))
        for attr in ("_emb_pre", "_emb_post"):
            if attr in cls.__dict__:
                stack.enter_context(patched(cls, attr, timer.wrap_factory(EMB_LABEL, cls.__dict__[attr])))
        if "_block_pre" in cls.__dict__:
            stack.enter_context(patched(cls, "_block_pre", timer.wrap_factory("hooks: UNet/block pre/post",
                                                                              cls.__dict__["_block_pre"])))
    # The observed layers' attention, where the observer computes it itself (ComfyUI's sub-quadratic attention, its
    # probabilities kept: asyndm/comfy_adapter/sub_quad.py), is the model's own work, as the stock run's is.
    from asyndm.comfy_adapter import sub_quad

    stack.enter_context(patched(sub_quad, "attention_with_probs", timer.wrap(UNET_LABEL, sub_quad.attention_with_probs)))
    for block in unet_time.unet_resblocks(dm):
        emb_layers = block.emb_layers
        stack.enter_context(patched(emb_layers, "forward", timer.wrap(EMB_LAYERS_LABEL, emb_layers.forward)))
    measure.wrap_sampler_pieces(stack, timer)


@contextlib.contextmanager
def profiling(bench: Bench, timer: PieceTimer) -> Any:
    """Install the timing wrappers for one run (restored afterwards)."""
    with contextlib.ExitStack() as stack:
        install_profile(bench, stack, timer)
        yield


def profile_variant(bench: Bench, variant: str, device: str, runs: int = 1) -> dict[str, float]:
    """ms per run of each piece (exclusive), the run's total, and the rest; plus the preview strip."""
    return measure.profile_runs(bench, variant, device, runs, lambda stack, timer: install_profile(bench, stack, timer),
                                PIECES)


# ------------------------------------------------------------------------------------------------
# The UNet forward alone: what the hooks cost inside the model


UNET_VARIANTS = ("stock", "hooks, no map", "pack hooks", "naive hooks")


def unet_forward_overhead(bench: Bench, repeats: int, device: str) -> dict[str, list[float]]:
    """Seconds per UNet forward of the CFG rows (2 x batch), interleaved: no hooks; the pack's hooks
    installed but no map (pass-through); the pack's hooks with a two-track map (U = 2, half the
    pixels at another timestep); the naive hooks with the same map. Hooks are installed and
    removed outside the timed call, as a sampling run installs them once for all its steps."""
    import comfy.model_management
    import torch

    from asyndm.comfy_adapter.families.unet import PerPixelTimesteps

    comfy.model_management.load_models_gpu([bench.patcher])
    dm = bench.patcher.model.diffusion_model
    dev = next(dm.parameters()).device
    dtype = bench.patcher.model.get_dtype()
    case = bench.case
    rows, h, w = 2 * case.batch, case.height, case.width
    kwargs = {k: v.to(dev, dtype) for k, v in model_factory().diffusion_kwargs(bench.patcher, rows).items()}
    gen = torch.Generator().manual_seed(bench.seed)
    x = torch.randn(rows, 4, h, w, generator=gen).to(dev, dtype)
    t = torch.full((rows,), 500.0, device=dev)
    t_map = torch.full((rows, h, w), 500.0, device=dev)
    t_map[:, : h // 2, : w // 2] = 700.0
    hook_classes = {"hooks, no map": PerPixelTimesteps, "pack hooks": PerPixelTimesteps, "naive hooks": naive_hooks_class()}
    return measure.interleaved_forward_times(dm, x, t, kwargs, t_map, UNET_VARIANTS, hook_classes, repeats, device)


def forward_overhead(bench: Bench, repeats: int, device: str) -> dict[str, Any]:
    """The run's JSON entries for the forward alone (key 'unet', as earlier results have it)."""
    return {"unet": unet_forward_overhead(bench, repeats, device)}
