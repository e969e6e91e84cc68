"""Load (issue #6 item 4): 20 prompts, asynchronous and plain, from two clients, with cancellations.

Why: one ComfyUI server runs the prompts of many users one after another in one process, so anything
the pack leaves behind (patched models, attention hooks, schedules, RNG state, cached tensors) would
show up as a wrong picture in somebody else's prompt, or as memory that grows with every prompt.

What: this module starts a server of its own (so the RSS it measures is of a process it controls and
its cancellations disturb no other test). Every completing load prompt first runs once alone, under
another file prefix, as its reference. Then two clients, each a thread with its own client_id and its
own websocket, queue 10 prompts each (half AsynDMKSampler in several modes, half KSampler, every one
with its own seed and prefix); each client deletes one of its prompts while it is pending and
interrupts one while its sampler runs. The interrupted prompt is long (400 steps) and queued before
the deleted one, and is interrupted only after the delete: so the deleted prompt is surely still
pending when deleted, however fast the machine. Checks:

- every completed prompt executed its sampler (no cache answer) and wrote exactly the pixels of its
  reference (bit-identical: the CPU runs are deterministic for a seed), under its own prefix;
- a deleted prompt never starts (no websocket event, no history entry), an interrupted one ends with
  execution_interrupted at its sampler and writes nothing;
- each client hears about its own prompts only;
- the server's RSS after the run (same settle prompts, after ComfyUI's 10 s garbage collection) is
  within 5% of before.

Figures: one summary line on stdout, and JSON to $ASYNDM_LOAD_REPORT when set. Sizes are tiny
(32x32 pixels, 3 steps): the module takes about 1.5 min on an idle 2-core machine (several times that
when other jobs share the cores; every wait is bounded with room for that).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from PIL import Image

from tests.server.conftest import ComfyServer, running_server
from tests.server.test_server import api_workflow

ASYN = "asyndm_text_to_image.json"
PLAIN = "ksampler_baseline.json"
SIZE = 32
STEPS = 3
LONG_STEPS = 400  # interrupted prompts: far longer than the time it takes to interrupt them
GC_SETTLE_S = 11.0  # ComfyUI's prompt worker runs gc.collect() 10 s after the last prompt
RSS_TOLERANCE = 1.05
CLIENTS = 2
PER_CLIENT = 10
INTERRUPT_AT, DELETE_AT = 2, 5  # job indices in each client's list: the long prompt blocks the deleted one
WAIT_S = 300.0  # one prompt (the shared 2-core machines can be 10x slower than an idle one)
LOAD_TIMEOUT_S = 1200.0  # a client's whole load phase

# asynchronous variants (AsynDMKSampler inputs; "mask" adds a fixed half mask as the schedule)
ASYN_VARIANTS: list[dict[str, Any]] = [
    {"sampler_name": "euler", "scheduler": "normal", "eta": 0.0, "key_words": "rabbit, basketball"},
    {"sampler_name": "ddim", "scheduler": "ddim_uniform", "eta": 1.0, "key_words": "rabbit", "mask_mode": "static"},
    {"sampler_name": "euler", "scheduler": "karras", "eta": 0.0, "mask": True},
    {"sampler_name": "dpmpp_2m", "scheduler": "normal", "eta": 0.0, "key_words": "basketball", "curve": "exp",
     "k": 0.5},
    {"sampler_name": "euler_ancestral", "scheduler": "simple", "eta": 0.0, "key_words": "rabbit", "curve": "lin"},
]
PLAIN_VARIANTS: list[dict[str, Any]] = [
    {"sampler_name": "euler", "scheduler": "normal"},
    {"sampler_name": "ddim", "scheduler": "ddim_uniform"},
    {"sampler_name": "euler_ancestral", "scheduler": "karras"},
    {"sampler_name": "dpmpp_2m", "scheduler": "simple"},
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A server of this module's own: its RSS is measured and its prompts are cancelled."""
    with running_server(Path(tmp_path_factory.mktemp("comfy_load"))) as srv:
        yield srv


# ------------------------------------------------------------------------------------------------
# Prompts


@dataclass
class Job:
    """One load prompt: what it is, what is done to it, and what became of it."""

    client: int
    index: int
    asynchronous: bool
    seed: int
    variant: dict[str, Any]
    action: str  # "run", "delete" or "interrupt"
    prompt_id: str = ""

    @property
    def tag(self) -> str:
        return f"c{self.client}j{self.index}"

    def prompt(self, phase: str) -> dict:
        """The API prompt; `phase` ('ref' or 'load') only changes the SaveImage prefixes."""
        steps = LONG_STEPS if self.action == "interrupt" else STEPS
        return build_prompt(self.asynchronous, self.seed, steps, self.variant, f"{phase}/{self.tag}")


def build_prompt(asynchronous: bool, seed: int, steps: int, variant: dict[str, Any], prefix: str) -> dict:
    """An API prompt from the shipped workflows at SIZE px, with per-node SaveImage prefixes."""
    options = {k: v for k, v in variant.items() if k != "mask"}
    prompt = api_workflow(ASYN if asynchronous else PLAIN, seed=seed, steps=steps, cfg=5.0, **options)
    prompt["4"]["inputs"].update(width=SIZE, height=SIZE, batch_size=1)
    prompt["7"]["inputs"]["filename_prefix"] = f"{prefix}/image"
    if asynchronous:
        prompt["8"]["inputs"]["filename_prefix"] = f"{prefix}/maps"
    if variant.get("mask"):  # left half of the picture is the key object
        prompt["20"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": SIZE, "height": SIZE}}
        prompt["22"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": SIZE // 2, "height": SIZE}}
        prompt["23"] = {"class_type": "MaskComposite", "inputs": {"destination": ["20", 0], "source": ["22", 0],
                                                                  "x": 0, "y": 0, "operation": "add"}}
        prompt["21"] = {"class_type": "AsynDMMaskToTimestepMap", "inputs": {
            "mask": ["23", 0], "k": 0.8, "curve": "bin", "threshold": 0.5, "feather": 0, "preview_steps": 4,
            "mask_batch": "images"}}
        prompt["5"]["inputs"]["schedule"] = ["21", 0]
    return prompt


def make_jobs() -> list[list[Job]]:
    """Per client: 10 jobs alternating asynchronous / plain, one deleted, one interrupted."""
    clients: list[list[Job]] = []
    counters = {True: 0, False: 0}
    for c in range(CLIENTS):
        jobs = []
        for j in range(PER_CLIENT):
            asynchronous = (j + c) % 2 == 0
            variants = ASYN_VARIANTS if asynchronous else PLAIN_VARIANTS
            variant = variants[counters[asynchronous] % len(variants)]
            counters[asynchronous] += 1
            action = "delete" if j == DELETE_AT else "interrupt" if j == INTERRUPT_AT else "run"
            jobs.append(Job(c, j, asynchronous, 5_000 + 100 * c + j, variant, action))
        clients.append(jobs)
    return clients


# ------------------------------------------------------------------------------------------------
# Helpers


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def saved(server: ComfyServer, entry: dict) -> dict[str, Path]:
    """SaveImage node id -> the one file it wrote."""
    out = {}
    for node_id, node_out in entry.get("outputs", {}).items():
        images = [i for i in node_out.get("images", []) if i.get("type") == "output"]
        if images:
            assert len(images) == 1, (node_id, images)
            out[node_id] = server.run_dir / "out" / images[0].get("subfolder", "") / images[0]["filename"]
    return out


def messages(entry: dict, kind: str) -> list[dict]:
    return [data for k, data in entry.get("status", {}).get("messages", []) if k == kind]


def run_ok(server: ComfyServer, prompt: dict) -> dict:
    from comfy_server import error_message

    entry = server.run(prompt, timeout=WAIT_S)
    assert entry["status"]["status_str"] == "success", error_message(entry) or entry["status"]
    return entry


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def settle(server: ComfyServer) -> dict[str, int]:
    """The same asynchronous + plain pair, then ComfyUI's garbage collection; the memory after it."""
    run_ok(server, build_prompt(True, 4_001, STEPS, ASYN_VARIANTS[0], "settle/asyn"))
    run_ok(server, build_prompt(False, 4_002, STEPS, PLAIN_VARIANTS[0], "settle/plain"))
    time.sleep(GC_SETTLE_S)
    assert server.proc is not None and server.proc.poll() is None
    return memory_kib(server.proc.pid)


# ------------------------------------------------------------------------------------------------
# A client: its own client_id and websocket, queueing, deleting and interrupting its own prompts


@dataclass
class Client:
    """One user of the server, run in a thread with an event loop of its own."""

    number: int
    url: str
    jobs: list[Job]
    client_id: str = ""
    events: list[tuple[str, dict]] = field(default_factory=list)
    deleted_while: list[dict] = field(default_factory=list)  # the queue seen before each delete
    error: BaseException | None = None
    deletions_done: bool = False
    reader: asyncio.Task | None = None

    def __post_init__(self) -> None:
        self.client_id = f"asyndm-load-{self.number}-{os.getpid()}"

    def run(self) -> None:
        try:
            asyncio.run(asyncio.wait_for(self._main(), LOAD_TIMEOUT_S))
        except (TimeoutError, asyncio.TimeoutError) as exc:
            left = [job.tag for job in self.jobs if job.action != "delete" and not self._finished(job)]
            what = str(exc) or f"load phase over {LOAD_TIMEOUT_S} s"
            self.error = TimeoutError(f"client {self.number}: {what}; unfinished: {left}")
        except BaseException as exc:  # reported by the test thread
            self.error = exc

    def seen(self, prompt_id: str, kind: str, node: str | None = None) -> bool:
        return any(k == kind and d.get("prompt_id") == prompt_id and (node is None or str(d.get("node")) == node)
                   for k, d in self.events)

    async def _until(self, check: Any, what: str, timeout: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if self.reader is not None and self.reader.done():
                raise ConnectionError(f"the websocket closed while waiting: {what}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} within {timeout} s")
            await asyncio.sleep(0.05)

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                data = json.loads(msg.data)
                self.events.append((data.get("type", ""), data.get("data") or {}))

    async def _queue(self, session: aiohttp.ClientSession, prompt: dict) -> str:
        async with session.post(f"{self.url}/prompt", json={"prompt": prompt, "client_id": self.client_id}) as r:
            body = await r.json()
            assert r.status == 200, body
            return str(body["prompt_id"])

    async def _get_queue(self, session: aiohttp.ClientSession) -> dict:
        async with session.get(f"{self.url}/queue") as r:
            return dict(await r.json())

    async def _delete(self, session: aiohttp.ClientSession, job: Job, blocker: Job) -> None:
        """Delete a pending prompt. It cannot start first: the client's long prompt, queued before it and not
        interrupted before this delete, is still ahead of it (checked)."""
        queue = await self._get_queue(session)
        pending = {item[1] for item in queue["queue_pending"]}
        ahead = pending | {item[1] for item in queue["queue_running"]}
        assert job.prompt_id in pending, f"{job.tag} is not pending: {queue['queue_running']}"
        assert blocker.prompt_id in ahead and not self._finished(blocker), f"{blocker.tag} is not ahead of {job.tag}"
        async with session.post(f"{self.url}/queue", json={"delete": [job.prompt_id]}) as r:
            assert r.status == 200
        self.deleted_while.append({"pending": len(pending), "blocker_running": blocker.prompt_id not in pending})
        queue = await self._get_queue(session)
        listed = {item[1] for item in queue["queue_pending"] + queue["queue_running"]}
        assert job.prompt_id not in listed, "the deleted prompt is still queued"

    async def _interrupt(self, session: aiohttp.ClientSession, job: Job) -> None:
        """Interrupt this prompt (targeted) once the client's deletions are done and its sampler node runs.

        The trigger is the 'executing' event of the sampler, then a step's progress or 1 s: static mask mode
        makes a synchronous pre-pass that reports no progress."""
        await self._until(lambda: self.deletions_done, "deletions not done")
        await self._until(lambda: self.seen(job.prompt_id, "executing", "5"), f"{job.tag} never reached its sampler")
        try:
            await self._until(lambda: self.seen(job.prompt_id, "progress", "5"), "", timeout=1.0)
        except TimeoutError:
            pass
        async with session.post(f"{self.url}/interrupt", json={"prompt_id": job.prompt_id}) as r:
            assert r.status == 200

    def _finished(self, job: Job) -> bool:
        return any(self.seen(job.prompt_id, kind) for kind in
                   ("execution_success", "execution_interrupted", "execution_error"))

    async def _main(self) -> None:
        jitter = random.Random(self.number)
        ws_url = self.url.replace("http://", "ws://") + f"/ws?clientId={self.client_id}"
        async with aiohttp.ClientSession() as session, session.ws_connect(ws_url) as ws:
            self.reader = reader = asyncio.create_task(self._read(ws))
            await self._until(lambda: any(k == "status" for k, _ in self.events), "no websocket status", 30)
            tasks = []
            blocker = next(job for job in self.jobs if job.action == "interrupt")
            deletes_left = sum(job.action == "delete" for job in self.jobs)
            for job in self.jobs:
                await asyncio.sleep(jitter.uniform(0.0, 0.4))
                job.prompt_id = await self._queue(session, job.prompt("load"))
                if job.action == "delete":
                    await self._delete(session, job, blocker)
                    deletes_left -= 1
                elif job.action == "interrupt":
                    tasks.append(asyncio.create_task(self._interrupt(session, job)))
                self.deletions_done = deletes_left == 0
            await asyncio.gather(*tasks)
            for job in self.jobs:
                if job.action != "delete":
                    await self._until(lambda job=job: self._finished(job), f"{job.tag} did not finish")
            await asyncio.sleep(0.5)  # late events of a deleted prompt, were there any
            self.reader = None  # closing on purpose
            await ws.close()
            await reader


# ------------------------------------------------------------------------------------------------
# The test


def test_load_two_clients_with_cancellations(server: ComfyServer) -> None:
    clients_jobs = make_jobs()
    jobs = [job for client_jobs in clients_jobs for job in client_jobs]
    completing = [job for job in jobs if job.action == "run"]
    assert (len(jobs), len(completing)) == (20, 16)
    assert sum(job.asynchronous for job in jobs) == 10

    # warm-up (loads the model), then the references, each alone
    started = time.monotonic()
    run_ok(server, build_prompt(True, 4_003, STEPS, ASYN_VARIANTS[2], "warm/asyn"))
    run_ok(server, build_prompt(False, 4_004, STEPS, PLAIN_VARIANTS[0], "warm/plain"))
    references: dict[str, dict[str, np.ndarray]] = {}
    for job in completing:
        entry = run_ok(server, job.prompt("ref"))
        references[job.tag] = {node: pixels(path) for node, path in saved(server, entry).items()}
        assert set(references[job.tag]) == ({"7", "8"} if job.asynchronous else {"7"}), job.tag
    pictures = [refs["7"].tobytes() for refs in references.values()]
    assert len(set(pictures)) == len(pictures), "two references are the same picture: a swap would go unseen"
    reference_s = time.monotonic() - started

    before = settle(server)
    assert server.proc is not None
    load_started = time.monotonic()
    clients = [Client(c, server.url, clients_jobs[c]) for c in range(CLIENTS)]
    threads = [threading.Thread(target=client.run, name=f"load-client-{client.number}") for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(LOAD_TIMEOUT_S + 30)
        assert not thread.is_alive(), f"{thread.name} did not end"
    for client in clients:
        if client.error is not None:
            raise AssertionError(f"client {client.number} failed; server log:\n{server.log()[-3000:]}") \
                from client.error
    queue = server.get("/queue")
    assert not queue["queue_running"] and not queue["queue_pending"], queue
    load_s = time.monotonic() - load_started
    after = settle(server)

    # each client heard about its own prompts only (execution_interrupted is broadcast to all)
    ids = {job.prompt_id: job for job in jobs}
    for client in clients:
        own = {job.prompt_id for job in client.jobs}
        heard = {d.get("prompt_id") for k, d in client.events if k in ("executing", "executed", "progress",
                                                                         "execution_start", "execution_success")}
        heard.discard(None)
        assert heard <= own, f"client {client.number} got events of {[ids[i].tag for i in heard - own if i in ids]}"

    history = server.get("/history?max_items=10000")
    for job in jobs:
        events = [k for client in clients for k, d in client.events if d.get("prompt_id") == job.prompt_id]
        if job.action == "delete":
            assert job.prompt_id not in history, f"deleted {job.tag} ran"
            assert not events, f"deleted {job.tag} has events {events}"
            continue
        entry = server.wait(job.prompt_id, timeout=30)
        if job.action == "interrupt":
            assert entry["status"]["status_str"] == "error", (job.tag, entry["status"])
            stops = messages(entry, "execution_interrupted")
            assert stops and str(stops[0]["node_id"]) == "5", (job.tag, entry["status"]["messages"])
            assert not saved(server, entry), f"interrupted {job.tag} wrote images"
            continue
        assert entry["status"]["status_str"] == "success", (job.tag, entry["status"])
        cached = {str(n) for m in messages(entry, "execution_cached") for n in m.get("nodes", [])}
        assert "5" not in cached, f"{job.tag}: the sampler answered from the cache, nothing was tested"
        files = saved(server, entry)
        assert set(files) == set(references[job.tag]), (job.tag, files)
        for node, path in files.items():
            assert path.relative_to(server.run_dir / "out").parts[:2] == ("load", job.tag), path
            assert np.array_equal(pixels(path), references[job.tag][node]), \
                f"{job.tag} ({'asynchronous' if job.asynchronous else 'plain'} {job.variant}) node {node} " \
                f"differs from its reference under load"

    ratio = after["VmRSS"] / before["VmRSS"]
    report = {
        "prompts": len(jobs), "asynchronous": sum(j.asynchronous for j in jobs),
        "completed": len(completing), "deleted": sum(j.action == "delete" for j in jobs),
        "interrupted": sum(j.action == "interrupt" for j in jobs), "clients": CLIENTS,
        "size_px": SIZE, "steps": STEPS, "reference_s": round(reference_s, 1), "load_wall_s": round(load_s, 1),
        "rss_before_mib": round(before["VmRSS"] / 1024, 1), "rss_after_mib": round(after["VmRSS"] / 1024, 1),
        "rss_ratio": round(ratio, 4), "peak_rss_before_mib": round(before["VmHWM"] / 1024, 1),
        "peak_rss_after_mib": round(after["VmHWM"] / 1024, 1),
        "deleted_while": [d for c in clients for d in c.deleted_while],
    }
    print("\nload: " + ", ".join(f"{k}={v}" for k, v in report.items()))
    if os.environ.get("ASYNDM_LOAD_REPORT"):
        Path(os.environ["ASYNDM_LOAD_REPORT"]).write_text(json.dumps(report, indent=2) + "\n")
    assert ratio <= RSS_TOLERANCE, f"RSS grew from {before['VmRSS']} to {after['VmRSS']} KiB ({ratio:.3f})"
