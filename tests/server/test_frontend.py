"""The pack's frontend in a real browser: the schedule plots, their curve math, the node docs, the template thumbnails.

Headless Chromium (Debian's /usr/bin/chromium) is driven by tests/server/browser/frontend_plot.mjs
through playwright-core in .dev/node; both are installed by scripts/setup_browser.sh. The node
script runs once per frontend (about 12 s each) and reports what it saw as JSON; the tests below
judge it. Every browser test runs twice: on the frontend ComfyUI pins (`pinned`, 1.32.9 with the
bundled 0.3.75) and on the newest frontend build (`newest`, comfyui-frontend-package 1.58.1, fetched
by scripts/setup.sh and served by a second ComfyUI through --front-end-root).
The curve values the JavaScript computes are checked against asyndm.schedules.step when it is
importable and always against an independent float64 statement of method.md's formulas; the
curves Load Learned Scheduler plots (numbers from the server) against an independent reading of
the schedule file's table.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT
from tests.server.conftest import CHROMIUM, NEWEST_FRONTEND_VERSION, NODE_DIR, require_browser_tools

SCRIPT = Path(__file__).resolve().parent / "browser" / "frontend_plot.mjs"
ARTIFACTS = REPO_ROOT / "artifacts"
PACK_URL = "/extensions/asyndm-comfyui"
PLOT_MODULES = {f"{PACK_URL}/js/{name}.js" for name in ("asyndm_schedule_plot", "asyndm_curves", "asyndm_plot_widget", "asyndm_loader_plot")}
DOC_NODES = ("AsynDMKSampler", "AsynDMSampler", "AsynDMTextEncode", "AsynDMMaskToTimestepMap", "AsynDMCrossAttentionMask", "AsynDMSchedulerLoader", "AsynDMSaveSchedule")

# (curve, k, steps) checked value by value against the JavaScript curve module.
CURVE_CASES = [
    (curve, k, n)
    for curve in ("linear", "bin", "lin", "exp")
    for k in (0.0, 0.3, 0.7, 1.0)
    for n in (1, 2, 7, 20, 50)
    if not (curve == "linear" and k != 0.0)
]
TOL = 1e-6
PACK = "asyndm-comfyui"
SHIPPED = REPO_ROOT / "schedules"
USER_SCHEDULES = REPO_ROOT / ".dev" / "models" / "asyndm_schedulers"  # asyndm_schedulers in .dev/extra_model_paths.yaml
TEMPLATES = sorted(p.stem for p in (REPO_ROOT / "workflows").glob("*.json"))
# The server a browser run talks to, and the frontend version that server must serve.
FRONTENDS = {"pinned": "server", "newest": "newest_frontend_server"}


# ------------------------------------------------------------------------------------------------
# The curves, restated independently (method.md, "Per-pixel schedule curves" and "Start").


def reference_step(s: float, r: int, curve: str, k: float, n: int, t: int = 1000, target: float = 1.0) -> float:
    """Next value of one pixel, float64, written from the formulas as method.md states them."""
    if r == 0:
        return 0.0
    if curve == "linear" or (curve == "bin" and k == 0.0):
        out = s + (target - s) / r
    elif curve == "bin":  # parabola of curvature c through (0, s) and (r, target), at x = 1
        c = -k * t / n**2
        x0 = (c * r**2 - (target - s)) / (2 * c * r)
        y0 = s - c * x0**2
        out = c * (1 - x0) ** 2 + y0
    elif curve == "lin":
        k1, k2 = -(1 - k) * t / n, -(1 + k) * t / n
        out = min(s + k1, target + k2 * (1 - r))
    elif curve == "exp":
        b, lam = -(1 - k) * t / n, 1.0 / n
        out = s + b + (math.exp(lam) - 1) * (s - target + b * r) / (1 - math.exp(lam * r))
    else:
        raise ValueError(curve)
    return min(out, s)


def reference_track(curve: str, k: float, n: int) -> list[float]:
    """Timestep of the model call at steps 0..n-1, then 0: values[i] = step(values[i-1], r = n - i), from 1001."""
    s, out = 1001.0, []
    for i in range(n + 1):
        s = reference_step(s, n - i, curve, k, n)
        out.append(s)
    return out


def package_track(curve: str, k: float, n: int) -> list[float] | None:
    """The same track from asyndm.schedules.step in float64, or None if the package is not importable."""
    try:
        import torch

        from asyndm.schedules import step
    except Exception:  # the package may be under construction: the independent statement still checks
        return None
    s = torch.tensor([1001.0], dtype=torch.float64)
    out = []
    for i in range(n + 1):
        s = step(s, n - i, curve=curve, k=k, num_steps=n, num_train_timesteps=1000, target=1.0)
        out.append(float(s[0]))
    return out


def expected_track(curve: str, k: float, n: int) -> list[float]:
    return package_track(curve, k, n) or reference_track(curve, k, n)


def assert_close(got: list[float], want: list[float], what: str) -> None:
    assert len(got) == len(want), f"{what}: {len(got)} values, expected {len(want)}"
    worst = max((abs(a - b) for a, b in zip(got, want, strict=True)), default=0.0)
    assert worst <= TOL, f"{what}: max |JS - Python| = {worst:g}\n JS: {got[:8]}...\n Py: {want[:8]}..."


# ------------------------------------------------------------------------------------------------
# The curves of a schedule file, restated from the file (README, "Schedule files"): a pixel whose k
# stays put is at offset + T * tau_k(u) after each step, tau_k interpolated in u, then in k (below
# the first level blended with the background line 1 - u, above the last the last level).


def file_table(path: Path) -> tuple[list[float], list[list[float]], list[float]]:
    from safetensors.torch import load_file

    t = load_file(str(path))
    return t["progress"].double().tolist(), t["timesteps"].double().tolist(), t["priorities"].double().tolist()


def _interp(x: float, xp: list[float], fp: list[float]) -> float:
    if x <= xp[0]:
        return fp[0]
    for j in range(1, len(xp)):
        if x <= xp[j]:
            w = (x - xp[j - 1]) / (xp[j] - xp[j - 1])
            return fp[j - 1] * (1 - w) + fp[j] * w
    return fp[-1]


def expected_file_track(path: Path, k: float, n: int) -> list[float]:
    progress, rows, levels = file_table(path)

    def tau(u: float) -> float:
        col = [_interp(u, progress, row) for row in rows]
        if k <= levels[0]:
            w = k / levels[0]
            return (1 - w) * (1 - u) + w * col[0]
        if k >= levels[-1]:
            return col[-1]
        return _interp(k, levels, col)

    return [1.0 + 1000.0 * tau((i + 1) / n) for i in range(n)] + [0.0]


# ------------------------------------------------------------------------------------------------
# One browser run per frontend.


@pytest.fixture(scope="module")
def broken_schedule() -> Iterator[str]:
    """A schedule file that the loader lists but that does not load (a truncated copy of a shipped one),
    in the user's schedule folder of the test servers; removed after the module."""
    USER_SCHEDULES.mkdir(parents=True, exist_ok=True)
    path = USER_SCHEDULES / f"asyndm-test-truncated-{os.getpid()}.safetensors"
    path.write_bytes((SHIPPED / "asyndm-bin-k0.7.safetensors").read_bytes()[:100])
    try:
        yield path.name
    finally:
        path.unlink(missing_ok=True)


def expected_frontend(which: str) -> str:
    return NEWEST_FRONTEND_VERSION if which == "newest" else importlib.metadata.version("comfyui-frontend-package")


@pytest.fixture(scope="module", params=list(FRONTENDS))
def browser(request: pytest.FixtureRequest, broken_schedule: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    require_browser_tools()
    which = request.param
    server = request.getfixturevalue(FRONTENDS[which])
    tmp = Path(tmp_path_factory.mktemp(f"frontend_{which}"))
    # Settings the frontend reads at start: no tutorial dialog, classic renderer to begin with.
    server.post("/settings", {"Comfy.TutorialCompleted": True, "Comfy.VueNodes.Enabled": False})
    suffix = "" if which == "pinned" else f"_{NEWEST_FRONTEND_VERSION}"
    shots = {
        key: [str(ARTIFACTS / f"{stem}{suffix}.png"), str(tmp / f"{stem}.png")]
        for key, stem in (("classic", "frontend_plot"), ("vue", "frontend_plot_vue"), ("loader", "loader_plot"),
                          ("loaderVue", "loader_plot_vue"), ("templates", "template_browser"))
    }
    for group in shots.values():
        for p in group:
            Path(p).unlink(missing_ok=True)
    spec = {
        "url": server.url,
        "chromium": str(CHROMIUM),
        "nodeDir": str(NODE_DIR),
        "userDataDir": str(tmp / "chromium-profile"),
        "screenshots": shots,
        "curveCases": [{"curve": c, "k": k, "steps": n} for c, k, n in CURVE_CASES],
        "loader": {"files": ["asyndm-bin-k0.7.safetensors", "asyndm-exp-k0.7.safetensors"], "broken": broken_schedule},
        "templates": {"pack": PACK, "names": TEMPLATES},
        "timeoutMs": 20000,
    }
    spec_path = tmp / "input.json"
    spec_path.write_text(json.dumps(spec))
    try:
        proc = subprocess.run(["node", str(SCRIPT), str(spec_path)], capture_output=True, text=True, timeout=300,
                              cwd=REPO_ROOT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the browser script ran past 300 s; stderr:\n{(e.stderr or '')[-3000:]}")
    finally:
        server.post("/settings", {"Comfy.VueNodes.Enabled": False})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"browser script failed (rc {proc.returncode}):\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    result["tmp"] = str(tmp)
    result["frontend"] = which
    result["suffix"] = suffix
    result["broken"] = broken_schedule
    (tmp / "result.json").write_text(json.dumps(result, indent=1))
    return result


def part(result: dict[str, Any], key: str) -> Any:
    """A part of the browser's report; fails with the script's own error when it stopped before it."""
    if key not in result:
        pytest.fail(f"the browser run stopped before '{key}' (done: {result.get('steps')}):\n{result.get('error')}")
    return result[key]


def _series_check(measured: dict[str, Any], steps: int, curve: str, items: list[tuple[str, float]]) -> None:
    series = measured["series"]
    assert [s["label"].split(" ")[0] for s in series[1:]] == [w for w, _ in items], series
    assert_close(series[0]["values"], expected_track("linear", 0.0, steps), "background track")
    for s, (word, k) in zip(series[1:], items, strict=True):
        assert s["curve"] == curve and s["k"] == pytest.approx(k), s["label"]
        assert_close(s["values"], expected_track(curve, k, steps), f"plotted curve of {word!r}")


# ------------------------------------------------------------------------------------------------
# Tests.


def test_reference_numbers_fix_the_index_convention() -> None:
    """values[i] = timestep of the model call at 0-based step i (values[0] = step(1001, r = N))."""
    n = 50
    tracks = {c: [round(v) for v in reference_track(c, 0.7, n)] for c in ("linear", "bin", "lin", "exp")}
    assert tracks["bin"][:3] == [995, 988, 980]
    assert tracks["lin"][:3] == [995, 989, 983]
    assert tracks["exp"][:3] == [987, 972, 958]
    assert tracks["linear"][:3] == [981, 961, 941]  # 1001 - 1000 (i + 1) / N: DDIM leading, offset 1
    # The brief's "step 25" numbers: the curves at index 25, the linear 501 at index 24 (= 25 updates).
    assert (tracks["bin"][25], tracks["lin"][25], tracks["exp"][25]) == (656, 817, 567)
    assert (tracks["linear"][24], tracks["linear"][25]) == (501, 481)
    assert all(t[-2] == 1 and t[-1] == 0 for t in tracks.values())
    pkg = package_track("bin", 0.7, n)
    if pkg is not None:
        assert_close(pkg, reference_track("bin", 0.7, n), "asyndm.schedules vs the independent statement")


def test_extension_loads_without_errors(browser: dict[str, Any]) -> None:
    assert PLOT_MODULES <= set(part(browser, "extensions")), browser["extensions"]
    assert "app ready" in browser["steps"], browser.get("error")
    assert browser["consoleOurs"] == [], browser["consoleOurs"]
    assert browser["warningsOurs"] == [], browser["warningsOurs"]
    assert browser["pageErrorsOurs"] == [], browser["pageErrorsOurs"]
    missing = [r for r in browser["badResponses"] if "/docs/" not in r["url"]]  # docs/<Node>/<locale>.md may 404
    assert missing == [], missing
    assert browser["ok"], browser.get("error")
    assert not browser.get("closeError"), browser["closeError"]


def test_js_curves_match_python(browser: dict[str, Any]) -> None:
    curves = part(browser, "curves")
    for (curve, k, n), got in zip(CURVE_CASES, curves["values"], strict=True):
        assert_close(got, reference_track(curve, k, n), f"JS {curve} k={k} N={n} vs the independent statement")
        pkg = package_track(curve, k, n)
        if pkg is not None:
            assert_close(got, pkg, f"JS {curve} k={k} N={n} vs asyndm.schedules")
    assert curves["parsed"] == {"items": [{"word": "rabbit", "k": 0.7}, {"word": "basketball", "k": 0.9}], "errors": []}


def test_plot_draws_in_the_classic_canvas(browser: dict[str, Any]) -> None:
    before = part(browser, "classic")["before"]
    assert before["found"] and before["connected"] and before["visible"], before
    assert not before["inVueNode"]
    assert before["onTop"], "something covers the plot canvas"
    assert before["draws"] >= 1
    assert before["cssHeight"] >= 140 and before["cssWidth"] >= 200, before
    assert before["nonBackground"] > 0.03 * before["pixels"], before  # axes, grid, curves, legend
    # the node grew to hold the plot below its widgets
    assert before["nodeSize"][1] >= before["widgetY"] + 150, before
    assert before["params"] == {"steps": 50, "stepsFromWidget": True, "k": 0.7, "curve": "bin",
                                "keyWords": "rabbit, basketball:0.9", "overridden": False}
    _series_check(before, 50, "bin", [("rabbit", 0.7), ("basketball", 0.9)])


def test_plot_redraws_when_k_changes(browser: dict[str, Any]) -> None:
    classic = part(browser, "classic")
    before, after = classic["before"], classic["afterK"]
    assert after["hash"] != before["hash"] and after["draws"] > before["draws"]
    assert after["params"]["k"] == pytest.approx(classic["kSet"])
    # the default k moves 'rabbit'; 'basketball' keeps its own :0.9
    _series_check(after, 50, "bin", [("rabbit", classic["kSet"]), ("basketball", 0.9)])


def test_plot_follows_a_click_on_the_steps_widget(browser: dict[str, Any]) -> None:
    edit = part(browser, "classic")["uiEdit"]
    assert edit["stepsBefore"] == 50 and edit["stepsAfter"] == 51, edit
    _series_check(edit, 51, "bin", [("rabbit", browser["classic"]["kSet"]), ("basketball", 0.9)])


def test_plot_stays_out_of_saved_workflows_and_follows_a_reload(browser: dict[str, Any]) -> None:
    saved = part(browser, "classic")["saved"]
    assert "asyndm_schedule_plot" not in saved["promptInputs"] and "k" in saved["promptInputs"], saved["promptInputs"]
    assert len(saved["widgetsValues"]) == saved["widgets"] - 1, "the plot widget was serialized into widgets_values"
    assert saved["reloadedK"] == 0.45 and saved["reloadedPlots"] == 1, saved
    after = saved["after"]
    assert not after.get("error"), after["error"]
    assert after["params"]["k"] == 0.45 and after["visible"], after


def test_plot_on_a_node_without_steps_uses_twenty(browser: dict[str, Any]) -> None:
    sampler = part(browser, "sampler")
    assert sampler["found"] and sampler["nonBackground"] > 0.03 * sampler["pixels"], sampler
    assert sampler["params"]["steps"] == 20 and not sampler["params"]["stepsFromWidget"]
    assert [s["values"] for s in sampler["series"]] == [21, 21]  # background + one curve for k (no key words)


def test_plot_in_the_vue_node_renderer(browser: dict[str, Any]) -> None:
    if not part(browser, "vueAvailable"):
        pytest.skip("this frontend has no Comfy.VueNodes.Enabled setting")
    vue = part(browser, "vue")
    before, after = vue["before"], vue["afterK"]
    assert before["inVueNode"] and before["vueNodeId"] == str(browser["vueNode"]["id"]), before
    assert before["visible"] and before["onTop"], before
    assert before["cssHeight"] >= 140 and before["cssWidth"] >= 200, before
    assert before["nonBackground"] > 0.03 * before["pixels"], before
    _series_check(before, 30, "exp", [("rabbit", 0.7), ("basketball", 0.95)])
    assert after["hash"] != before["hash"], "the Vue node's plot did not change with k"
    assert after["params"]["k"] == pytest.approx(vue["kSet"])
    _series_check(after, 30, "exp", [("rabbit", vue["kSet"]), ("basketball", 0.95)])
    edit = vue["uiEdit"]
    if not edit["available"]:
        pytest.fail("no steps '+' button found in the Vue node (the frontend's markup changed?)")
    assert edit["stepsBefore"] == 30 and edit["stepsAfter"] == 31, edit
    _series_check(edit, 31, "exp", [("rabbit", vue["kSet"]), ("basketball", 0.95)])


def test_screenshots_saved(browser: dict[str, Any]) -> None:
    part(browser, "classic")
    part(browser, "loader")
    part(browser, "templates")
    stems = ["frontend_plot", "loader_plot", "template_browser"]
    if browser.get("vue"):
        stems += ["frontend_plot_vue", "loader_plot_vue"]
    for stem in stems:
        for path in (ARTIFACTS / f"{stem}{browser['suffix']}.png", Path(browser["tmp"]) / f"{stem}.png"):
            assert path.exists(), path
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000, path


# ------------------------------------------------------------------------------------------------
# The frontend under test, curves that coincide, Load Learned Scheduler's plot, template thumbnails.


def test_the_run_used_the_frontend_it_names(browser: dict[str, Any]) -> None:
    """The page reports the frontend version of the build under test (graphToPrompt's extra.frontendVersion)."""
    assert part(browser, "frontendVersion") == expected_frontend(browser["frontend"])


def test_curves_with_equal_k_are_drawn_once_with_a_combined_legend(browser: dict[str, Any]) -> None:
    """key_words "rabbit, basketball" at k 0.7: one curve for both, and the legend names both on it."""
    m = part(browser, "equalK")
    assert m["found"] and m["visible"] and m["firstCurve"] > 50, m
    series = m["series"]
    assert [s["label"] for s in series] == ["background", "rabbit, basketball k=0.7"], series
    assert series[1]["members"] == [{"background": False, "word": "rabbit", "k": 0.7},
                                    {"background": False, "word": "basketball", "k": 0.7}]
    assert_close(series[1]["values"], expected_track("bin", 0.7, 30), "the shared curve")
    assert m["legend"] == ["background", "rabbit, basketball k=0.7"], m["legend"]


def _loader_series(m: dict[str, Any], file: str, items: list[tuple[str, float]], steps: int) -> None:
    """The plot shows `file` for the items (label, k): the background, then one curve per distinct k."""
    assert m["state"] == "ready" and m["error"] is None, m.get("error")
    assert m["response"]["name"] == file and m["response"]["steps"] == steps, m["response"]
    series = m["series"]
    assert series[0]["background"] and series[0]["label"] == "background"
    assert_close(series[0]["values"], expected_track("linear", 0.0, steps), "the loader's background")
    assert [s["label"] for s in series[1:]] == [label for label, _ in items], [s["label"] for s in series]
    for s, (label, k) in zip(series[1:], items, strict=True):
        assert_close(s["values"], expected_file_track(SHIPPED / file, k, steps), f"{file}: the curve of {label}")
    assert m["legend"] == [s["label"] for s in series], m["legend"]


def test_loader_plot_draws_the_chosen_file(browser: dict[str, Any]) -> None:
    loader = part(browser, "loader")
    m = loader["first"]
    assert m["found"] and m["visible"] and m["onTop"] and not m["inVueNode"], m
    assert m["cssHeight"] >= 140 and m["cssWidth"] >= 200, m
    assert m["nonBackground"] > 0.03 * m["pixels"] and m["firstCurve"] > 50, m
    assert m["params"]["name"] == "asyndm-bin-k0.7.safetensors" and m["params"]["mode"] == "key words"
    # the shipped file at its fitted 50 steps, for both words (one curve: the same k)
    _loader_series(m, "asyndm-bin-k0.7.safetensors", [("rabbit, basketball k=0.7", 0.7)], 50)
    # ... which is the paper's bin curve, tabulated
    assert max(abs(a - b) for a, b in zip(m["series"][1]["values"], reference_track("bin", 0.7, 50), strict=True)) < 1e-3
    assert "step" in m["xTitle"] and "50" in m["xTitle"] and m["response"]["curve"] == "bin"


def test_loader_plot_follows_a_file_change(browser: dict[str, Any]) -> None:
    loader = part(browser, "loader")
    before, after = loader["first"], loader["fileChange"]
    assert after["hash"] != before["hash"] and after["draws"] > before["draws"]
    _loader_series(after, "asyndm-exp-k0.7.safetensors", [("rabbit, basketball k=0.7", 0.7)], 50)
    assert after["response"]["curve"] == "exp" and after["firstCurve"] > 50


def test_loader_plot_shows_a_load_error_instead_of_a_curve(browser: dict[str, Any]) -> None:
    """A listed file that does not load: the message the loader would raise, in the plot area, and no curve."""
    from asyndm.schedule_file import load_schedule

    loader = part(browser, "loader")
    m = loader["broken"]
    with pytest.raises(ValueError) as err:
        load_schedule(USER_SCHEDULES / browser["broken"])
    assert m["state"] == "error" and m["error"] == str(err.value), (m["error"], str(err.value))
    assert "truncated" in m["error"] and browser["broken"] in m["error"]
    assert m["series"] == [] and m["legend"] == []
    assert m["firstCurve"] == 0, "a curve (the previous file's?) is still drawn under the error"
    assert m["nonBackground"] > 500 and m["hash"] != loader["fileChange"]["hash"], m  # the message is drawn
    # and a good file afterwards draws again
    back = loader["recovered"]
    _loader_series(back, "asyndm-bin-k0.7.safetensors", [("rabbit, basketball k=0.7", 0.7)], 50)
    assert back["firstCurve"] > 50


def test_loader_plot_follows_the_connected_schedule_and_the_sampler_steps(browser: dict[str, Any]) -> None:
    links = part(browser, "loader")["links"]
    file = "asyndm-bin-k0.7.safetensors"
    up = links["upstream"]  # Attention Mask to Timestep Map (k 0.4) connected: its k, not the key words
    assert up["params"]["mode"] == "schedule" and up["params"]["upstream"]["type"] == "AsynDMMaskToTimestepMap"
    _loader_series(up, file, [("mask k=0.4", 0.4)], 50)  # below the table's level: blended with the background
    assert "Attention Mask to Timestep Map" in up["note"]
    _loader_series(links["upstreamK"], file, [("mask k=0.9", 0.9)], 50)  # the upstream k edited: above the level
    down = links["downstream"]  # the schedule output feeds an Asynchronous KSampler with 20 steps
    _loader_series(down, file, [("mask k=0.9", 0.9)], 20)
    assert "20" in down["xTitle"] and "Asynchronous KSampler" in down["xTitle"], down["xTitle"]
    gone = links["disconnected"]  # back on its own key words
    assert gone["params"]["mode"] == "key words" and gone["params"]["upstream"] is None
    _loader_series(gone, file, [("rabbit, basketball k=0.7", 0.7)], 20)


def test_loader_plot_in_the_vue_node_renderer(browser: dict[str, Any]) -> None:
    if not part(browser, "vueAvailable"):
        pytest.fail("this frontend has no Comfy.VueNodes.Enabled setting: the Vue renderer cannot be checked")
    loader = part(browser, "loaderVue")
    first = loader["first"]
    assert first["inVueNode"] and first["vueNodeId"] == str(loader["node"]["id"]), first
    assert first["visible"] and first["onTop"] and first["cssHeight"] >= 140 and first["cssWidth"] >= 200, first
    assert first["nonBackground"] > 0.03 * first["pixels"] and first["firstCurve"] > 50, first
    _loader_series(first, "asyndm-bin-k0.7.safetensors", [("rabbit, basketball k=0.7", 0.7)], 50)
    change = loader["fileChange"]
    assert change["hash"] != first["hash"]
    _loader_series(change, "asyndm-exp-k0.7.safetensors", [("rabbit, basketball k=0.7", 0.7)], 50)
    broken = loader["broken"]
    assert broken["inVueNode"] and broken["state"] == "error" and broken["series"] == [], broken
    assert browser["broken"] in broken["error"] and broken["firstCurve"] == 0
    _loader_series(loader["recovered"], "asyndm-bin-k0.7.safetensors", [("rabbit, basketball k=0.7", 0.7)], 50)


def test_template_browser_shows_every_thumbnail(browser: dict[str, Any]) -> None:
    """Workflow > Browse Templates, the pack's category: every template is listed, and its card shows the
    pack's workflows/<name>.jpg (fetched from /api/workflow_templates/<pack>/<name>.jpg and decoded)."""
    from PIL import Image

    templates = part(browser, "templates")
    assert sorted(templates["listed"]) == TEMPLATES, templates["listed"]
    for name in TEMPLATES:
        served = templates["served"].get(name)
        assert served == {"status": 200, "type": "image/jpeg"}, (name, served)
        card = templates["cards"][name]
        assert not card.get("error"), (name, card.get("error"))
        with Image.open(REPO_ROOT / "workflows" / f"{name}.jpg") as img:
            size = img.size
        assert card["complete"] and (card["width"], card["height"]) == size, (name, card, size)
        assert min(card["shown"]) >= 100, (name, card)  # on screen, not a hidden placeholder


def _fetch_text(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""


def test_node_docs_are_served_where_the_frontend_looks(server) -> None:
    """Frontend 1.32.9 asks /extensions/<pack>/docs/<Node>/<locale>.md, then /extensions/<pack>/docs/<Node>.md,
    with <pack> taken from the node's python_module (custom_nodes.<pack>)."""
    info = server.get("/object_info")
    for name in DOC_NODES:
        node = info[name]
        assert node["python_module"] == "custom_nodes.asyndm-comfyui", node["python_module"]
        status, text = _fetch_text(f"{server.url}{PACK_URL}/docs/{name}.md")
        assert status == 200 and text.startswith("# "), (name, status)
        inputs = [*node["input"].get("required", {}), *node["input"].get("optional", {})]
        undocumented = [i for i in inputs if f"`{i}`" not in text]
        assert undocumented == [], f"{name}.md does not describe {undocumented}"
        outputs = node.get("output_name", [])
        assert all(f"`{o}`" in text for o in outputs), (name, outputs)
        assert "noise" in text and "random-weight" in text, name
