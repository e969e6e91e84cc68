"""AsynDM for ComfyUI: asynchronous diffusion (per-pixel timesteps) as ComfyUI nodes.

Registered in ComfyUI's V3 style only (comfy_entrypoint); ComfyUI would prefer
NODE_CLASS_MAPPINGS if both existed, so there is none. Nothing heavy happens at import time.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():  # type: ignore[no-untyped-def]
    """Called by ComfyUI when it loads custom nodes."""
    from .nodes.extension import comfy_entrypoint as entrypoint

    return await entrypoint()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
