"""The only part of the pack that imports ComfyUI: sampler, model wrapper, time-embedding hooks,
attention capture.

Import submodules explicitly (``asyndm.comfy_adapter.families.unet``); this package imports nothing
heavy itself, so ``import asyndm.comfy_adapter.errors`` works without ComfyUI or torch.
"""
