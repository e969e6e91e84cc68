"""The main job: a real ComfyUI server with this pack runs the example workflow.

Runs the asynchronous text-to-image example (and the synchronous KSampler baseline with the same
seed, for comparison) through the server's HTTP API, copies the images into an output folder and
prints where they are. With the default random-weight model the pictures are noise: the run shows
the pipeline works end to end, not image quality.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_server import DEV, ROOT, ComfyServer, error_message  # noqa: E402

DEFAULT_CKPT = "asyndm-random-sd15.safetensors"
NEGATIVE = "blurry, low quality"
WORKFLOWS = {
    "asynchronous": ROOT / "workflows/api/asyndm_text_to_image.json",
    "synchronous": ROOT / "workflows/api/ksampler_baseline.json",
}


def load_prompt(path: Path, ckpt: str, seed: int, steps: int, size: int, text: str | None, words: str | None) -> dict:
    prompt = json.loads(path.read_text())
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = ckpt
        if node["class_type"] == "EmptyLatentImage":
            inputs["width"] = inputs["height"] = size
        if "seed" in inputs:
            inputs["seed"] = seed
            inputs["steps"] = steps
        if "key_words" in inputs and words is not None:
            inputs["key_words"] = words
        is_positive = node["class_type"] == "AsynDMTextEncode" or (
            node["class_type"] == "CLIPTextEncode" and inputs.get("text") != NEGATIVE
        )
        if text is not None and is_positive:
            inputs["text"] = text
    return prompt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default=DEFAULT_CKPT, help="checkpoint file name in your checkpoints folder (default: the random-weight SD1.5 test model)")
    ap.add_argument("--models-config", type=Path, default=None, help="an extra_model_paths.yaml naming your own model folders")
    ap.add_argument("--out", type=Path, default=ROOT / "output", help="where to copy the images (default: ./output)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=256, help="image width and height in pixels")
    ap.add_argument("--prompt", default=None, help="positive prompt (default: 'a rabbit playing basketball')")
    ap.add_argument("--key-words", default=None, help="key words of the prompt (default: 'rabbit, basketball')")
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--keep-server", action="store_true", help="keep the server running afterwards so you can open the UI")
    args = ap.parse_args()

    run_dir = DEV / "run" / time.strftime("%Y%m%d-%H%M%S")
    models_config = args.models_config.resolve() if args.models_config else None
    if models_config is not None:
        # the user's folders, plus ours so the default model stays available
        merged = run_dir / "extra_model_paths.yaml"
        run_dir.mkdir(parents=True, exist_ok=True)
        merged.write_text((DEV / "extra_model_paths.yaml").read_text() + "\n" + models_config.read_text())
        models_config = merged
    server = ComfyServer(run_dir, port=args.port, models_config=models_config)
    print(f"starting ComfyUI (log: {server.log_path})", flush=True)
    server.start()
    out_dir = args.out.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    status = 0
    try:
        print(f"ComfyUI is serving {server.url}", flush=True)
        for name, path in WORKFLOWS.items():
            prompt = load_prompt(path, args.ckpt, args.seed, args.steps, args.size, args.prompt, args.key_words)
            t0 = time.time()
            entry = server.run(prompt)
            err = error_message(entry)
            if err is not None:
                print(f"{name}: FAILED: {err}", flush=True)
                status = 1
                continue
            files = server.output_files(entry)
            copied = []
            for f in files:
                dest = out_dir / f"{name}-{f.name}"
                shutil.copy2(f, dest)
                copied.append(dest)
            print(f"{name}: {time.time() - t0:.1f} s, wrote:", flush=True)
            for c in copied:
                print(f"  {c}", flush=True)
        if args.ckpt == DEFAULT_CKPT:
            print("note: the default model has random weights, so the images are noise by design; "
                  "use --ckpt with a real SD1.5 checkpoint for real pictures.", flush=True)
        print(f"images are in {out_dir}", flush=True)
        if args.keep_server:
            print(f"open {server.url} in a browser; the example workflow is in {ROOT / 'workflows'}. Ctrl-C stops the server.",
                  flush=True)
            try:
                while server.proc is not None and server.proc.poll() is None:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        else:
            print("to use the UI: rerun with --keep-server and open http://127.0.0.1:<port> (it prints the address)", flush=True)
    finally:
        server.stop()
    return status


if __name__ == "__main__":
    raise SystemExit(main())
