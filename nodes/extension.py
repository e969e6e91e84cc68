"""The pack's ComfyExtension: the node list, and the model folder for schedule files."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import ComfyExtension, io

from .sampling import NODES as SAMPLING_NODES

SCHEDULER_FOLDER = "asyndm_schedulers"


def register_model_folder() -> None:
    """models/asyndm_schedulers for learned schedule files (extendable via extra_model_paths.yaml)."""
    default = os.path.join(folder_paths.models_dir, SCHEDULER_FOLDER)
    entry = folder_paths.folder_names_and_paths.get(SCHEDULER_FOLDER)
    if entry is None:
        folder_paths.folder_names_and_paths[SCHEDULER_FOLDER] = ([default], {".safetensors"})
    else:
        paths, extensions = entry
        if default not in paths:
            paths.append(default)
        extensions.add(".safetensors")


class AsynDMExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(SAMPLING_NODES)


async def comfy_entrypoint() -> AsynDMExtension:
    register_model_folder()
    return AsynDMExtension()
