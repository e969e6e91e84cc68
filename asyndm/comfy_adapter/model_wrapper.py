"""The APPLY_MODEL wrapper that turns ComfyUI's one-sigma-per-image call into a per-pixel one.

ComfyUI's samplers, CFG guider, area conds, ControlNet and hooks all expect one sigma per batch
row. The sampler passes them a "carrier" sigma and keeps the per-pixel sigma map here; at the
innermost point (BaseModel.apply_model) we rescale the input to the map's noise level, hand the
UNet a per-pixel timestep through the time-embedding hooks, and compute the denoised output with
the map. Everything between the sampler and this point stays untouched.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import comfy.model_sampling
import comfy.samplers
import torch

from .per_pixel import per_pixel

__all__ = ["CallTable", "StepMaps", "PerPixelApplyModel", "AreaRecorder", "WRAPPER_KEY", "model_timesteps"]

WRAPPER_KEY = "asyndm_per_pixel"


class CallTable(NamedTuple):
    """A model call's sigmas as a small table, sigma map = values[index] (one entry per track and image), so no
    distinct values have to be found; with what the caller already computed of it, per entry: the model
    timesteps and calculate_input's factors, and those factors gathered per pixel."""

    values: torch.Tensor  # (V,)
    index: torch.Tensor  # (B, H, W) long
    timesteps: torch.Tensor | None = None  # (V,)
    input_scales: torch.Tensor | None = None  # (V,)
    input_map: torch.Tensor | None = None  # (B, 1, H, W) input_scales[index][:, None]


class StepMaps:
    """This step's per-image sigma map and its distinct model timesteps (set by the sampler)."""

    def __init__(self) -> None:
        self.sigma: torch.Tensor | None = None  # (B, 1, H, W) float32
        self.unique_t: torch.Tensor | None = None  # (U,) distinct model timesteps
        self.inverse: torch.Tensor | None = None  # (B, H, W) long index into unique_t
        self.areas: dict[Any, tuple[int, int, int, int]] = {}  # cond uuid -> (h, w, y, x) crop
        self.values: torch.Tensor | None = None  # (U,) the sigma of each unique_t entry, when the caller knows it
        self.input_scales: torch.Tensor | None = None  # (U,) calculate_input's factor at each entry, when known
        self.input_map: torch.Tensor | None = None  # (B, 1, H, W) input_scales[inverse], when known

    def set(self, sigma: torch.Tensor, unique_t: torch.Tensor, inverse: torch.Tensor,
            values: torch.Tensor | None = None, input_scales: torch.Tensor | None = None,
            input_map: torch.Tensor | None = None) -> None:
        """Record the sigma map and its model timesteps as unique_t[inverse] (see model_timesteps);
        values: the sigmas behind unique_t (sigma == values[inverse]), which lets per-sigma
        coefficients be computed once per entry instead of per pixel; input_scales: calculate_input's
        factor at each of values, already computed (the sampler's run tables); input_map: the
        factors gathered per pixel, already made (input_scales[inverse][:, None])."""
        self.sigma = sigma
        self.unique_t = unique_t
        self.inverse = inverse
        self.values = values
        self.input_scales = None if values is None else input_scales
        self.input_map = None if self.input_scales is None else input_map

    def clear(self) -> None:
        self.sigma = None
        self.unique_t = None
        self.inverse = None
        self.values = None
        self.input_scales = None
        self.input_map = None


def model_timesteps(sigma_values: torch.Tensor, index: torch.Tensor,
                    model_sampling: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(unique model timesteps, (B, H, W) index) for the sigma map sigma_values[index].

    Distinct sigmas can share a model timestep (discrete models round to integer t): dedupe them
    so the embedding table has one row per timestep the UNet can tell apart.
    """
    t = model_sampling.timestep(sigma_values).float()
    unique_t, inverse = torch.unique(t, return_inverse=True)
    return unique_t, inverse[index]


class PerPixelApplyModel:
    """APPLY_MODEL wrapper: wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kw)."""

    def __init__(self, maps: StepMaps, time_hooks: Any) -> None:
        self.maps = maps
        self.time_hooks = time_hooks
        self.calls = 0
        self._hooked: torch.nn.Module | None = None  # the diffusion model whose output hook is installed
        self._handle: Any = None
        self._captured: list[Any] | None = None  # outputs of the forward in progress (None: not capturing)
        self._fast_denoised: dict[type, bool] = {}  # model sampling class -> denoised_map's maths agree with it
        self._ones_rows: torch.Tensor | None = None  # see _ones

    def close(self) -> None:
        """Remove the output hook (the sampler calls this when its run ends, errors included)."""
        if self._handle is not None:
            self._handle.remove()
        self._handle = None
        self._hooked = None
        self._captured = None

    def _keep_output(self, _module: Any, _inputs: Any, output: Any) -> None:
        if self._captured is not None:
            self._captured.append(output)

    def _output_hook(self, diffusion_model: torch.nn.Module) -> None:
        """One forward hook on the diffusion model for the whole run (not one per call)."""
        if self._hooked is not diffusion_model:
            self.close()
            self._handle = diffusion_model.register_forward_hook(self._keep_output)
            self._hooked = diffusion_model

    def _ones(self, like: torch.Tensor, rows: int) -> torch.Tensor:
        """(rows, 1, 1, 1) ones in like's dtype and device, made once per run (calculate_input's factor at the
        carrier is calculate_input of these)."""
        ones = self._ones_rows
        if ones is None or ones.shape[0] != rows or ones.dtype != like.dtype or ones.device != like.device:
            ones = self._ones_rows = like.new_ones(rows, 1, 1, 1)
        return ones

    def _denoised(self, ms: Any, sigma_rows: torch.Tensor, out: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """calculate_denoised with a sigma per pixel: x - out * sigma on the map itself where the model's
        sampling is ComfyUI's EPS or CONST (flow) and still computes exactly that (checked once per run);
        else ComfyUI's method with every pixel as a batch row."""
        cls = type(ms)
        if cls not in self._fast_denoised:
            self._fast_denoised[cls] = denoised_is_restated(ms)
        if self._fast_denoised[cls] and out.ndim == 4:
            return image - out * sigma_rows
        return per_pixel(ms.calculate_denoised, sigma_rows, out, image)

    def _rows(self, x: torch.Tensor, transformer_options: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Sigma map (B', 1, H, W) and timestep-index map (R, H, W) for the rows of this call.

        The rows are the condition chunks (uncond, cond, ...) of the image batch, chunk-major. With
        no area crop every chunk of an image shares its map, so the index map keeps one row per
        image (R = B) and the time hooks build each image's embeddings once for all its chunks.
        """
        sigma, inverse = self.maps.sigma, self.maps.inverse
        assert sigma is not None and inverse is not None
        cond_or_uncond = transformer_options.get("cond_or_uncond") or [0]
        uuids = transformer_options.get("uuids") or [None] * len(cond_or_uncond)
        chunks = len(cond_or_uncond)
        batch = sigma.shape[0]
        if x.shape[0] != chunks * batch:
            raise RuntimeError(
                f"AsynDM: the model was called with {x.shape[0]} rows for {chunks} condition chunks, "
                f"but the latent batch is {batch}; batch sizes of latent and conditioning must match"
            )
        if tuple(x.shape[-2:]) == tuple(sigma.shape[-2:]):
            if chunks == 1:
                sigma_rows = sigma
            elif batch == 1:  # one image: its map broadcasts over the chunks (a view, no copy)
                sigma_rows = sigma.expand(chunks, -1, -1, -1)
            else:
                sigma_rows = sigma.repeat(chunks, 1, 1, 1)
            if sigma_rows.device != x.device:
                sigma_rows, inverse = sigma_rows.to(x.device), inverse.to(x.device)
            return sigma_rows, inverse
        sig_parts, inv_parts = [], []
        for o in range(chunks):
            area = self.maps.areas.get(uuids[o])
            if area is None:
                raise RuntimeError("AsynDM: a conditioning area crops the latent in a way the sampler cannot map")
            h, w, y, xo = area
            sig_parts.append(sigma[:, :, y : y + h, xo : xo + w])
            inv_parts.append(inverse[:, y : y + h, xo : xo + w])
        return torch.cat(sig_parts).to(x.device), torch.cat(inv_parts).to(x.device)

    def _input_rescale(self, ms: Any, image: torch.Tensor, t: torch.Tensor, sigma_rows: torch.Tensor,
                       inverse_rows: torch.Tensor) -> torch.Tensor:
        """(B' or 1, 1, H, W): calculate_input's per-pixel scale over the carrier's. With the call's sigma
        table the scale is computed once per table entry and gathered (the same elementwise maths)."""
        values = self.maps.values
        if values is None or tuple(inverse_rows.shape[-2:]) != tuple(image.shape[-2:]):
            ones = torch.ones_like(image[:, :1])
            return per_pixel(ms.calculate_input, sigma_rows, ones) / ms.calculate_input(t, ones)
        c_in, c_map = self.maps.input_scales, self.maps.input_map
        if c_in is None:
            c_in = ms.calculate_input(values.to(image.device), image.new_ones(values.shape[0], 1, 1, 1)).view(-1)
        if c_map is None or inverse_rows is not self.maps.inverse:  # none made, or the rows crop the latent (areas)
            c_map = c_in[inverse_rows][:, None]  # (R, 1, H, W): one row per image, shared by its CFG chunks
        c_carrier = ms.calculate_input(t, self._ones(image, t.shape[0]))  # (B', 1, 1, 1)
        if c_map.shape[0] != 1 and c_map.shape[0] != c_carrier.shape[0]:
            c_map = c_map.repeat(c_carrier.shape[0] // c_map.shape[0], 1, 1, 1)
        return c_map / c_carrier

    def __call__(self, executor: Any, x: torch.Tensor, t: torch.Tensor, c_concat: Any, c_crossattn: Any,
                 control: Any, transformer_options: dict, **kwargs: Any) -> torch.Tensor:
        if self.maps.sigma is None:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        self.calls += 1
        base_model = executor.class_obj
        ms = base_model.model_sampling
        one_frame = x.ndim == 5 and x.shape[2] == 1  # a video format's one frame (Qwen-Image): maths on the image
        image = x[:, :, 0] if one_frame else x
        sigma_rows, inverse_rows = self._rows(image, transformer_options)
        # Rescale so that calculate_input(carrier, x_pre) == calculate_input(sigma_map, x) per pixel.
        rescale = self._input_rescale(ms, image, t, sigma_rows, inverse_rows)
        x_pre = x * (rescale.unsqueeze(2) if one_frame else rescale)
        unique_t = self.maps.unique_t
        assert unique_t is not None
        self._output_hook(base_model.diffusion_model)
        captured: list[Any] = []
        self._captured = captured
        if unique_t.device != x.device:
            unique_t = unique_t.to(x.device)
        self.time_hooks.set_map(None, unique=unique_t, inverse=inverse_rows, rows=x.shape[0])
        try:
            executor(x_pre, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            self._captured = None
            self.time_hooks.set_map(None)
        if len(captured) != 1 or not torch.is_tensor(captured[0]):
            raise RuntimeError("AsynDM: the diffusion model's output could not be read (packed or repeated outputs)")
        out = captured[0][:, :, 0] if one_frame else captured[0]
        denoised = self._denoised(ms, sigma_rows, out.float(), image)
        return denoised.unsqueeze(2) if one_frame else denoised


def denoised_is_restated(model_sampling: Any) -> bool:
    """Is the model sampling's calculate_denoised ComfyUI's EPS or CONST one (by identity), and does it still
    compute x - out * sigma, bit for bit, element by element (on a small CPU problem, against the
    restatement on a sigma map)? Then PerPixelApplyModel applies it to the map directly."""
    fn = getattr(type(model_sampling), "calculate_denoised", None)
    if fn is not comfy.model_sampling.EPS.calculate_denoised and fn is not comfy.model_sampling.CONST.calculate_denoised:
        return False
    sigma = torch.tensor([0.03, 1.7, 14.6, 0.0], device="cpu").view(1, 1, 2, 2)
    grid = torch.arange(16, dtype=torch.float32, device="cpu").view(1, 4, 2, 2)
    out, x = torch.sin(grid) * 1.3, torch.cos(grid) * 2.1
    try:
        want = per_pixel(model_sampling.calculate_denoised, sigma, out, x)
    except Exception:  # noqa: BLE001 - a changed method that cannot run per pixel: not the restated maths
        return False
    return bool(torch.equal(want, x - out * sigma))


class AreaRecorder:
    """CALC_COND_BATCH wrapper: remember where each area conditioning crops the latent.

    ComfyUI runs an area cond's chunk on a crop of x; the APPLY_MODEL wrapper needs the same crop
    of the sigma map, and only the cond's uuid reaches it.
    """

    def __init__(self, maps: StepMaps) -> None:
        self.maps = maps

    def __call__(self, executor: Any, model: Any, conds: list, x_in: torch.Tensor, timestep: torch.Tensor,
                 model_options: dict) -> Any:
        spatial = x_in.ndim - 2
        for cond_list in conds:
            for cond in cond_list or []:
                if "area" not in cond:
                    continue
                found = comfy.samplers.get_area_and_mult(cond, x_in, timestep)
                if found is None or found.area is None:
                    continue
                area = list(found.area)
                if spatial != 2 or len(area) != 4:
                    raise RuntimeError("AsynDM: area conditioning is supported on image latents only")
                self.maps.areas[found.uuid] = (int(area[0]), int(area[1]), int(area[2]), int(area[3]))
        return executor(model, conds, x_in, timestep, model_options)
