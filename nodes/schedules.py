"""Nodes that make, read and write ASYNDM_SCHEDULE values: user masks, cross-attention masks, schedule files."""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import latent_preview
import torch
import torch.nn.functional as F
from comfy_api.latest import io, ui

from ..asyndm.comfy_adapter.sampler import AsynSampler, sampler_names
from ..asyndm.keywords import parse_key_words
from ..asyndm.mask_schedule import (
    apply_threshold,
    as_mask,
    feather,
    normalize_attention,
    plot_table,
    preview_size,
    preview_states,
    priority_map,
    stack_item_masks,
)
from ..asyndm.masks import item_masks
from ..asyndm.preview import timestep_strip
from ..asyndm.schedule_file import load_schedule, save_schedule
from ..asyndm.schedule_spec import CURVES, DEFAULT_K, DEFAULT_THRESHOLD, AsynSchedule
from ..asyndm.schedule_table import MAX_POINTS, ScheduleTable, table_from_curve
from .sampling import CATEGORY, ScheduleType

SCHEDULER_FOLDER = "asyndm_schedulers"  # same name as nodes.extension registers
PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED_SCHEDULES = os.path.join(PACK_ROOT, "schedules")
LATENT_SCALE = 8  # image pixels per latent pixel (SD1.x, SD2.x, SDXL)
EXTRA_ITEMS = 3  # mask_2 .. mask_4
PREVIEW_SIDE = 64
_FILENAME = re.compile(r"^[A-Za-z0-9._ -]+$")


# ------------------------------------------------------------------------------------------------
# Attention Mask to Timestep Map


def _k_inputs() -> list[Any]:
    out: list[Any] = []
    for i in range(2, 2 + EXTRA_ITEMS):
        out.append(io.Mask.Input(f"mask_{i}", optional=True,
                                 tooltip=f"Optional item {i}: another object's mask (any size; resized to the first "
                                         "mask's size). Its pixels follow the curve with priority "
                                         f"k_{i}."))
        extra = " (and of every further item when mask_batch is 'items')" if i == 1 + EXTRA_ITEMS else ""
        out.append(io.Float.Input(f"k_{i}", default=DEFAULT_K, min=0.0, max=1.0, step=0.05, optional=True,
                                  tooltip=f"Priority of item {i}{extra}: 0 = background, 1 = most delayed. "
                                          "Ignored when that item does not exist."))
    return out


class AsynDMMaskToTimestepMap(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AsynDMMaskToTimestepMap",
            display_name="Attention Mask to Timestep Map",
            category=CATEGORY,
            description=(
                "Turns masks of the prompt's key objects into an asynchronous schedule: pixels inside a mask are "
                "denoised later and more gradually (a concave curve), the rest follows your scheduler. Grey mask "
                "values scale the priority (soft edges). Connect the schedule to the Asynchronous KSampler's "
                "'schedule' input; masks are resized to the latent there. The IMAGE shows the timestep maps a "
                "run of preview_steps steps would give (white = noisy) above the priority map (orange)."
            ),
            inputs=[
                io.Mask.Input("mask", tooltip="Mask of the first key object (white = the object). Any size; a batch "
                                              "of 1 applies to every image, a batch of B gives each image its own."),
                io.Float.Input("k", default=DEFAULT_K, min=0.0, max=1.0, step=0.05,
                               tooltip="Priority of the first item: 0 = background, 1 = most delayed (paper: 0.7). "
                                       "A pixel in several masks takes the largest mask value x k."),
                io.Combo.Input("curve", options=list(CURVES), default="bin",
                               tooltip="Concave schedule of the masked pixels: bin (quadratic, the paper's default), "
                                       "lin (piecewise linear) or exp (exponential)."),
                io.Float.Input("threshold", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Mask values below this count as background (0). Values at or above it keep "
                                       "their grey value as a soft priority: the pixel's k is mask value x k. "
                                       "0 keeps every value; 1 keeps only pure white. If no pixel is left in any "
                                       "mask, the schedule samples synchronously (like the plain KSampler)."),
                io.Int.Input("feather", default=0, min=0, max=256,
                             tooltip="Gaussian blur radius in pixels of the (first) mask, applied before the "
                                     "threshold to soften edges (sigma = radius / 2). 0 = no blur."),
                io.Int.Input("preview_steps", default=20, min=1, max=1000,
                             tooltip="Number of sampling steps the preview simulates (use your sampler's steps); "
                                     "up to 8 of them are shown. Does not change the schedule."),
                io.Combo.Input("mask_batch", options=["images", "items"], default="images",
                               tooltip="What the batch of 'mask' holds. images: one mask per image of the latent "
                                       "batch (or 1 for all); each mask input is one item. items: every entry is a "
                                       "separate item for all images (the 'Cross-Attention Mask (AsynDM)' output "
                                       "for one image), with priorities k, k_2, k_3, k_4 in order; leave mask_2.. "
                                       "mask_4 empty then."),
                *_k_inputs(),
            ],
            outputs=[
                ScheduleType.Output(display_name="schedule",
                                    tooltip="Connect to the Asynchronous KSampler / Sampler 'schedule' input, or to "
                                            "'Load Learned Scheduler' to use a learned table."),
                io.Image.Output(display_name="preview",
                                tooltip="Timestep maps at a few steps (white = noisy) above the priority map "
                                        "(orange, brightness = k), at up to 64 px (the latent of a 512 px image)."),
            ],
        )

    @classmethod
    def execute(cls, mask: torch.Tensor, k: float, curve: str, threshold: float, feather: int, preview_steps: int,
                mask_batch: str = "images", mask_2: torch.Tensor | None = None, k_2: float = DEFAULT_K,
                mask_3: torch.Tensor | None = None, k_3: float = DEFAULT_K, mask_4: torch.Tensor | None = None,
                k_4: float = DEFAULT_K) -> io.NodeOutput:
        schedule = build_mask_schedule(mask, [k, k_2, k_3, k_4], [mask_2, mask_3, mask_4], curve=curve,
                                 threshold=threshold, feather_radius=feather, mask_batch=mask_batch)
        strip = mask_preview(schedule, preview_steps)
        return io.NodeOutput(schedule, strip, ui=ui.PreviewImage(strip, cls=cls))


def build_mask_schedule(mask: torch.Tensor, ks: list[float], extra: list[torch.Tensor | None], *, curve: str,
                  threshold: float, feather_radius: float, mask_batch: str = "images") -> AsynSchedule:
    """The node's computation: masks -> feather -> threshold -> AsynSchedule(mask_source='masks')."""
    if curve not in CURVES:
        raise ValueError(f"unknown curve {curve!r}: use one of {', '.join(CURVES)}")
    if not (0.0 <= float(feather_radius) <= 1e4):
        raise ValueError(f"feather must be a radius in pixels >= 0, got {feather_radius}")
    first = as_mask("mask", mask)
    named: list[tuple[str, torch.Tensor]]
    if mask_batch == "items":
        connected = [f"mask_{i + 2}" for i, m in enumerate(extra) if m is not None]
        if connected:
            raise ValueError(f"mask_batch 'items' takes every item from 'mask'; disconnect {', '.join(connected)} "
                             "or set mask_batch to 'images'")
        named = [(f"mask[{j}]", first[j: j + 1]) for j in range(first.shape[0])]
        priorities = [ks[min(j, len(ks) - 1)] for j in range(len(named))]
    elif mask_batch == "images":
        named = [("mask", first)]
        priorities = [ks[0]]
        for i, m in enumerate(extra):
            if m is not None:
                name = f"mask_{i + 2}"
                named.append((name, as_mask(name, m)))
                priorities.append(ks[i + 1])
    else:
        raise ValueError(f"mask_batch must be 'images' or 'items', got {mask_batch!r}")
    for j, v in enumerate(priorities):
        if not (0.0 <= float(v) <= 1.0):
            raise ValueError(f"the priority of item {j + 1} must lie in [0, 1], got {v}")
    masks = stack_item_masks(named)  # (B, items, H, W)
    masks = apply_threshold(feather(masks, float(feather_radius)), float(threshold))
    k = tuple(float(v) for v in priorities)
    if not bool((masks > 0).any()):
        k = tuple(0.0 for _ in k)  # no item pixel left: every pixel follows the background (synchronous)
    return AsynSchedule(curve=curve, k=k, mask_source="masks", masks=masks.contiguous())


def mask_preview(schedule: AsynSchedule, steps: int) -> torch.Tensor:
    """The strip of timestep maps the sampler would give for this mask schedule, at up to 64 px."""
    masks = schedule.masks
    assert masks is not None
    h, w = preview_size(int(masks.shape[-2]), int(masks.shape[-1]), PREVIEW_SIDE)
    m = masks.float()
    if (h, w) != tuple(masks.shape[-2:]):
        m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)  # as the sampler resizes
    k_map = priority_map(m.clamp(0.0, 1.0), schedule.k)
    states = preview_states(k_map, curve=schedule.curve, num_steps=int(steps), table=schedule.table)
    return timestep_strip([s.float() for s in states], [k_map] * len(states), start_value=1001.0)


# ------------------------------------------------------------------------------------------------
# Cross-Attention Mask


class AttentionPrepassSampler(AsynSampler):
    """AsynSampler that runs only the paper's static pre-pass and keeps the averaged attention.

    sample() does the synchronous pass with the key words' attention observer on, stores
    `attention` (B, h*w, items: the key words' attention averaged over heads, layers and steps, at 1/4
    of the latent size on UNets, on the token grid (1/2) on Flux and SD3) and `attention_grid` (h, w), and skips the asynchronous pass (returns the input latent).
    """

    def __init__(self, sampler_name: str, schedule: AsynSchedule, *, eta: float | None = None) -> None:
        super().__init__(sampler_name, schedule, eta=eta)
        self.attention: torch.Tensor | None = None
        self.attention_grid: tuple[int, int] | None = None
        self._progress: Any = None

    def sample(self, model_wrap: Any, sigmas: torch.Tensor, extra_args: dict, callback: Any, noise: torch.Tensor,
               latent_image: torch.Tensor | None = None, denoise_mask: torch.Tensor | None = None,
               disable_pbar: bool = False) -> torch.Tensor:
        self.attention, self.attention_grid, self._progress = None, None, callback
        try:
            return super().sample(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask,
                                  disable_pbar)
        finally:
            self._progress = None

    def _static_priorities(self, model_wrap: Any, sigmas: torch.Tensor, extra_args: dict, noise: torch.Tensor,
                           latent_image: torch.Tensor, denoise_mask: torch.Tensor | None, maps: Any,
                           observer: Any, callback: Any = None) -> torch.Tensor:
        # The pre-pass is this node's whole run: it reports the full bar (self._progress), not half of it.
        b, _, h, w = noise.shape
        zeros = torch.zeros(b, h, w, device=noise.device)
        total = self._run(model_wrap, sigmas, extra_args, self._progress, noise, latent_image, denoise_mask, maps,
                          observer, zeros, record=False, collect_attention=True)
        if total is None:
            raise RuntimeError("AsynDM: the pre-pass saw no attention of the image to the key words (the model's "
                               "attention was replaced by another pack, or every forward ran on a crop)")
        self.attention = (total / max(len(sigmas) - 1, 1)).detach().float().cpu()
        self.attention_grid = tuple(observer.grid)
        return zeros

    def _run(self, model_wrap: Any, sigmas: torch.Tensor, extra_args: dict, callback: Any, noise: torch.Tensor,
             latent_image: torch.Tensor, denoise_mask: torch.Tensor | None, maps: Any, observer: Any,
             fixed_k: torch.Tensor | None, *, record: bool, collect_attention: bool = False) -> Any:
        if not collect_attention:
            return latent_image  # the asynchronous pass is not needed
        return super()._run(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, maps,
                            observer, fixed_k, record=record, collect_attention=True)


class AsynDMCrossAttentionMask(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AsynDMCrossAttentionMask",
            display_name="Cross-Attention Mask (AsynDM)",
            category=CATEGORY,
            description=(
                "Finds where the key words are in the image, as the paper's static mask: runs an ordinary "
                "(synchronous) sampling pass, averages each key word's cross-attention over the steps, heads and "
                "layers (at 1/4 of the latent size on SD UNets; on Flux and SD3 the image tokens' attention to the "
                "word's text tokens, on the token grid), and binarises it (a pixel belongs to a word where its attention "
                "is at least threshold x the word's mean; a pixel in several words goes to the highest priority). "
                "Edit the masks with ComfyUI's mask nodes and feed them to 'Attention Mask to Timestep Map' "
                "(mask_batch = items). The sampled image itself is discarded."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (SD1.x, SD2.x, SDXL, Flux or SD3/3.5)."),
                io.Conditioning.Input("positive", tooltip="Positive prompt, encoded with 'CLIP Text Encode (AsynDM)' "
                                                          "so the key words can be located."),
                io.Conditioning.Input("negative", tooltip="Negative prompt."),
                io.Latent.Input("latent_image", tooltip="The latent of the image to analyse (usually the empty "
                                                        "latent you will sample); masks come out at 8x its size."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the pre-pass (use the seed of the final sampling for matching masks)."),
                io.Int.Input("steps", default=20, min=1, max=10000,
                             tooltip="Steps of the pre-pass; the attention is averaged over all of them."),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale of the pre-pass."),
                io.Combo.Input("sampler_name", options=sampler_names(), default="euler",
                               tooltip="ComfyUI's sampler for the pre-pass (a synchronous run: every sampler works)."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="normal",
                               tooltip="Noise schedule of the pre-pass."),
                io.String.Input("key_words", default="",
                                tooltip="Words or phrases of the positive prompt, comma separated: one mask per "
                                        "word, in this order. 'word:0.9' sets a priority, which decides only who "
                                        "keeps a pixel claimed by several words (the higher; ties: the first)."),
                io.Float.Input("threshold", default=DEFAULT_THRESHOLD, min=0.01, max=10.0, step=0.05,
                               tooltip="A pixel belongs to a word where its attention is at least this many times "
                                       "the word's mean attention over the image (paper: 1.0)."),
            ],
            outputs=[
                io.Mask.Output(display_name="masks",
                               tooltip="One binary mask per key word (word order; with a latent batch of B, B masks "
                                       "per word, word by word), at image size (latent x 8)."),
                io.Mask.Output(display_name="attention",
                               tooltip="The averaged attention of each word, scaled so its maximum is 1 (soft; "
                                       "same layout as masks), upsampled bilinearly to image size."),
            ],
        )

    @classmethod
    def execute(cls, model: Any, positive: Any, negative: Any, latent_image: dict, seed: int, steps: int, cfg: float,
                sampler_name: str, scheduler: str, key_words: str, threshold: float) -> io.NodeOutput:
        words, ks = parse_key_words(key_words, DEFAULT_K)
        if not words:
            raise ValueError("key_words is empty: give the words of the positive prompt to locate, comma separated")
        if scheduler not in comfy.samplers.KSampler.SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}: use one of {', '.join(comfy.samplers.KSampler.SCHEDULERS)}")
        # k = 1 for the pre-pass only (k = 0 would switch the observer off); the word priorities apply below.
        spec = AsynSchedule(curve="bin", k=tuple(1.0 for _ in words), mask_source="attention", words=words,
                            threshold=threshold, dynamic=False)
        sampler = AttentionPrepassSampler(sampler_name, spec)
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        sigmas = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                         scheduler=scheduler, denoise=1.0, model_options=model.model_options).sigmas
        callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
        comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, latent,
                                   noise_mask=latent_image.get("noise_mask"), callback=callback,
                                   disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        if sampler.attention is None or sampler.attention_grid is None:
            raise RuntimeError("AsynDM: the pre-pass saw no cross-attention of the key words")
        masks, soft = attention_masks(sampler.attention, sampler.attention_grid, ks, threshold,
                                      (int(latent.shape[-2]) * LATENT_SCALE, int(latent.shape[-1]) * LATENT_SCALE))
        return io.NodeOutput(masks, soft, ui=ui.PreviewMask(masks, cls=cls))


def attention_masks(attn: torch.Tensor, grid: tuple[int, int], ks: tuple[float, ...], threshold: float,
                    size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(binary masks, normalized soft maps), each (items * B, H, W) word by word, from (B, h*w, items)."""
    b, _, items = attn.shape
    binary = item_masks(attn.float(), list(ks), threshold=threshold, size=size, grid=grid)  # (B, items, H, W)
    soft = normalize_attention(attn, grid)
    soft = F.interpolate(soft, size=size, mode="bilinear", align_corners=False).clamp(0.0, 1.0)

    def word_major(t: torch.Tensor) -> torch.Tensor:
        return t.permute(1, 0, 2, 3).reshape(items * b, size[0], size[1]).contiguous().float()

    return word_major(binary), word_major(soft)


# ------------------------------------------------------------------------------------------------
# Schedule files


def schedule_folders() -> list[str]:
    try:
        return list(folder_paths.get_folder_paths(SCHEDULER_FOLDER))
    except KeyError:
        return []


def _inside(path: str, folder: str) -> bool:
    try:
        folder = os.path.abspath(folder)
        return os.path.commonpath([os.path.abspath(path), folder]) == folder
    except ValueError:  # different drives
        return False


def resolve_schedule_file(name: str) -> str:
    """Full path of a listed schedule file; names that would leave the schedule folders are refused."""
    where = "models/asyndm_schedulers"
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"no schedule file chosen: put .safetensors schedule files in {where} and pick one")
    parts = name.replace("\\", "/").split("/")
    if "\x00" in name or os.path.isabs(name) or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) \
            or ".." in parts:
        raise ValueError(f"schedule name {name!r} points outside the schedule folders: pick a file from the list "
                         f"(names are relative to {where}; '..' and absolute paths are refused)")
    if not name.lower().endswith(".safetensors"):
        raise ValueError(f"schedule name {name!r} is not a .safetensors file")
    try:
        path = folder_paths.get_full_path_or_raise(SCHEDULER_FOLDER, name)
    except (FileNotFoundError, KeyError):
        raise FileNotFoundError(f"schedule file {name!r} not found in {where} or the pack's schedules folder; "
                                "refresh the node list (R) or check the file name") from None
    if not any(_inside(path, folder) for folder in schedule_folders()):
        raise ValueError(f"schedule name {name!r} points outside the schedule folders")
    return path


class AsynDMSchedulerLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AsynDMSchedulerLoader",
            display_name="Load Learned Scheduler",
            category=CATEGORY,
            description=(
                "Loads a schedule table (.safetensors from models/asyndm_schedulers, or one shipped with the pack: "
                "the paper's bin, lin and exp curves at k = 0.7 tabulated for 50 steps) and makes the key pixels "
                "follow it instead of an analytic curve. With a schedule connected, that schedule gets the table; "
                "otherwise the key words below define the items. The chart in the node shows the chosen file's "
                "table as soon as it is chosen (the timestep of the background and of the key pixels over the steps; "
                "a file that does not load shows why); the IMAGE output plots the table's levels."
            ),
            inputs=[
                io.Combo.Input("schedule_name", options=folder_paths.get_filename_list(SCHEDULER_FOLDER)
                               if SCHEDULER_FOLDER in folder_paths.folder_names_and_paths else [],
                               tooltip="A schedule file from models/asyndm_schedulers (or shipped with the pack). "
                                       "The chart in the node shows its curves, or why it does not load."),
                io.String.Input("key_words", default="",
                                tooltip="Used only when 'schedule' is not connected: words of the positive prompt "
                                        "whose pixels follow the table ('word:0.9' sets that word's k), comma "
                                        "separated. Empty = synchronous sampling."),
                io.Float.Input("k", default=DEFAULT_K, min=0.0, max=1.0, step=0.05,
                               tooltip="Priority of the key words (without 'schedule'). It picks the table's level: "
                                       "the shipped tables have one level at 0.7; a lower k blends that level with "
                                       "the background line, a higher one uses the top level."),
                io.Float.Input("mask_threshold", default=DEFAULT_THRESHOLD, min=0.01, max=10.0, step=0.05,
                               tooltip="Without 'schedule': attention threshold of the key words' masks (x mean)."),
                io.Combo.Input("mask_mode", options=["dynamic", "static"], default="dynamic",
                               tooltip="Without 'schedule': re-read the key words' attention every step (dynamic) "
                                       "or once from a synchronous pre-pass (static)."),
                ScheduleType.Input("schedule", optional=True,
                                   tooltip="Optional schedule (for example from 'Attention Mask to Timestep Map'): "
                                           "it is returned with the table attached, keeping its masks and k; "
                                           "key_words, k and the mask options are then ignored."),
            ],
            outputs=[
                ScheduleType.Output(display_name="schedule",
                                    tooltip="Connect to the Asynchronous KSampler / Sampler 'schedule' input."),
                io.Image.Output(display_name="plot",
                                tooltip="The table: normalized timestep (top = pure noise) against progress (left "
                                        "to right); grey diagonal = background, orange = levels (brighter = higher "
                                        "k)."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, schedule_name: str = "", **kwargs: Any) -> Any:
        try:
            st = os.stat(resolve_schedule_file(schedule_name))
            return (schedule_name, st.st_mtime_ns, st.st_size)
        except (OSError, ValueError):
            return schedule_name

    @classmethod
    def execute(cls, schedule_name: str, key_words: str, k: float, mask_threshold: float, mask_mode: str,
                schedule: AsynSchedule | None = None) -> io.NodeOutput:
        table = load_schedule(resolve_schedule_file(schedule_name))
        out = attach_table(table, schedule, key_words=key_words, k=k, mask_threshold=mask_threshold,
                           mask_mode=mask_mode)
        plot = plot_table(table)
        return io.NodeOutput(out, plot, ui=ui.PreviewImage(plot, cls=cls))


def attach_table(table: ScheduleTable, schedule: AsynSchedule | None, *, key_words: str, k: float,
                 mask_threshold: float, mask_mode: str) -> AsynSchedule:
    if schedule is not None:
        return dataclasses.replace(schedule, table=table)
    if mask_mode not in ("dynamic", "static"):
        raise ValueError(f"mask_mode must be 'dynamic' or 'static', got {mask_mode!r}")
    words, ks = parse_key_words(key_words, k)
    curve = table.curve if table.curve in CURVES else "bin"
    return AsynSchedule(curve=curve, k=ks, mask_source="attention", words=words, threshold=mask_threshold,
                        dynamic=(mask_mode == "dynamic"), table=table)


def schedule_filename(name: str) -> str:
    """A safe file name: [A-Za-z0-9._ -] only, no '..', '.safetensors' appended (once)."""
    base = (name or "").strip()
    if base.lower().endswith(".safetensors"):
        base = base[: -len(".safetensors")]
    if not base or not _FILENAME.match(base) or ".." in base or base.startswith(".") or len(base) > 128:
        raise ValueError(f"file name {name!r} is not allowed: use 1 to 128 letters, digits, '.', '_', '-' or spaces, "
                         "not starting with '.', without '..' or folder separators")
    return base + ".safetensors"


def parse_levels(text: str) -> list[float]:
    """'0.5, 0.7' -> sorted distinct priorities in (0, 1]."""
    values: set[float] = set()
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            v = float(part)
        except ValueError:
            raise ValueError(f"k_values: {part!r} is not a number; give priorities in (0, 1] separated by commas") from None
        if not (0.0 < v <= 1.0):
            raise ValueError(f"k_values: {v} is outside (0, 1]")
        values.add(v)
    if not values:
        raise ValueError("k_values is empty: give at least one priority in (0, 1], e.g. 0.7")
    return sorted(values)


def table_for(schedule: AsynSchedule | None, curve: str, k_values: str, fitted_steps: int,
              description: str) -> ScheduleTable:
    """The table to save: the schedule's own table, or its (or the given) curve tabulated at its k values."""
    if schedule is not None and schedule.table is not None:
        table = schedule.table
        return dataclasses.replace(table, description=description) if description else table
    if schedule is not None:
        curve = schedule.curve
        levels = sorted({float(v) for v in schedule.k if float(v) > 0.0})
        if not levels:
            raise ValueError("the schedule has no item with a priority above 0 (synchronous): nothing to tabulate")
    else:
        levels = parse_levels(k_values)
    if curve not in CURVES:
        raise ValueError(f"unknown curve {curve!r}: use one of {', '.join(CURVES)}")
    steps = int(fitted_steps)
    if not (1 <= steps <= MAX_POINTS - 1):
        raise ValueError(f"fitted_steps must lie in 1..{MAX_POINTS - 1}, got {fitted_steps}")
    text = description or (f"AsynDM '{curve}' curve (arXiv 2510.04504), k = {', '.join(f'{v:g}' for v in levels)}, "
                           f"tabulated for {steps} steps")
    return table_from_curve(curve, levels, num_steps=steps, description=text)


class AsynDMSaveSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AsynDMSaveSchedule",
            display_name="Save Schedule (AsynDM)",
            category=CATEGORY,
            is_output_node=True,
            description=(
                "Tabulates a schedule curve and writes it to models/asyndm_schedulers/<filename>.safetensors "
                "(safetensors with metadata, never pickle), where 'Load Learned Scheduler' lists it."
            ),
            inputs=[
                io.String.Input("filename", default="my-asyndm-schedule",
                                tooltip="File name without folder: letters, digits, '.', '_', '-' and spaces; "
                                        "'.safetensors' is appended."),
                io.Combo.Input("curve", options=list(CURVES), default="bin",
                               tooltip="Curve to tabulate (ignored when 'schedule' is connected)."),
                io.String.Input("k_values", default="0.7",
                                tooltip="Priority levels to tabulate, comma separated, each in (0, 1] (ignored when "
                                        "'schedule' is connected: its own k values are used)."),
                io.Int.Input("fitted_steps", default=50, min=1, max=MAX_POINTS - 1,
                             tooltip="The number of sampling steps the table is made for (one table point per "
                                     "step). Other step counts interpolate it."),
                io.String.Input("description", default="",
                                tooltip="Stored in the file's metadata; empty = a description of the curve."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing file of that name (otherwise saving it is refused)."),
                ScheduleType.Input("schedule", optional=True,
                                   tooltip="Optional: save this schedule's curve at its k values (or its learned "
                                           "table, as it is) instead of curve / k_values."),
            ],
            outputs=[],
        )

    @classmethod
    def execute(cls, filename: str, curve: str, k_values: str, fitted_steps: int, description: str, overwrite: bool,
                schedule: AsynSchedule | None = None) -> io.NodeOutput:
        name = schedule_filename(filename)
        if os.path.isfile(os.path.join(SHIPPED_SCHEDULES, name)):
            raise ValueError(f"{name!r} is the name of a schedule shipped with the pack: choose another file name")
        table = table_for(schedule, curve, k_values, fitted_steps, description)
        folder = os.path.join(folder_paths.models_dir, SCHEDULER_FOLDER)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, name)
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path} already exists: choose another file name or set overwrite to true")
        save_schedule(table, path)
        plot = plot_table(table)
        return io.NodeOutput(ui=ui.PreviewImage(plot, cls=cls))


NODES = [AsynDMMaskToTimestepMap, AsynDMCrossAttentionMask, AsynDMSchedulerLoader, AsynDMSaveSchedule]
