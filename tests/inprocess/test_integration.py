"""What a KSampler user relies on keeps working: progress bar, latent previews, other packs' wrappers."""

from __future__ import annotations

import importlib

import comfy.patcher_extension
import comfy.utils
import torch


def run(pack_nodes, model, conds, *, key_words="rabbit", steps=4, sampler="euler", seed=1):
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    out = pack_nodes.AsynDMKSampler.execute(model, conds[0], conds[1], latent, seed, steps, 5.0, sampler, "normal",
                                            1.0, key_words, 0.7, "bin", 1.0, "dynamic", 0.0, False)
    return out.args[0]["samples"]


def test_progress_bar_and_latent_previews(pack_nodes, sd15_checkpoint, conds, monkeypatch):
    from comfy.cli_args import LatentPreviewMethod, args

    monkeypatch.setattr(args, "preview_method", LatentPreviewMethod.Latent2RGB)
    calls: list[tuple[int, int, object]] = []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: calls.append((value, total, preview)))
    try:
        run(pack_nodes, sd15_checkpoint[0], conds, steps=5)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    assert [c[0] for c in calls] == [1, 2, 3, 4, 5]
    assert all(c[1] == 5 for c in calls)
    assert all(c[2] is not None for c in calls), "no latent preview was produced"


def test_static_mask_pre_pass_is_half_of_the_progress_bar(pack_nodes, sd15_checkpoint, conds):
    """mask_mode static samples twice (a synchronous pass for the mask, then the real one): the bar
    must move during both, or the UI sits at 0 for the first half of the run."""
    calls: list[tuple[int, int]] = []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: calls.append((value, total)))
    try:
        pack_nodes.AsynDMKSampler.execute(sd15_checkpoint[0], conds[0], conds[1], {"samples": torch.zeros(1, 4, 16, 16)},
                                          3, 4, 5.0, "euler", "normal", 1.0, "rabbit", 0.7, "bin", 1.0, "static", 0.0,
                                          False)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    assert calls == [(i, 8) for i in range(1, 9)]


def test_other_packs_wrappers_still_run_and_compose(pack_nodes, sd15_checkpoint, conds):
    comfy_nodes = importlib.import_module("nodes")
    model = sd15_checkpoint[0].clone()
    seen = {"apply": 0, "unet_fn": 0}

    def other_apply_model(executor, *args, **kwargs):
        seen["apply"] += 1
        return executor(*args, **kwargs)

    def unet_function_wrapper(apply_model, params):
        seen["unet_fn"] += 1
        return apply_model(params["input"], params["timestep"], **params["c"])

    comfy.patcher_extension.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "other_pack",
                                                 other_apply_model, model.model_options, is_model_options=True)
    model.set_model_unet_function_wrapper(unet_function_wrapper)
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    stock = comfy_nodes.common_ksampler(model, 1, 4, 5.0, "euler", "normal", conds[0], conds[1], latent)[0]["samples"]
    stock_calls = dict(seen)
    seen.update(apply=0, unet_fn=0)
    ours = run(pack_nodes, model, conds, key_words="")
    assert seen == stock_calls and seen["apply"] > 0 and seen["unet_fn"] > 0
    assert torch.equal(ours, stock)
    # and with real key words the other pack's wrappers still run every step
    seen.update(apply=0, unet_fn=0)
    asyn = run(pack_nodes, model, conds, key_words="rabbit, basketball")
    assert seen == stock_calls and torch.isfinite(asyn).all()
