"""The schedule nodes inside ComfyUI: mask -> schedule, cross-attention masks, schedule files, end to end."""

from __future__ import annotations

import importlib
import math
import os
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from asyndm.schedule_file import FORMAT, FORMAT_VERSION, ScheduleFileError, load_schedule
from asyndm.schedule_spec import AsynSchedule
from asyndm.schedule_table import table_from_curve, table_step
from asyndm.schedules import step
from tests.inprocess.conftest import PACK_MODULE, load_pack
from tests.inprocess.sampling import keep_samplers

FOLDER = "asyndm_schedulers"
SHIPPED = Path(__file__).resolve().parents[2] / "schedules"


@pytest.fixture(scope="module")
def nodes():
    load_pack()
    return importlib.import_module(f"{PACK_MODULE}.nodes.schedules")


@pytest.fixture(scope="module")
def adapter():
    load_pack()
    return importlib.import_module(f"{PACK_MODULE}.asyndm.comfy_adapter.sampler")


@pytest.fixture
def folders(tmp_path, monkeypatch, nodes):
    """models_dir in tmp_path; the scheduler folder list = its asyndm_schedulers + the shipped folder."""
    import folder_paths

    models = tmp_path / "models"
    user = models / FOLDER
    user.mkdir(parents=True)
    monkeypatch.setattr(folder_paths, "models_dir", str(models))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, FOLDER, ([str(user), nodes.SHIPPED_SCHEDULES], {".safetensors"}))
    folder_paths.filename_list_cache.pop(FOLDER, None)
    yield user
    folder_paths.filename_list_cache.pop(FOLDER, None)


def mask_node(nodes, mask, k=0.7, curve="bin", threshold=0.5, feather=0, preview_steps=6, **extra):
    out = nodes.AsynDMMaskToTimestepMap.execute(mask, k, curve, threshold, feather, preview_steps, **extra)
    return out.args[0], out.args[1]


def ksampler(pack_nodes, model, conds, latent, schedule, *, steps=4, key_words="", mask_mode="dynamic",
             scheduler="normal", sampler="euler", seed=3, cfg=5.0):
    out = pack_nodes.AsynDMKSampler.execute(model, conds[0], conds[1], latent, seed, steps, cfg, sampler, scheduler,
                                            1.0, key_words, 0.7, "bin", 1.0, mask_mode, 0.0, False, schedule)
    return out.args[0]["samples"]


# ------------------------------------------------------------------------------------------------
# Attention Mask to Timestep Map


def test_schema_is_complete(nodes):
    ids = {n.define_schema().node_id: n.define_schema() for n in nodes.NODES}
    assert set(ids) == {"AsynDMMaskToTimestepMap", "AsynDMCrossAttentionMask", "AsynDMSchedulerLoader",
                        "AsynDMSaveSchedule"}
    for schema in ids.values():
        assert schema.category == "sampling/asyndm" and schema.description
        assert all(i.tooltip for i in schema.inputs), schema.node_id
    assert ids["AsynDMSaveSchedule"].is_output_node
    assert ids["AsynDMMaskToTimestepMap"].display_name == "Attention Mask to Timestep Map"
    assert ids["AsynDMCrossAttentionMask"].display_name == "Cross-Attention Mask (AsynDM)"
    assert ids["AsynDMSchedulerLoader"].display_name == "Load Learned Scheduler"
    assert ids["AsynDMSaveSchedule"].display_name == "Save Schedule (AsynDM)"


def test_several_masks_of_different_sizes_and_batches(nodes):
    a = torch.zeros(1, 16, 16)
    a[0, :8] = 1.0
    b = torch.zeros(2, 8, 8)  # other size and batch 2: resized to 16x16, batch broadcast to 2
    b[:, 4:, :4] = 1.0
    b[1] = 0.0
    c = torch.full((1, 16, 16), 0.3)  # all below threshold: an item with no pixel
    sched, preview = mask_node(nodes, a, 0.6, mask_2=b, k_2=0.9, mask_3=c, k_3=1.0, threshold=0.5)
    assert isinstance(sched, nodes.AsynSchedule) and sched.mask_source == "masks"
    assert sched.k == (0.6, 0.9, 1.0) and sched.curve == "bin"
    assert sched.masks.shape == (2, 3, 16, 16) and sched.masks.dtype == torch.float32
    assert torch.equal(sched.masks[0, 0], a[0]) and torch.equal(sched.masks[1, 0], a[0])
    want_b = F.interpolate(b[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
    want_b = torch.where(want_b >= 0.5, want_b, torch.zeros_like(want_b))
    assert torch.allclose(sched.masks[:, 1], want_b)
    assert float(sched.masks[:, 2].abs().max()) == 0.0
    # preview: one strip per image, timestep tiles over priority tiles
    assert preview.ndim == 4 and preview.shape[0] == 2 and preview.shape[-1] == 3
    assert 0.0 <= float(preview.min()) and float(preview.max()) <= 1.0


def test_grey_masks_give_soft_priorities_and_the_threshold_cuts(nodes):
    m = torch.tensor([[[0.0, 0.2, 0.4, 0.5, 0.8, 1.0]]])
    sched, _ = mask_node(nodes, m, k=0.5, threshold=0.4)
    assert torch.allclose(sched.masks[0, 0, 0], torch.tensor([0.0, 0.0, 0.4, 0.5, 0.8, 1.0]))
    k_map = (sched.masks * torch.tensor(sched.k).view(1, -1, 1, 1)).amax(dim=1)  # the sampler's rule
    assert torch.allclose(k_map[0, 0], torch.tensor([0.0, 0.0, 0.2, 0.25, 0.4, 0.5]))
    sched, _ = mask_node(nodes, m, k=0.5, threshold=0.9)
    assert torch.equal(sched.masks[0, 0, 0], torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0]))


def test_feather_blurs_before_the_threshold(nodes):
    m = torch.zeros(1, 12, 12)
    m[0, :, 6:] = 1.0
    sched, _ = mask_node(nodes, m, feather=2, threshold=0.0)
    row = sched.masks[0, 0, 5]
    # Gaussian of sigma 1 over +-2 pixels, edge replicated, across a vertical step edge
    w = [math.exp(-0.5 * d * d) for d in (-2, -1, 0, 1, 2)]
    w = [v / sum(w) for v in w]
    for x in range(12):
        want = sum(w[d + 2] * (1.0 if min(max(x + d, 0), 11) >= 6 else 0.0) for d in range(-2, 3))
        assert math.isclose(float(row[x]), want, abs_tol=1e-6), x
    sched_cut, _ = mask_node(nodes, m, feather=2, threshold=0.5)
    assert float(sched_cut.masks[0, 0, 5, 5]) == 0.0 and float(sched_cut.masks[0, 0, 5, 6]) > 0.5


def test_all_zero_masks_give_a_synchronous_schedule(nodes):
    sched, preview = mask_node(nodes, torch.zeros(1, 8, 8), k=0.9, mask_2=torch.zeros(1, 8, 8), k_2=0.8)
    assert sched.is_synchronous and sched.k == (0.0, 0.0)
    # the preview shows every pixel on the background track: top row tiles are uniform
    assert torch.equal(preview[0, :64, :64], preview[0, :1, :1].expand(64, 64, 3))
    ones, _ = mask_node(nodes, torch.ones(1, 8, 8))
    assert not ones.is_synchronous and torch.equal(ones.masks, torch.ones(1, 1, 8, 8))


@pytest.mark.parametrize("which", ["mask", "mask_2", "mask_4"])
def test_non_finite_masks_are_refused_by_name(nodes, which):
    bad = torch.zeros(1, 8, 8)
    bad[0, 3, 3] = float("nan")
    kwargs = {"mask_2": torch.ones(1, 8, 8), "mask_4": torch.ones(1, 8, 8)}
    mask = torch.ones(1, 8, 8)
    if which == "mask":
        mask = bad
    else:
        kwargs[which] = bad
    with pytest.raises(ValueError, match=rf"{which} holds NaN or infinite"):
        mask_node(nodes, mask, **kwargs)


def test_mismatched_batches_are_refused(nodes):
    with pytest.raises(ValueError, match="different batch sizes"):
        mask_node(nodes, torch.ones(2, 8, 8), mask_2=torch.ones(3, 8, 8))


def test_items_mode_takes_each_batch_entry_as_an_item(nodes):
    m = torch.zeros(5, 8, 8)
    for j in range(5):
        m[j, j] = 1.0
    sched, _ = mask_node(nodes, m, k=0.1, k_2=0.2, k_3=0.3, k_4=0.4, mask_batch="items")
    assert sched.masks.shape == (1, 5, 8, 8) and sched.k == (0.1, 0.2, 0.3, 0.4, 0.4)
    assert torch.equal(sched.masks[0], m)
    with pytest.raises(ValueError, match="disconnect mask_2"):
        mask_node(nodes, m, mask_batch="items", mask_2=torch.ones(1, 8, 8))


def test_preview_shows_the_timestep_maps(nodes):
    m = torch.zeros(1, 8, 8)
    m[0, :4] = 1.0
    _, preview = mask_node(nodes, m, k=1.0, preview_steps=3)
    # timestep_strip: 3 tiles of 64 px (8 px maps x 8) with 2 px gaps, timestep row over priority row
    assert preview.shape == (1, 130, 3 * 64 + 4, 3)
    for i, tile_x in enumerate((0, 66, 132)):
        s_bg = 1001.0
        s_obj = 1001.0
        for r in range(3, 3 - i - 1, -1):  # states at step i: i + 1 updates from 1001
            s_bg = s_bg + (1 - s_bg) / r
            s_obj = min(s_obj + (1 - s_obj) / r + 1000 / 9 * (r - 1), s_obj)
        assert math.isclose(float(preview[0, 63, tile_x + 5, 0]), s_bg / 1001, abs_tol=1e-5)
        assert math.isclose(float(preview[0, 0, tile_x + 5, 0]), s_obj / 1001, abs_tol=1e-5)
        assert torch.allclose(preview[0, 66, tile_x + 5], torch.tensor([1.0, 0.55, 0.1]))  # priority k = 1


def test_mask_batch_that_does_not_fit_the_latent_fails_at_sampling(nodes, pack_nodes, sd15_checkpoint, conds):
    sched, _ = mask_node(nodes, torch.ones(2, 8, 8))
    with pytest.raises(ValueError, match="masks have batch 2 but the latent batch is 1"):
        ksampler(pack_nodes, sd15_checkpoint[0], conds, {"samples": torch.zeros(1, 4, 8, 8)}, sched, steps=2)


# ------------------------------------------------------------------------------------------------
# Cross-Attention Mask


XA_SEED, XA_STEPS = 5, 2


@pytest.fixture(scope="module")
def xattn(nodes, sd15_checkpoint, conds):
    """One run of the Cross-Attention Mask node on a 1x4x32x32 latent, with the averaged attention it saw."""
    model = sd15_checkpoint[0]
    seen: list = []
    cls = nodes.AttentionPrepassSampler
    original = cls._static_priorities

    def spy(self, *a, **kw):
        out = original(self, *a, **kw)
        seen.append((self.attention.clone(), self.attention_grid))
        return out

    cls._static_priorities = spy
    try:
        latent = {"samples": torch.zeros(1, 4, 32, 32)}
        out = nodes.AsynDMCrossAttentionMask.execute(model, conds[0], conds[1], latent, XA_SEED, XA_STEPS, 5.0, "euler",
                                                     "normal", "rabbit, basketball:0.9", 1.0)
    finally:
        cls._static_priorities = original
    assert len(seen) == 1
    return out.args[0], out.args[1], seen[0][0], seen[0][1]


def test_cross_attention_masks(xattn):
    masks, soft, attn, grid = xattn
    assert masks.shape == (2, 256, 256) and soft.shape == (2, 256, 256)
    assert bool(((masks == 0) | (masks == 1)).all())
    assert not torch.equal(masks[0], masks[1])
    assert float((masks.sum(dim=0)).max()) <= 1.0  # one word per pixel
    assert float(soft.min()) >= 0.0 and float(soft.max()) <= 1.0
    assert all(math.isclose(float(s.max()), 1.0, abs_tol=0.05) for s in soft)
    assert not torch.allclose(soft[0], soft[1])
    # independent check: the paper's rule on the captured averaged attention, nearest-upsampled 32x
    assert grid == (8, 8) and attn.shape == (1, 64, 2)
    member = attn[0] >= attn[0].mean(dim=0, keepdim=True)  # (64, 2), threshold 1
    for p in range(64):
        y, x = divmod(p, 8)
        want = [0.0, 0.0]
        if member[p, 1]:
            want[1] = 1.0  # basketball (k = 0.9) wins shared pixels
        elif member[p, 0]:
            want[0] = 1.0
        block = masks[:, y * 32:(y + 1) * 32, x * 32:(x + 1) * 32]
        assert torch.equal(block, torch.tensor(want).view(2, 1, 1).expand(2, 32, 32)), p
    # the soft map is the attention scaled to max 1, then bilinearly upsampled
    grid_maps = (attn[0] / attn[0].max(dim=0).values).T.reshape(2, 1, 8, 8)
    want_soft = F.interpolate(grid_maps, size=(256, 256), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(soft, want_soft, atol=1e-5)


def test_cross_attention_masks_equal_the_samplers_static_masks(xattn, adapter, pack_nodes, sd15_checkpoint, conds,
                                                               monkeypatch):
    """The node's pre-pass is the sampler's static pre-pass: same seed and settings, same masks."""
    masks = xattn[0]
    made = keep_samplers(monkeypatch, adapter)
    ksampler(pack_nodes, sd15_checkpoint[0], conds, {"samples": torch.zeros(1, 4, 32, 32)}, None, steps=XA_STEPS,
             key_words="rabbit, basketball:0.9", mask_mode="static", seed=XA_SEED)
    k_map = made[-1].record.priorities[0][0]  # (32, 32)
    ours = (masks[:, ::8, ::8] * torch.tensor([0.7, 0.9]).view(2, 1, 1)).amax(dim=0)
    assert torch.allclose(k_map, ours)


def test_cross_attention_needs_words_and_tokens(nodes, sd15_checkpoint, conds):
    model, clip = sd15_checkpoint[0], sd15_checkpoint[1]
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    with pytest.raises(ValueError, match="key_words is empty"):
        nodes.AsynDMCrossAttentionMask.execute(model, conds[0], conds[1], latent, 0, 1, 5.0, "euler", "normal", " ", 1.0)
    plain = clip.encode_from_tokens_scheduled(clip.tokenize("a rabbit"))
    with pytest.raises(ValueError, match="CLIP Text Encode \\(AsynDM\\)"):
        nodes.AsynDMCrossAttentionMask.execute(model, plain, conds[1], latent, 0, 1, 5.0, "euler", "normal",
                                               "rabbit", 1.0)


# ------------------------------------------------------------------------------------------------
# Loader and saver


def test_shipped_folder_is_registered(nodes, monkeypatch, tmp_path):
    import folder_paths

    extension = importlib.import_module(f"{PACK_MODULE}.nodes.extension")
    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path))
    monkeypatch.delitem(folder_paths.folder_names_and_paths, FOLDER, raising=False)
    folder_paths.filename_list_cache.pop(FOLDER, None)
    try:
        extension.register_model_folder()
        extension.register_model_folder()  # idempotent
        paths = folder_paths.get_folder_paths(FOLDER)
        assert paths == [str(tmp_path / FOLDER), str(SHIPPED)]
        assert {"asyndm-bin-k0.7.safetensors", "asyndm-lin-k0.7.safetensors",
                "asyndm-exp-k0.7.safetensors"} <= set(folder_paths.get_filename_list(FOLDER))
        schema = nodes.AsynDMSchedulerLoader.define_schema()
        assert "asyndm-exp-k0.7.safetensors" in schema.inputs[0].options
    finally:
        folder_paths.filename_list_cache.pop(FOLDER, None)


def load(nodes, name, *, schedule=None, key_words="rabbit", k=0.7):
    out = nodes.AsynDMSchedulerLoader.execute(name, key_words, k, 1.0, "static", schedule)
    return out.args[0], out.args[1]


@pytest.mark.parametrize("curve", ["bin", "lin", "exp"])
def test_loader_reads_the_shipped_tables(nodes, folders, curve):
    sched, plot = load(nodes, f"asyndm-{curve}-k0.7.safetensors", key_words="rabbit, basketball:0.9")
    want = table_from_curve(curve, [0.7], num_steps=50)
    assert torch.equal(sched.table.timesteps, want.timesteps) and torch.equal(sched.table.progress, want.progress)
    assert sched.mask_source == "attention" and sched.words == ("rabbit", "basketball") and sched.k == (0.7, 0.9)
    assert sched.dynamic is False and sched.curve == curve
    assert plot.shape == (1, 256, 256, 3)


def test_loader_attaches_the_table_to_a_given_schedule(nodes, folders):
    masked, _ = mask_node(nodes, torch.ones(1, 8, 8), k=0.8, curve="lin")
    sched, _ = load(nodes, "asyndm-exp-k0.7.safetensors", schedule=masked)
    assert sched.mask_source == "masks" and sched.k == (0.8,) and sched.curve == "lin"
    assert sched.masks is masked.masks and sched.table is not None and sched.table.curve == "exp"
    assert masked.table is None  # the input value is not changed (ComfyUI caches it)


def write_file(path: Path, tensors: dict, meta: dict | None) -> None:
    save_file(tensors, str(path), metadata=meta)


def test_loader_refuses_damaged_and_foreign_files(nodes, folders):
    good = SHIPPED / "asyndm-bin-k0.7.safetensors"
    data = good.read_bytes()
    (folders / "truncated.safetensors").write_bytes(data[: len(data) - 30])
    write_file(folders / "lora.safetensors", {"lora_up.weight": torch.zeros(2, 2)}, None)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "curve": "bin", "fitted_steps": "2"}
    ts = torch.tensor([[1.0, float("nan"), 0.0]])
    write_file(folders / "nan.safetensors", {"progress": torch.tensor([0.0, 0.5, 1.0]), "timesteps": ts,
                                             "priorities": torch.tensor([0.7])}, meta)
    (folders / "huge.safetensors").write_bytes(struct.pack("<Q", 2**60) + b"{}" + bytes(16))
    for name, match in [("truncated.safetensors", "truncated|outside"), ("lora.safetensors", "not an AsynDM"),
                        ("nan.safetensors", "NaN"), ("huge.safetensors", "corrupt or truncated")]:
        with pytest.raises(ValueError, match=match) as info:
            load(nodes, name)
        assert type(info.value).__name__ == ScheduleFileError.__name__  # the pack's own copy of the class
    with pytest.raises(FileNotFoundError, match="not found"):
        load(nodes, "missing.safetensors")


@pytest.mark.parametrize("name", ["../x.safetensors", "../asyndm_schedulers/ok.safetensors", "/etc/passwd",
                                  "sub/../../x.safetensors", "..\\x.safetensors", "C:/x.safetensors", "", "ok.txt",
                                  "ok.safetensors\x00"])
def test_loader_refuses_names_that_leave_the_folders(nodes, folders, name):
    # a valid file sits right beside the folder, where "../x" would lead
    (folders / "ok.safetensors").write_bytes((SHIPPED / "asyndm-bin-k0.7.safetensors").read_bytes())
    (folders.parent / "x.safetensors").write_bytes((SHIPPED / "asyndm-bin-k0.7.safetensors").read_bytes())
    with pytest.raises(ValueError, match="outside the schedule folders|no schedule file|not a .safetensors"):
        load(nodes, name)


def test_loader_refuses_an_absolute_path_to_a_valid_file(nodes, folders, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes((SHIPPED / "asyndm-lin-k0.7.safetensors").read_bytes())
    with pytest.raises(ValueError, match="outside the schedule folders"):
        load(nodes, str(outside))


def test_loader_reads_subfolders(nodes, folders):
    (folders / "mine").mkdir()
    (folders / "mine" / "a.safetensors").write_bytes((SHIPPED / "asyndm-lin-k0.7.safetensors").read_bytes())
    sched, _ = load(nodes, "mine/a.safetensors")
    assert sched.table.curve == "lin"


def save(nodes, filename="mine", curve="lin", k_values="0.5, 0.9", steps=12, description="", overwrite=False,
         schedule=None):
    return nodes.AsynDMSaveSchedule.execute(filename, curve, k_values, steps, description, overwrite, schedule)


def test_save_then_load_gives_the_same_table(nodes, folders):
    save(nodes, "my schedule-1", description="mine, for 12 steps")
    path = folders / "my schedule-1.safetensors"
    assert path.is_file()
    back = load_schedule(path)
    want = table_from_curve("lin", [0.5, 0.9], num_steps=12)
    assert torch.equal(back.progress, want.progress) and torch.equal(back.timesteps, want.timesteps)
    assert torch.equal(back.priorities, want.priorities)
    assert (back.curve, back.fitted_steps, back.description) == ("lin", 12, "mine, for 12 steps")
    sched, _ = load(nodes, "my schedule-1.safetensors")  # listed and loadable by the loader
    assert torch.equal(sched.table.timesteps, want.timesteps)
    # the loader's table saved again (through a schedule) is the same table
    save(nodes, "copy.safetensors", schedule=sched)
    again = load_schedule(folders / "copy.safetensors")
    assert torch.equal(again.timesteps, back.timesteps) and again.description == back.description


def test_save_refuses_overwrite_unless_asked(nodes, folders):
    save(nodes, "a", k_values="0.7")
    before = (folders / "a.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        save(nodes, "a", k_values="0.3")
    assert (folders / "a.safetensors").read_bytes() == before
    save(nodes, "a", k_values="0.3", overwrite=True)
    assert torch.equal(load_schedule(folders / "a.safetensors").priorities, torch.tensor([0.3]))
    with pytest.raises(ValueError, match="shipped with the pack"):
        save(nodes, "asyndm-bin-k0.7", overwrite=True)


@pytest.mark.parametrize("name", ["../evil", "a/b", "a\\b", "", "  ", ".hidden", "x..y", "naïve", "a:b", "/abs"])
def test_save_refuses_bad_file_names(nodes, folders, name):
    with pytest.raises(ValueError, match="not allowed"):
        save(nodes, name)
    assert not any(p.suffix == ".safetensors" for p in folders.parent.parent.rglob("*"))


def test_save_uses_a_schedules_curve_and_k(nodes, folders):
    m = torch.ones(1, 8, 8)
    masked, _ = mask_node(nodes, m, k=0.9, curve="exp", mask_2=m, k_2=0.4)
    save(nodes, "from-mask", curve="bin", k_values="0.1", schedule=masked)
    t = load_schedule(folders / "from-mask.safetensors")
    want = table_from_curve("exp", [0.4, 0.9], num_steps=12)
    assert t.curve == "exp" and torch.equal(t.timesteps, want.timesteps)
    assert "exp" in t.description and "12 steps" in t.description
    sync, _ = mask_node(nodes, torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="nothing to tabulate"):
        save(nodes, "sync", schedule=sync)
    with pytest.raises(ValueError, match="k_values"):
        save(nodes, "bad-k", k_values="0.7, lots")


# ------------------------------------------------------------------------------------------------
# End to end: a loaded table drives the Asynchronous KSampler


def test_loaded_table_drives_the_ksampler(nodes, adapter, pack_nodes, sd15_checkpoint, conds, folders, monkeypatch):
    model = sd15_checkpoint[0]
    masked, _ = mask_node(nodes, torch.ones(1, 64, 64), k=0.7, curve="lin")
    sched, _ = load(nodes, "asyndm-bin-k0.7.safetensors", schedule=masked)
    made = keep_samplers(monkeypatch, adapter)
    steps = 3
    out = ksampler(pack_nodes, model, conds, {"samples": torch.zeros(1, 4, 8, 8)}, sched, steps=steps,
                   scheduler="ddim_uniform")
    assert torch.isfinite(out).all()
    record = made[-1].record
    assert len(record.states) == steps
    k_map = record.priorities[0]
    assert torch.allclose(k_map, torch.full((1, 8, 8), 0.7))
    s = torch.full((1, 8, 8), 1001.0)
    s = table_step(s, steps, table=sched.table, k=k_map, num_steps=steps)
    for i in range(steps):
        assert torch.allclose(record.states[i], s, atol=1e-3), f"step {i}"
        s = table_step(s, steps - i - 1, table=sched.table, k=k_map, num_steps=steps)
    # the table ('bin'), not the mask schedule's own curve ('lin'), set the states
    analytic = step(torch.full((1,), 1001.0), steps, curve="lin", k=0.7, num_steps=steps)
    assert abs(float(record.states[0][0, 0, 0]) - float(analytic)) > 1.0


def test_a_table_saved_for_n_steps_reproduces_its_curve(nodes, adapter, pack_nodes, sd15_checkpoint, conds, folders,
                                                        monkeypatch):
    model = sd15_checkpoint[0]
    steps = 3
    save(nodes, "lin3", curve="lin", k_values="0.7", steps=steps)
    masked, _ = mask_node(nodes, torch.ones(1, 8, 8), k=1.0)
    masked = AsynSchedule(curve="bin", k=(0.7,), mask_source="masks", masks=masked.masks)
    sched, _ = load(nodes, "lin3.safetensors", schedule=masked)
    made = keep_samplers(monkeypatch, adapter)
    ksampler(pack_nodes, model, conds, {"samples": torch.zeros(1, 4, 8, 8)}, sched, steps=steps)
    states = made[-1].record.states
    s = torch.tensor([1001.0], dtype=torch.float64)
    for i in range(steps):  # method.md's 'lin' curve from 1001, independent of the table code
        s = step(s, steps - i, curve="lin", k=0.7, num_steps=steps)
        assert torch.allclose(states[i].double(), s.expand(1, 8, 8), atol=0.05), (i, states[i][0, 0, 0], s)


@pytest.fixture(autouse=True)
def _no_stray_files(request):
    """The tests write only under tmp_path (never into models/ or the shipped folder)."""
    before = sorted(os.listdir(SHIPPED))
    yield
    assert sorted(os.listdir(SHIPPED)) == before
