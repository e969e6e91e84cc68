"""Regenerate the template thumbnails workflows/<name>.jpg from the workflows themselves.

A thumbnail shows the graph as it opens in ComfyUI (classic renderer, the pinned frontend unless
--front-end-root names another build): the whole graph, fitted, above a close-up of the in-node
schedule plot of its main AsynDM node (Load Learned Scheduler, Attention Mask to Timestep Map, the
Asynchronous KSampler or Sampler, in that order) exactly as that node draws it when the template
opens. 512 x 512 JPEG (the template browser shows square cards), well under 100 KB. The JPEG
comment records the SHA-256 of the workflow file it was made from, so the tests can tell a stale
thumbnail from a current one.

Needs the set-up (scripts/setup.sh, scripts/setup_browser.sh); run with the development Python:

    .dev/venv/bin/python scripts/make_thumbnails.py            # all of workflows/*.json
    .dev/venv/bin/python scripts/make_thumbnails.py asyndm_sdxl

It starts its own ComfyUI server (this pack and the random-weight models; nothing runs) and
headless Chromium (scripts/make_thumbnails.mjs); both are stopped at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_server import DEV, ROOT, ComfyServer  # noqa: E402

WORKFLOWS = ROOT / "workflows"
SIZE = 512
GAP = 14
MARGIN = 8
BACKGROUND = (20, 20, 20)
COMMENT_PREFIX = "asyndm-thumbnail workflow-sha256="
MAX_BYTES = 100_000
SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.VueNodes.Enabled": False,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
    "Comfy.Workflow.ShowMissingModelsWarning": False,
    "Comfy.Workflow.ShowMissingNodesWarning": False,
}


def workflow_hash(path: Path) -> str:
    """SHA-256 of the workflow file's bytes: what a thumbnail's JPEG comment records."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def expected_comment(path: Path) -> str:
    return COMMENT_PREFIX + workflow_hash(path)


def _fit(img: Image.Image, width: int, height: int) -> Image.Image:
    scale = min(width / img.width, height / img.height)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.LANCZOS)


def compose(overview: Path, plot: Path, out: Path, comment: str) -> int:
    """Overview (top) and plot close-up (bottom) on a SIZE x SIZE card; returns the JPEG's size in bytes."""
    inner = SIZE - 2 * MARGIN
    top = Image.open(overview).convert("RGB")
    bottom = Image.open(plot).convert("RGB")
    bottom_img = _fit(bottom, inner, (inner - GAP) // 2 + 40)
    top_img = _fit(top, inner, inner - GAP - bottom_img.height)
    card = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    total = top_img.height + GAP + bottom_img.height
    y = (SIZE - total) // 2
    card.paste(top_img, ((SIZE - top_img.width) // 2, y))
    y += top_img.height + GAP
    card.paste(ImageOps.expand(bottom_img, border=1, fill=(70, 70, 70)), ((SIZE - bottom_img.width) // 2 - 1, y - 1))
    for quality in (82, 75, 68, 60):
        card.save(out, "JPEG", quality=quality, optimize=True, progressive=True, comment=comment.encode())
        if out.stat().st_size < MAX_BYTES:
            break
    return out.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="workflow names (default: every workflows/*.json)")
    parser.add_argument("--front-end-root", help="a frontend build (static folder) for ComfyUI to serve")
    parser.add_argument("--chromium", default=os.environ.get("ASYNDM_CHROMIUM", "/usr/bin/chromium"))
    args = parser.parse_args(argv)
    names = args.names or sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    paths = {n: WORKFLOWS / f"{n}.json" for n in names}
    missing = [n for n, p in paths.items() if not p.is_file()]
    if missing:
        parser.error(f"no workflow {', '.join(missing)} in {WORKFLOWS}")
    node_dir = DEV / "node"
    if not (node_dir / "node_modules" / "playwright-core").is_dir():
        parser.error("playwright-core is missing: run `bash scripts/setup_browser.sh` first")
    extra = ["--front-end-root", args.front_end_root] if args.front_end_root else []
    with tempfile.TemporaryDirectory(prefix="asyndm-thumbs-") as tmp_dir:
        tmp = Path(tmp_dir)
        settings = tmp / "run" / "user" / "default" / "comfy.settings.json"
        settings.parent.mkdir(parents=True)
        settings.write_text(json.dumps(SETTINGS))
        shots = tmp / "shots"
        shots.mkdir()
        spec = {"chromium": args.chromium, "nodeDir": str(node_dir), "userDataDir": str(tmp / "profile"),
                "out": str(shots), "workflows": [{"name": n, "path": str(p)} for n, p in paths.items()],
                "timeoutMs": 30000}
        with ComfyServer(tmp / "run", extra_args=extra) as server:
            spec["url"] = server.url
            (tmp / "input.json").write_text(json.dumps(spec))
            proc = subprocess.run(["node", str(ROOT / "scripts" / "make_thumbnails.mjs"), str(tmp / "input.json")],
                                  capture_output=True, text=True, timeout=900, cwd=ROOT)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        report = json.loads(lines[-1]) if lines else {}
        if proc.returncode != 0 or not report.get("ok"):
            print(report.get("error") or proc.stderr[-3000:], file=sys.stderr)
            return 1
        for item in report["workflows"]:
            name = item["name"]
            out = WORKFLOWS / f"{name}.jpg"
            size = compose(shots / f"{name}-overview.png", shots / f"{name}-plot.png", out, expected_comment(paths[name]))
            print(f"{out.relative_to(ROOT)}: {size // 1024} KB (plot of {item['hero']['title']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
