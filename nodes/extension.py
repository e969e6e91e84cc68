"""The pack's ComfyExtension: the node list, the model folder for schedule files, the plot route."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import ComfyExtension, io

from .plot_route import register_routes
from .sampling import NODES as SAMPLING_NODES
from .schedules import NODES as SCHEDULE_NODES
from .schedules import SHIPPED_SCHEDULES  # the pack's schedules/ folder: the paper's curves, tabulated

SCHEDULER_FOLDER = "asyndm_schedulers"


def register_model_folder() -> None:
    """models/asyndm_schedulers for learned schedule files (extendable via extra_model_paths.yaml),
    then the pack's own schedules/ folder (so a user's file of the same name wins)."""
    default = os.path.join(folder_paths.models_dir, SCHEDULER_FOLDER)
    entry = folder_paths.folder_names_and_paths.get(SCHEDULER_FOLDER)
    if entry is None:
        folder_paths.folder_names_and_paths[SCHEDULER_FOLDER] = ([default], {".safetensors"})
    else:
        paths, extensions = entry
        if default not in paths:
            paths.append(default)
        extensions.add(".safetensors")
    paths = folder_paths.folder_names_and_paths[SCHEDULER_FOLDER][0]
    if SHIPPED_SCHEDULES not in paths:
        paths.append(SHIPPED_SCHEDULES)


class AsynDMExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*SAMPLING_NODES, *SCHEDULE_NODES]


async def comfy_entrypoint() -> AsynDMExtension:
    register_model_folder()
    register_routes()  # GET /asyndm/schedule_plot for Load Learned Scheduler's in-node plot
    return AsynDMExtension()
