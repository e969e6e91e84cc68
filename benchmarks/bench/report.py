"""Statistics and the markdown tables (from a run's results, fresh or read back from --json)."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from . import family_rows, flux_rows, mmdit_rows, unet_rows
from .measure import OTHER_LABEL, OVER_KSAMPLER_LABELS, PREVIEW_LABEL, STOCK_LABELS

FAMILY_ROWS: dict[str, ModuleType] = {"unet": unet_rows, "flux": flux_rows, "mmdit": mmdit_rows, "dit": family_rows}
VARIANT_TITLES = {**flux_rows.VARIANT_TITLES, **unet_rows.VARIANT_TITLES, **family_rows.VARIANT_TITLES}
TARGETS = {"dynamic": 1.05, "fixed": 1.03}  # the limits on the time ratio vs KSampler
MEMORY_TARGET = 1.05


def rows_module(run: dict[str, Any], model: str) -> ModuleType:
    """The family module of a model in a run (results written before families had no 'family': UNet)."""
    return FAMILY_ROWS[run["models"].get(model, {}).get("family", "unet")]


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else math.nan


def spread(xs: Sequence[float]) -> tuple[float, float]:
    return (min(xs), max(xs)) if xs else (math.nan, math.nan)


def fmt_time(xs: Sequence[float]) -> str:
    lo, hi = spread(xs)
    return f"{median(xs):.3f} ({lo:.3f}-{hi:.3f})"


def fmt_ratio(xs: Sequence[float], target: float | None = None) -> str:
    if not xs:
        return "-"
    lo, hi = spread(xs)
    text = f"{median(xs):.3f}x ({lo:.3f}-{hi:.3f})"
    if target is not None:
        text += " ok" if median(xs) <= target else " OVER"
    return text


def case_ratios(times: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per repeat, each variant's time over the KSampler time of the same repeat."""
    base = times.get("ksampler", [])
    out: dict[str, list[float]] = {}
    for v, ts in times.items():
        if v == "ksampler" or not base:
            continue
        out[v] = [t / b for t, b in zip(ts, base, strict=False) if b > 0]
    if "dynamic" in times and "naive" in times:
        out["dynamic/naive"] = [a / b for a, b in zip(times["dynamic"], times["naive"], strict=False) if b > 0]
    return out


def pack_pieces_ms(piece_ms: dict[str, float], baseline: dict[str, float] | None = None,
                   family: ModuleType = unet_rows) -> float:
    """What the pack adds, measured piece by piece: every profiled piece except the model's own compute and
    ComfyUI's own per-call work, plus what the pieces both runs have (the stock module the pack feeds, the
    UNet's emb_layers; the sampler's set-up and loop) cost over the stock run's (the KSampler run's, when
    given; never less than 0; without it, all of the sampler's)."""
    over = {family.STOCK_MODULE_LABEL} | OVER_KSAMPLER_LABELS
    pieces = sum(v for k, v in piece_ms.items()
                 if k in dict(family.PIECES) and k not in family.NOT_PACK and k not in STOCK_LABELS and k not in over)
    for label in over:
        if label not in piece_ms:
            continue
        if baseline is not None and label in baseline:
            pieces += max(0.0, piece_ms[label] - baseline[label])  # a saving there is noise
        elif label in OVER_KSAMPLER_LABELS:
            pieces += piece_ms[label]
    return pieces


def _forward_cells(times: dict[str, list[float]], variants: list[str]) -> list[str]:
    """Each variant's forward time, and its ratio to the stock forward of the same repeat."""
    cells = []
    for v in variants:
        cell = _ms_cell(times[v])
        if v != "stock":
            cell += " " + fmt_ratio([a / b for a, b in zip(times[v], times["stock"], strict=False)])
        cells.append(cell)
    return cells


def _ms_cell(xs: Sequence[float]) -> str:
    ms = [1000.0 * x for x in xs]
    return f"{median(ms):.1f} ({min(ms):.1f}-{max(ms):.1f})"


def markdown(run: dict[str, Any]) -> str:
    env, results = run["environment"], run["results"]
    variants = run["variants"]
    lines = [f"## `{run['command']}`", ""]
    lines.append(
        f"Machine: {env['cpu']} ({env['cpus']} logical CPUs), {env['device']}, torch {env['torch']} with "
        f"{env['threads']} thread(s), Python {env['python']}, {env['platform']}. Load average at start "
        f"{env['load_start']}, at end {env.get('load_end', '?')}. Sampler {run['sampler']}/{run['scheduler']}, "
        f"cfg {run['cfg']}, seed {run['seed']}; warm-up {run['warmup']}, repeats {run['repeats']}, interleaved "
        f"(order reversed every other repeat). Total wall time {run.get('wall_s', 0):.0f} s."
    )
    lines.append("")
    for name, info in run["models"].items():
        lines.append(rows_module(run, name).model_line(name, info))
    if run.get("text_tokens") is not None and any(info.get("family") in ("flux", "mmdit", "dit")
                                                  for info in run["models"].values()):
        lines.append(f"Text context: {run['text_tokens']} tokens (conditioning and the forward alone).")
    lines.append("")
    timed_results = [r for r in results if any(r["times"].values())]
    if timed_results:
        lines.append("Wall time per image, seconds: median (min-max) over the repeats.")
        lines.append("")
        lines.append("| model | latent | batch | steps | " + " | ".join(VARIANT_TITLES[v] for v in variants) + " |")
        lines.append("|---|---|---|---|" + "---|" * len(variants))
        for r in timed_results:
            c = r["case"]
            cells = [fmt_time([t / c["batch"] for t in r["times"][v]]) for v in variants]
            lines.append(f"| {r['model']} | {c['height']}x{c['width']} | {c['batch']} | {c['steps']} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("Time ratio vs KSampler: median (min-max) of the per-repeat ratios (each variant over the KSampler "
                     "run of the same repeat); targets: 2 key words <= 1.05x, fixed masks <= 1.03x.")
        lines.append("")
        others = [v for v in variants if v != "ksampler"]
        head = [VARIANT_TITLES[v] for v in others] + (["pack / naive (2 key words)"] if "naive" in others and "dynamic" in others else [])
        lines.append("| model | latent | batch | steps | " + " | ".join(head) + " |")
        lines.append("|---|---|---|---|" + "---|" * len(head))
        for r in timed_results:
            c = r["case"]
            cells = [fmt_ratio(r["ratios"].get(v, []), TARGETS.get(v)) for v in others]
            if "naive" in others and "dynamic" in others:
                cells.append(fmt_ratio(r["ratios"].get("dynamic/naive", [])))
            lines.append(f"| {r['model']} | {c['height']}x{c['width']} | {c['batch']} | {c['steps']} | " + " | ".join(cells) + " |")
    if any(r.get("naive_vs_dynamic_max_abs") is not None for r in results):
        diffs = ", ".join(f"{r['case_label']}: {r['naive_vs_dynamic_max_abs']:.2e}" for r in results
                          if r.get("naive_vs_dynamic_max_abs") is not None)
        lines.append("")
        lines.append(f"Naive baseline check, max |naive - pack| over the latent of the same run: {diffs}.")
    if any(r.get("fixed_vs_ksampler_max_abs") is not None for r in results):
        diffs = ", ".join(f"{r['model']} {r['case_label']}: {r['fixed_vs_ksampler_max_abs']:.2e}" for r in results
                          if r.get("fixed_vs_ksampler_max_abs") is not None)
        lines.append("")
        lines.append(f"Key-mask check, max |async fixed masks - KSampler| over the latent (nonzero: the run was "
                     f"asynchronous): {diffs}.")
    lines.extend(_family_summary(run, timed_results))
    lines.extend(_dispatch_table(run, [r for r in results if r.get("dispatch")]))
    unet_rows_ = [r for r in results if r.get("unet")]
    if unet_rows_:
        lines.append("")
        lines.append("UNet forward alone (the 2 x batch CFG rows, hooks installed outside the timed call), ms: median "
                     "(min-max); ratio vs the stock forward of the same repeat. 'pack hooks' has a two-track map "
                     "(half the pixels at another timestep).")
        lines.append("")
        uv = unet_rows.UNET_VARIANTS
        lines.append("| model | latent | batch | " + " | ".join(uv) + " |")
        lines.append("|---|---|---|" + "---|" * len(uv))
        for r in unet_rows_:
            c, u = r["case"], r["unet"]
            cells = _forward_cells(u, uv)
            lines.append(f"| {r['model']} | {c['height']}x{c['width']} | {c['batch']} | " + " | ".join(cells) + " |")
    lines.extend(_forward_tables(run, [r for r in results if r.get("forward")]))
    mem_rows = [r for r in results if r.get("memory")]
    if mem_rows:
        kind = next(iter(mem_rows[0]["memory"].values()))["kind"]
        lines.append("")
        lines.append(f"Peak memory, MiB ({kind}; a fresh process per variant on the CPU, min(steps, {run['memory_steps']}) steps): "
                     "peak / increase over the loaded model; ratio of the peaks and of the increases vs KSampler "
                     f"(target <= {MEMORY_TARGET}x).")
        lines.append("")
        mv = [v for v in variants if v in mem_rows[0]["memory"]]
        lines.append("| model | latent | batch | " + " | ".join(VARIANT_TITLES[v] for v in mv) + " |")
        lines.append("|---|---|---|" + "---|" * len(mv))
        for r in mem_rows:
            c, m = r["case"], r["memory"]
            base = m.get("ksampler")
            cells = []
            for v in mv:
                cell = f"{m[v]['peak_mib']:.0f} / +{m[v]['delta_mib']:.0f}"
                if base and v != "ksampler":
                    rp = m[v]["peak_mib"] / base["peak_mib"]
                    rd = m[v]["delta_mib"] / base["delta_mib"] if base["delta_mib"] > 0 else math.nan
                    cell += f" ({rp:.3f}x / {rd:.2f}x)"
                cells.append(cell)
            lines.append(f"| {r['model']} | {c['height']}x{c['width']} | {c['batch']} | " + " | ".join(cells) + " |")
    prof_rows = [r for r in results if r.get("profile")]
    for r in prof_rows:
        family = rows_module(run, r["model"])
        prof = r["profile"]
        pv = [v for v in variants if v in prof]
        base_total = prof.get("ksampler", {}).get("total")
        lead = next((v for v in ("dynamic", "fixed", "half") if v in prof), "fixed")
        lines.append("")
        lines.append(f"Profile, {r['model']} {r['case_label']}: ms per run (exclusive times; each piece the median "
                     "of the instrumented runs, taken in turn with the other variants', so the rows add up to about "
                     f"the total); last column: the {lead} run's piece as % of the KSampler run.")
        lines.append("")
        lines.append("| piece | " + " | ".join(VARIANT_TITLES[v] for v in pv) + f" | {lead}, % of KSampler |")
        lines.append("|---|" + "---|" * (len(pv) + 1))
        labels = ["total", *[p for p, _ in family.PIECES], OTHER_LABEL, PREVIEW_LABEL]
        for label in labels:
            if not any(abs(prof[v].get(label, 0.0)) > 0.0005 for v in pv):
                continue
            cells = [f"{prof[v][label]:.1f}" if label in prof[v] else "-" for v in pv]
            pct = "-"
            if base_total and lead in prof and label in prof[lead]:
                pct = f"{100.0 * prof[lead][label] / base_total:.2f}%"
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {pct} |")
        sums = {v: pack_pieces_ms(prof[v], prof.get("ksampler"), family) for v in pv}
        cells = [f"{sums[v]:.1f}" + (f" ({100.0 * sums[v] / base_total:.2f}%)" if base_total else "") for v in pv]
        lines.append(f"| {family.PACK_SUM_TITLE} | " + " | ".join(cells) + " | - |")
    lines.append("")
    return "\n".join(lines)


def _dispatch_table(run: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """Ops and host syncs per step of each variant: what a GPU's launch queue would see."""
    if not rows:
        return []
    dv = [v for v in run["variants"] if v in rows[0]["dispatch"]]
    lines = ["", "Aten ops and host syncs per step (slope between a half-length and a full-length run; ops beyond "
             "KSampler's in brackets; syncs: all / the pack's own, ComfyUI's samplers and schedulers read their "
             "sigmas; 'pipelined': the dynamic masks' one read per step, taken after the next model call was "
             "queued, so not a sync). Targets: the pack's syncs 0, <= 80 extra ops with fixed masks, <= 150 with "
             "key words (the issue's SD1.5 model).", ""]
    lines.append("| model | latent | batch | steps | " + " | ".join(VARIANT_TITLES[v] for v in dv) + " |")
    lines.append("|---|---|---|---|" + "---|" * len(dv))
    for r in rows:
        c, d = r["case"], r["dispatch"]
        cells = []
        for v in dv:
            extra = "" if v == "ksampler" else f" ({d[v]['extra_ops']:+.0f})"
            piped = d[v].get("pipelined_reads", 0.0)
            cells.append(f"{d[v]['ops']:.0f}{extra} ops, {d[v]['syncs']:.2f} / {d[v]['pack_syncs']:.2f} syncs"
                         + (f", {piped:.2f} pipelined" if piped else ""))
        lines.append(f"| {r['model']} | {c['height']}x{c['width']} | {c['batch']} | {c['steps']} | " + " | ".join(cells) + " |")
    return lines


def overhead_ms_per_step(r: dict[str, Any], variant: str) -> float:
    """Median over the repeats of (variant - KSampler of the same repeat) / steps, in ms per image."""
    c, times = r["case"], r["times"]
    diffs = [(a - b) / (c["steps"] * c["batch"]) for a, b in zip(times.get(variant, []), times["ksampler"], strict=False)]
    return 1000.0 * median(diffs)


def _family_summary(run: dict[str, Any], results: list[dict[str, Any]]) -> list[str]:
    """The other transformer families' rows, one line each: both ratios, the overhead per step, memory."""
    rows = [r for r in results if run["models"].get(r["model"], {}).get("family") == family_rows.FAMILY]
    if not rows:
        return []
    lines = ["", "Transformer families: time ratio vs KSampler (median (min-max) of the per-repeat ratios); overhead "
             "per step = median over the repeats of (async - KSampler of the same repeat) / steps, ms (below 0: "
             "noise); max |async - KSampler| over the latent (no key items: 0, ComfyUI's own sampler ran; key mask: "
             "nonzero, the run was asynchronous); peak memory ratio vs KSampler.", ""]
    lines.append("| family | latent | image + text tokens | steps | cfg | KSampler, s | no key items | half-image key mask "
                 "| overhead, ms/step: no keys / key mask | max abs diff: no keys / key mask | peak memory: no keys / "
                 "key mask |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        info, c = run["models"][r["model"]], r["case"]
        patch = info["patch_size"]
        image = -(-c["height"] // patch) * -(-c["width"] // patch)
        text = run.get("text_tokens", "?")
        if info.get("text_pad") and isinstance(text, int) and text < info["text_pad"]:
            text = f"{text} (padded to {info['text_pad']})"
        tokens = f"{image}" + (f" + {image} ref" if info["reference"] else "") + f" + {text}"
        over = " / ".join(f"{overhead_ms_per_step(r, v):.1f}" for v in ("nokeys", "half"))
        diffs = " / ".join(f"{r[f'{v}_vs_ksampler_max_abs']:.2g}" if f"{v}_vs_ksampler_max_abs" in r else "-"
                           for v in ("nokeys", "half"))
        mem = r.get("memory") or {}
        base = mem.get("ksampler")
        peaks = " / ".join(f"{mem[v]['peak_mib'] / base['peak_mib']:.3f}" if base and v in mem else "-"
                           for v in ("nokeys", "half"))
        cfg = run["cfg"] if isinstance(run["cfg"], (int, float)) else info["cfg"]
        lines.append(f"| {info['title']} (`{r['model']}`) | {c['height']}x{c['width']} | {tokens} | {c['steps']} | "
                     f"{cfg:g} | {fmt_time(r['times']['ksampler'])} | {fmt_ratio(r['ratios'].get('nokeys', []))} "
                     f"| {fmt_ratio(r['ratios'].get('half', []))} | {over} | {diffs} | {peaks} |")
    return lines


def _forward_tables(run: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """A transformer family's forward alone: times and ratios, then the hook pieces per forward."""
    if not rows:
        return []
    family = rows_module(run, rows[0]["model"])
    fv = family.FORWARD_VARIANTS
    low, high = family.TIMESTEPS
    lines = ["", f"{family.FORWARD_TITLE} (the sampler's rows: batch, x2 under cfg > 1; hooks installed outside "
             "the timed call), ms: median (min-max); ratio vs the stock forward of the same repeat. 'per-token hooks' "
             f"has a two-timestep map (model timestep {high:g} on the top-left quarter, {low:g} elsewhere); "
             f"{family.NAIVE_NOTE}.", ""]
    lines.append("| model | latent | rows | image + text tokens | " + " | ".join(fv) + " |")
    lines.append("|---|---|---|---|" + "---|" * len(fv))
    for r in rows:
        c, u, shape = r["case"], r["forward"], r["forward_shape"]
        cells = _forward_cells(u, fv)
        lines.append(f"| {r['model']} | {c['height']}x{c['width']} | {shape['rows']} | "
                     f"{shape['image_tokens']} + {shape['text_tokens']} | " + " | ".join(cells) + " |")
    lines += ["", "The per-token modulation's pieces, ms per forward (median of instrumented forwards after a warm-up, "
              "exclusive times) and % of the median stock forward:", ""]
    pv = ("per-token hooks", "naive per-token hooks")
    lines.append("| model | latent | piece | " + " | ".join(pv) + " |")
    lines.append("|---|---|---|" + "---|" * len(pv))
    for r in rows:
        c, pieces = r["case"], r["forward_pieces"]
        stock_ms = 1000.0 * median(r["forward"]["stock"])
        for label in (*family.HOOK_PIECES, "total hooks"):
            if not any(label in pieces.get(v, {}) for v in pv):
                continue
            cells = []
            for v in pv:
                ms = pieces.get(v, {}).get(label)
                cells.append("-" if ms is None else f"{ms:.2f} ({100.0 * ms / stock_ms:.2f}%)")
            name = f"**{label}**" if label == "total hooks" else label
            lines.append(f"| {r['model']} | {c['height']}x{c['width']} | {name} | " + " | ".join(cells) + " |")
    return lines


def environment(device: str, threads: int) -> dict[str, Any]:
    import torch

    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    dev = "CPU"
    if device.startswith("cuda"):
        dev = torch.cuda.get_device_name(torch.device(device))
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "device": dev,
        "torch": torch.__version__,
        "threads": threads,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "load_start": loadavg(),
    }


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"
