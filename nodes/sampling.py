"""Asynchronous KSampler, its SAMPLER twin, and the text encoder that records word tokens."""

from __future__ import annotations

from typing import Any

import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy_api.latest import io, ui

from ..asyndm.comfy_adapter.host import host_maths
from ..asyndm.comfy_adapter.sampler import REFUSED_SAMPLERS, AsynSampler, sampler_names
from ..asyndm.comfy_adapter.tokens import KEY as TOKENS_KEY
from ..asyndm.comfy_adapter.tokens import prompt_tokens
from ..asyndm.keywords import parse_key_words
from ..asyndm.preview import timestep_strip
from ..asyndm.schedule_spec import CURVES, DEFAULT_K, DEFAULT_THRESHOLD, AsynSchedule

CATEGORY = "sampling/asyndm"
ScheduleType = io.Custom("ASYNDM_SCHEDULE")
NOISE_NOTE = (
    "With the pack's random-weight test models the pictures are noise: judge them by parity, not by looking."
)
SAMPLERS_TEXT = (
    "Samplers: every one of ComfyUI's (the list is ComfyUI's own): each pixel takes its sampler's own update on its "
    "own sigmas (ComfyUI's sampler runs once per group of pixels that share a schedule, the groups in lock step, "
    "one model call for the whole image). Refused when there are key items: "
    + "; ".join(f"{name} ({why})" for name, why in REFUSED_SAMPLERS) + "."
)
SAMPLER_TOOLTIP = ("ComfyUI's sampler, run on every pixel's own sigmas: "
                   + ", ".join(name for name, _ in REFUSED_SAMPLERS) + " are refused with key items.")


def _async_inputs() -> list[Any]:
    """Inputs shared by both sampler nodes: what makes sampling asynchronous."""
    return [
        io.String.Input("key_words", default="", multiline=False,
                        tooltip="Words or phrases of the positive prompt whose pixels are denoised later and more "
                                "gradually, comma separated; 'word:0.9' sets that word's own priority k. "
                                "Empty = ordinary synchronous sampling. Needs the prompt encoded by "
                                "'CLIP Text Encode (AsynDM)'."),
        io.Float.Input("k", default=DEFAULT_K, min=0.0, max=1.0, step=0.05,
                       tooltip="Priority of the key words' pixels (0 = follow the background, 1 = most delayed). "
                               "The paper uses 0.7."),
        io.Combo.Input("curve", options=list(CURVES), default="bin",
                       tooltip="Concave schedule of the key pixels: bin (quadratic, the paper's default), "
                               "lin (piecewise linear) or exp (exponential)."),
        io.Float.Input("mask_threshold", default=DEFAULT_THRESHOLD, min=0.01, max=10.0, step=0.05,
                       tooltip="A pixel belongs to a key word where its cross-attention is at least this many "
                               "times the word's mean attention over the image (paper: 1.0)."),
        io.Combo.Input("mask_mode", options=["dynamic", "static"], default="dynamic",
                       tooltip="dynamic: re-read the key words' attention at every step (paper default). static: "
                               "run a synchronous pass first, average its attention, and keep those masks."),
        io.Float.Input("eta", default=0.0, min=0.0, max=1.0, step=0.05,
                       tooltip="Noise of the ddim sampler (0 = deterministic, as ComfyUI's ddim; 1 = DDPM, the "
                               "paper's setting). Every other sampler keeps ComfyUI's own noise (the ancestral and "
                               "SDE samplers their eta 1); with a SAMPLER connected, set its noise on that node."),
        io.Boolean.Input("reference", default=False,
                         tooltip="Reproduce the paper's sampler exactly: linear integer timesteps from 1001 "
                                 "(the scheduler is ignored), unit noise x_T as the start, a last step to t = 0 "
                                 "that keeps a little noise, and the paper's x_0 as the output. Use ddim, eta 1, "
                                 "cfg 5 for the paper's settings."),
        ScheduleType.Input("schedule", optional=True,
                           tooltip="A schedule from 'Attention Mask to Timestep Map' or 'Load Learned Scheduler'; "
                                   "when connected it replaces key_words, k, curve and the mask options."),
    ]


def _schedule(key_words: str, k: float, curve: str, mask_threshold: float, mask_mode: str,
              schedule: AsynSchedule | None) -> AsynSchedule:
    if schedule is not None:
        return schedule
    if mask_mode not in ("dynamic", "static"):
        raise ValueError(f"mask_mode must be 'dynamic' or 'static', got {mask_mode!r}")
    words, ks = parse_key_words(key_words, k)
    return AsynSchedule(curve=curve, k=ks, mask_source="attention", words=words,
                        threshold=mask_threshold, dynamic=(mask_mode == "dynamic"))


def _eta(sampler_name: str, eta: float) -> float | None:
    return eta if sampler_name == "ddim" else None


class AsynDMKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AsynDMKSampler",
            display_name="Asynchronous KSampler",
            category=CATEGORY,
            description=(
                "KSampler whose latent pixels each follow their own timestep schedule (AsynDM, arXiv 2510.04504): "
                "pixels of the key words are denoised later and more gradually, reading a clearer context, "
                f"which improves text-image alignment. {SAMPLERS_TEXT} "
                "Schedulers: all of ComfyUI's; the background follows the chosen one exactly. With ddim_uniform "
                "every pixel gets the paper's own integer timestep (key pixels above the scheduler's first one "
                "included); with other schedulers key pixels are interpolated between its sigmas. Models: SD1.x, "
                "SD2.x and SDXL UNets; Flux (dev, schnell) and SD3 / SD3.5 transformers (one timestep per 2x2 "
                "token) and the other transformer families in the README. ControlNet hints are computed at the "
                "background's noise level. "
                + NOISE_NOTE
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (SD1.x, SD2.x, SDXL, Flux dev/schnell, SD3/SD3.5), "
                                                "LoRAs applied."),
                io.Conditioning.Input("positive", tooltip="Positive prompt; encode it with 'CLIP Text Encode (AsynDM)' to use key words."),
                io.Conditioning.Input("negative", tooltip="Negative prompt."),
                io.Latent.Input("latent_image", tooltip="The latent to denoise (empty latent, img2img or inpainting latent)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Random seed of the initial noise and of ancestral samplers."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Number of denoising steps."),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (the paper uses 5.0)."),
                io.Combo.Input("sampler_name", options=sampler_names(), default="euler", tooltip=SAMPLER_TOOLTIP),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="normal",
                               tooltip="Noise schedule of the background pixels. ddim_uniform = the paper's timesteps "
                                       "for every pixel; others: key pixels interpolated between its sigmas."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="How much of the schedule to run (below 1 for img2img)."),
                *_async_inputs(),
            ],
            outputs=[
                io.Latent.Output(display_name="LATENT", tooltip="The denoised latent."),
                io.Image.Output(display_name="timestep_maps",
                                tooltip="Per image: timestep maps over the steps (white = noisy) above the key "
                                        "pixels' priority (orange)."),
            ],
        )

    @classmethod
    def execute(cls, model: Any, positive: Any, negative: Any, latent_image: dict, seed: int, steps: int, cfg: float,
                sampler_name: str, scheduler: str, denoise: float, key_words: str, k: float, curve: str,
                mask_threshold: float, mask_mode: str, eta: float, reference: bool,
                schedule: AsynSchedule | None = None) -> io.NodeOutput:
        if not denoise > 0.0:  # also NaN, which passes the server's min/max check
            raise ValueError(f"denoise is {denoise}, so there is nothing to sample: set denoise above 0 "
                             "(1.0 for text-to-image)")
        if scheduler not in comfy.samplers.KSampler.SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}: use one of {', '.join(comfy.samplers.KSampler.SCHEDULERS)}")
        if reference and denoise < 1.0:
            raise ValueError("reference mode reproduces the paper's text-to-image sampler: set denoise to 1.0")
        spec = _schedule(key_words, k, curve, mask_threshold, mask_mode, schedule)
        sampler = AsynSampler(sampler_name, spec, eta=_eta(sampler_name, eta), reference=reference)
        if reference:
            scheduler = "normal"  # only its length (steps + 1) is used: the paper's timesteps replace it
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        sigmas = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                         scheduler=scheduler, denoise=denoise, model_options=model.model_options).sigmas
        callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
        samples = comfy.sample.sample_custom(
            model, noise, cfg, sampler, sigmas, positive, negative, latent,
            noise_mask=latent_image.get("noise_mask"), callback=callback,
            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed,
        )
        out = latent_image.copy()
        out["samples"] = samples
        record = sampler.record
        with host_maths():  # the records are CPU tensors: the strip is no device work
            strip = timestep_strip(record.states, record.priorities, start_value=float(
                record.num_train_timesteps + record.offset)) if record else torch.zeros(1, 64, 64, 3)
        return io.NodeOutput(out, strip, ui=ui.PreviewImage(strip, cls=cls))


class AsynDMSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AsynDMSampler",
            display_name="Asynchronous Sampler (SAMPLER)",
            category=CATEGORY,
            description=(
                "Asynchronous sampling as a SAMPLER for SamplerCustom / SamplerCustomAdvanced: the SIGMAS you "
                "connect drive the background pixels; key-word pixels follow the chosen concave curve. Connect a "
                "SAMPLER (KSamplerSelect, or a sampler node with its options) to make that sampler asynchronous; "
                f"without it, sampler_name is used. {SAMPLERS_TEXT} " + NOISE_NOTE
            ),
            inputs=[
                io.Combo.Input("sampler_name", options=sampler_names(), default="euler",
                               tooltip=SAMPLER_TOOLTIP + " Ignored when a SAMPLER is connected."),
                *_async_inputs(),
                io.Sampler.Input("sampler", optional=True,
                                 tooltip="Optional: a SAMPLER (KSamplerSelect, SamplerEulerAncestral, "
                                         "SamplerDPMPP_2M_SDE, ...) to run asynchronously with its own options; "
                                         "replaces sampler_name."),
            ],
            outputs=[io.Sampler.Output(display_name="SAMPLER", tooltip="Connect to SamplerCustom or SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, sampler_name: str, key_words: str, k: float, curve: str, mask_threshold: float, mask_mode: str,
                eta: float, reference: bool, schedule: AsynSchedule | None = None,
                sampler: Any = None) -> io.NodeOutput:
        spec = _schedule(key_words, k, curve, mask_threshold, mask_mode, schedule)
        if sampler is not None:
            return io.NodeOutput(AsynSampler(sampler_name, spec, eta=eta or None, reference=reference, base=sampler))
        return io.NodeOutput(AsynSampler(sampler_name, spec, eta=_eta(sampler_name, eta), reference=reference))


class AsynDMTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AsynDMTextEncode",
            display_name="CLIP Text Encode (AsynDM)",
            category=CATEGORY,
            description=(
                "CLIP Text Encode that also records the prompt's tokens, for every tokenizer of the CLIP (CLIP-L/G, "
                "and T5 for Flux and SD3), so the asynchronous samplers can find the key words' attention (a word "
                "may be several tokens). Works on any CLIP: a checkpoint's, DualCLIPLoader (flux), TripleCLIPLoader. "
                "For Flux guidance, follow it with FluxGuidance. Output is a normal CONDITIONING."
            ),
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP model that encodes the prompt."),
                io.String.Input("text", multiline=True, dynamic_prompts=True,
                                tooltip="The positive prompt; key words given to the sampler must be words of it."),
            ],
            outputs=[io.Conditioning.Output(tooltip="The encoded prompt, with its token ids attached.")],
        )

    @classmethod
    def execute(cls, clip: Any, text: str) -> io.NodeOutput:
        if clip is None:
            raise RuntimeError("the clip input is empty: connect a CLIP from a checkpoint or CLIP loader")
        tokens = prompt_tokens(clip, text)
        conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        tagged = [[c[0], {**c[1], TOKENS_KEY: tokens}] for c in conditioning]
        return io.NodeOutput(tagged)


NODES = [AsynDMKSampler, AsynDMSampler, AsynDMTextEncode]
