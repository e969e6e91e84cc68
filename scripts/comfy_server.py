"""Start, drive and stop a real ComfyUI server with this pack, for the main job and the tests.

The server runs from the dev tree (COMFYUI_PATH or .dev/comfyui) with only this pack enabled,
on loopback, with its own database, input/output/temp/user folders under one run directory.
It is stopped by its own PID, also when the caller fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEV = ROOT / ".dev"
PACK_LINK_NAME = "asyndm-comfyui"


def comfyui_dir() -> Path:
    env = os.environ.get("COMFYUI_PATH")
    return Path(env).resolve() if env else (DEV / "comfyui").resolve()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ComfyServer:
    """A ComfyUI server process (use as a context manager)."""

    def __init__(self, run_dir: Path, *, port: int | None = None, models_config: Path | None = None,
                 extra_args: list[str] | None = None, python: str | None = None,
                 extra_paths_configs: list[Path] | None = None, extra_custom_nodes: list[str] | None = None) -> None:
        """extra_paths_configs: more extra_model_paths.yaml files (they may add custom_nodes folders);
        extra_custom_nodes: custom node folder or file names to load besides this pack."""
        self.run_dir = Path(run_dir)
        self.port = port or free_port()
        self.models_config = models_config or (DEV / "extra_model_paths.yaml")
        self.extra_paths_configs = list(extra_paths_configs or [])
        self.extra_custom_nodes = list(extra_custom_nodes or [])
        self.extra_args = extra_args or []
        self.python = python or sys.executable
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.run_dir / "server.log"
        self.client_id = uuid.uuid4().hex

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> ComfyServer:
        for sub in ("in", "out", "tmp", "user/default"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        settings = self.run_dir / "user/default/comfy.settings.json"
        if not settings.exists():
            settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
        comfy = comfyui_dir()
        cmd = [
            self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--disable-auto-launch", "--disable-api-nodes",
            "--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK_LINK_NAME, *self.extra_custom_nodes,
            "--database-url", f"sqlite:///{self.run_dir / 'comfyui.db'}",
            "--output-directory", str(self.run_dir / "out"), "--temp-directory", str(self.run_dir / "tmp"),
            "--input-directory", str(self.run_dir / "in"), "--user-directory", str(self.run_dir / "user"),
            "--extra-model-paths-config", str(self.models_config), *map(str, self.extra_paths_configs),
            *self.extra_args,
        ]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=comfy, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} at start; log:\n{self.log()[-4000:]}")
            try:
                self.get("/object_info/KSampler", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout} s; log:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        """Stop the server by its own PID (its process group), never by name."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- HTTP ---------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body else None

    def post(self, path: str, payload: Any, timeout: float = 30) -> Any:
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
        except urllib.error.HTTPError as e:
            raise PromptRejected(e.code, e.read().decode(errors="replace")) from None
        return json.loads(body) if body else None

    def queue(self, prompt: dict) -> str:
        return str(self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"])

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if hist and prompt_id in hist:
                entry = hist[prompt_id]
                if entry.get("status", {}).get("completed") or entry.get("status", {}).get("status_str") == "error":
                    return dict(entry)
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running a prompt; log:\n{self.log()[-4000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        return self.wait(self.queue(prompt), timeout)

    def output_files(self, entry: dict, kind: str = "output") -> list[Path]:
        """Paths of the images a finished prompt wrote (kind 'output' or 'temp')."""
        # ComfyUI keeps temp files in <--temp-directory>/temp
        base = self.run_dir / "out" if kind == "output" else self.run_dir / "tmp" / "temp"
        files = []
        for node_out in entry.get("outputs", {}).values():
            for img in node_out.get("images", []):
                if img.get("type") == kind:
                    files.append(base / img.get("subfolder", "") / img["filename"])
        return files


class PromptRejected(RuntimeError):
    """POST /prompt answered with an error (validation failed)."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:2000]}")
        self.status = status
        self.body = body


def error_message(entry: dict) -> str | None:
    """The exception message of a failed prompt, from its history entry."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return str(data.get("exception_message"))
    return None
