"""The pack's frontend in a real browser: the schedule plot extension, its curve math, the node docs.

Headless Chromium (Debian's /usr/bin/chromium) is driven by tests/server/browser/frontend_plot.mjs
through playwright-core in .dev/node; both are installed by scripts/setup_browser.sh. The node
script runs once per module (about 15 s) and reports what it saw as JSON; the tests below judge it.
The curve values the JavaScript computes are checked against asyndm.schedules.step when it is
importable and always against an independent float64 statement of method.md's formulas.
"""

from __future__ import annotations

import json
import math
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT
from tests.server.conftest import CHROMIUM, NODE_DIR, require_browser_tools

SCRIPT = Path(__file__).resolve().parent / "browser" / "frontend_plot.mjs"
ARTIFACTS = REPO_ROOT / "artifacts"
PACK_URL = "/extensions/asyndm-comfyui"
PLOT_MODULES = {f"{PACK_URL}/js/asyndm_schedule_plot.js", f"{PACK_URL}/js/asyndm_curves.js"}
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
# One browser run per module.




@pytest.fixture(scope="module")
def browser(server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    require_browser_tools()
    tmp = Path(tmp_path_factory.mktemp("frontend"))
    # Settings the frontend reads at start: no tutorial dialog, classic renderer to begin with.
    server.post("/settings", {"Comfy.TutorialCompleted": True, "Comfy.VueNodes.Enabled": False})
    shots = {
        "classic": [str(ARTIFACTS / "frontend_plot.png"), str(tmp / "frontend_plot.png")],
        "vue": [str(ARTIFACTS / "frontend_plot_vue.png"), str(tmp / "frontend_plot_vue.png")],
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
    for name in ("frontend_plot.png", "frontend_plot_vue.png"):
        if name.endswith("_vue.png") and not browser.get("vue"):
            continue
        for folder in (ARTIFACTS, Path(browser["tmp"])):
            path = folder / name
            assert path.exists(), path
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000, path


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
