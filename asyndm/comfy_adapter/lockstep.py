"""Route (c) of issue 17: lock-step instances of ComfyUI's own sampler, one per pixel track.

Every distinct track (a scalar sigma sequence, see track_model.TrackSet) gets one genuine run of
the chosen ComfyUI sampler function on that track's sigmas, in its own thread. The sampler
functions never see anything unusual: scalar sigmas, a latent of the usual shape, their own noise
sampler on the run's seed. What they call as "the model" is a proxy that posts its request and
blocks. When every instance has posted, the main thread composes one model input (each pixel from
its own track's instance), calls ComfyUI's guider ONCE with the per-pixel sigma map, and hands the
same denoised tensor to every instance. The result takes each pixel from its track's instance.

Instances run one at a time, in track order, between two model calls (the main thread resumes
one and waits until it blocks again), so the run is deterministic: draws from torch's global RNG,
progress callbacks and the shared Brownian tree are used in a fixed order, and no two instances
run Python at once. Lock step is checked: at every rendezvous either all instances ask for a model
call or all have returned; anything else is an error naming the sampler (DPM-Solver fast and
adaptive, which make their own steps, are refused by name before any call). Exceptions raised in
an instance, in the model call or in the progress callback (ComfyUI's interrupt) abort every
instance (their pending proxy call raises) and are re-raised in the caller.

- A track that holds still at its start (key pixels waiting at the model's largest sigma, which
  most schedulers give) is run on sigmas[m:] from the carrier's step m: until then its pixels are
  fed to the model as they are, and its instance joins the call that begins step m.
- Noise: the SDE samplers get one Brownian tree on the union of the tracks' intervals (every pixel
  reads the same path over its own interval); the others share ComfyUI's seeded default draws per
  model call (every pixel gets the same draw at the same step, late tracks included).
- CFG++ samplers keep their own post-CFG function: every instance's is chained into the one call.
- Dynamic masks: `retrack` may re-partition the pixels at any rendezvous, once that rendezvous'
  model call is queued (the change reaches only later sigmas); a pixel whose sequence changed moves
  to an instance of its new sequence, replayed from the recorded model outputs and checked to ask
  exactly what the pixel's old instance asked (else LockstepError: the change reached a sigma the
  sampler had already used), and answered with that call's output.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from types import MappingProxyType
from typing import Any, Protocol

import comfy.k_diffusion.sampling as kdiff
import comfy.samplers
import torch

from .model_wrapper import CallTable
from .thread_state import ThreadState
from .track_model import TrackSet

__all__ = ["LockstepError", "BROWNIAN_SAMPLERS", "REFUSED", "refusal", "run_lockstep"]

# What the run calls as the model: (x, sigma map or None, carrier sigma, model_options, seed) -> denoised.
PixelModel = Callable[..., torch.Tensor]
# A track set's starting latent (each pixel's noise scaled to its own first sigma).
StartLatent = Callable[[TrackSet], torch.Tensor]

# Sampler functions that build a BrownianTreeNoiseSampler on (min positive sigma, max sigma) of the
# sigmas they are given. Each instance would build its own tree on its own track's interval (a
# different Brownian path per track); instead every instance gets one tree on the union interval.
BROWNIAN_SAMPLERS = MappingProxyType({
    "sample_dpmpp_sde": True, "sample_dpmpp_sde_gpu": False,
    "sample_dpmpp_2m_sde": True, "sample_dpmpp_2m_sde_gpu": False,
    "sample_dpmpp_2m_sde_heun": True, "sample_dpmpp_2m_sde_heun_gpu": False,
    "sample_dpmpp_3m_sde": True, "sample_dpmpp_3m_sde_gpu": False,
})  # function name -> the tree lives on the CPU


# Samplers that do not step along the SIGMAS they are given, refused by name (function name -> why).
_FAST = ("DPM-Solver fast builds its own steps between the first and last sigma, so a track's sigmas "
         "(and its waiting steps) cannot be followed")
_ADAPTIVE = ("DPM-Solver adaptive chooses its steps with an error controller on the whole latent, so pixels "
             "on different tracks would need different numbers of model calls")
REFUSED = MappingProxyType({"dpm_fast_function": _FAST, "sample_dpm_fast": _FAST,
                            "dpm_adaptive_function": _ADAPTIVE, "sample_dpm_adaptive": _ADAPTIVE})


_PECE = ("SA-Solver PECE makes no corrector call on a run's first step, so a track whose key pixels wait at "
         "the start (most schedulers; not ddim_uniform) would make a different number of model calls")


def refusal(function: Callable, tracks: TrackSet) -> str | None:
    """Why this sampler function cannot run these tracks in lock step (None: it can)."""
    name = getattr(function, "__name__", "")
    if tracks.count < 2:
        return None
    why = REFUSED.get(name)
    if why is None and name == "sample_sa_solver_pece" and any(tracks.holds):
        why = _PECE
    return why


CARRIER_HOLDS = "the carrier (background) sigmas hold still at the start: a sigma repeats in the SIGMAS"


class LockstepError(RuntimeError):
    """The instances stopped agreeing on the number of model calls."""


class _Abort(BaseException):
    """Raised inside an instance's pending model call to unwind it (not an Exception: samplers that
    catch Exception must not swallow it)."""


_ABORT = object()


class _Instance:
    """One run of a sampler function on one track, in a thread that blocks at every model call."""

    def __init__(self, track: int, run: Callable[[Any], torch.Tensor], state: ThreadState) -> None:
        self.track = track
        self._run = run
        self._state = state
        self._go = threading.Semaphore(0)
        self._posted = threading.Semaphore(0)
        self._reply: Any = None
        self.request: tuple[torch.Tensor, torch.Tensor, dict] | None = None
        self.result: torch.Tensor | None = None
        self.error: BaseException | None = None
        self.done = False
        self.calls = 0
        self.call_offset = 0  # the index of the run's model call that answered this instance's first call
        self.replay: list[torch.Tensor] = []  # recorded answers to its first calls (a re-partition)
        self.host_row: tuple[float, ...] = ()  # its track's sigmas, as host numbers
        self.run_sigmas: torch.Tensor | None = None
        self.on_replay: Callable[[int, dict], None] | None = None
        self.callbacks: list[dict] = []
        self._thread = threading.Thread(target=self._main, name=f"asyndm-lockstep-{track}", daemon=True)

    # ----------------------------------------------------------------- inside the instance's thread
    def _main(self) -> None:
        self._go.acquire()
        try:
            # torch's modes, autocast and CUDA stream are thread-local: take the caller's (ComfyUI samples
            # under inference_mode; uni_pc writes into its sigmas in place, which needs the same mode)
            with self._state.entered():
                self.result = self._run(self)
        except _Abort:
            pass
        except BaseException as exc:  # noqa: B036 - handed to the main thread, which re-raises it
            self.error = exc
        finally:
            self.done = True
            self.request = None
            self._posted.release()

    def model(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """What the sampler function calls as its model: post the request, wait for the answer."""
        if self.calls < len(self.replay):
            if self.on_replay is not None:
                self.on_replay(self.call_offset + self.calls, kwargs)
            self.calls += 1
            return self.replay[self.calls - 1].clone()
        self.request = (x, sigma, kwargs)
        self._posted.release()
        self._go.acquire()
        reply, self._reply = self._reply, None
        if reply is _ABORT:
            raise _Abort()
        self.calls += 1
        return reply

    # ----------------------------------------------------------------- from the main thread
    def start(self) -> None:
        self._thread.start()
        self._go.release()
        self._posted.acquire()

    def resume(self, reply: Any) -> None:
        """Answer the pending model call and wait until the instance blocks again (or returns)."""
        self._reply = reply
        self.request = None
        self._go.release()
        self._posted.acquire()

    def join(self) -> None:
        self._thread.join()


class _ModelProxy:
    """The object a sampler function receives as `model`: calls go to its instance; attribute
    reads (model.inner_model.inner_model.model_sampling, model.inner_model.model_patcher) reach
    ComfyUI's guider as they do through KSamplerX0Inpaint."""

    def __init__(self, instance: _Instance, model_wrap: Any, sigmas: torch.Tensor) -> None:
        self._instance = instance
        self.inner_model = model_wrap
        self.sigmas = sigmas

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self._instance.model(x, sigma, **kwargs)


def _own_post_cfg(options: dict, guider_fns: list[Callable]) -> list[Callable]:
    """The post-CFG functions a sampler added to its copy of the options (CFG++: a closure that
    keeps uncond_denoised), i.e. all but the guider's own."""
    return [fn for fn in options.get("sampler_post_cfg_function", []) if all(fn is not g for g in guider_fns)]


def _merged_model_options(requests: list[dict], guider_fns: list[Callable],
                          record: Callable[[dict], None] | None = None) -> dict:
    """One model_options for the single call. The CFG++ samplers each add their own post-CFG
    function: the guider's functions run first, then every instance's own functions, each passing
    the denoised tensor through unchanged, then `record` (which keeps the arguments, for instances
    that join later). Without such functions: the first request's options as they are."""
    first = requests[0].get("model_options", {})
    own: list[Callable] = []
    for kw in requests:
        own += [fn for fn in _own_post_cfg(kw.get("model_options", {}), guider_fns) if all(fn is not o for o in own)]
    if not own:
        return first

    def passthrough(fn: Callable) -> Callable:
        def run(args: dict) -> torch.Tensor:
            fn(args)
            return args["denoised"]
        return run

    merged = dict(first)
    merged["sampler_post_cfg_function"] = list(guider_fns) + [passthrough(fn) for fn in own]
    if record is not None:
        merged["sampler_post_cfg_function"].append(passthrough(record))
    return merged


def _compose(tracks: TrackSet, parts: list[torch.Tensor]) -> torch.Tensor:
    """Each pixel from its own track's tensor."""
    out = parts[0]
    for j in range(1, len(parts)):
        out = torch.where(tracks.mask(j), parts[j], out)
    return out


def _shared_noise_sampler(fn: Callable, tracks: TrackSet, x: torch.Tensor, seed: int | None) -> Any:
    """One Brownian tree on the union of the tracks' intervals, for the SDE samplers (else None)."""
    cpu = BROWNIAN_SAMPLERS.get(getattr(fn, "__name__", ""))
    if cpu is None:
        return None
    values = [v for row in tracks.rows for v in row]  # host numbers: no read of the device's sigmas
    return kdiff.BrownianTreeNoiseSampler(x, min(v for v in values if v > 0), max(values), seed=seed, cpu=cpu)


class _SharedGaussian:
    """ComfyUI's default noise sampler (seeded full-size Gaussian draws), shared by the instances
    and indexed by model call: the k-th draw an instance makes after its answer to call r is the
    same tensor for every instance (drawn once, in the order first asked for). Without late starts
    this is exactly what each instance's own default sampler on the seed gives; a track that starts
    at step m still gets step m's draws, and an instance replayed after a re-partition gets the
    draws it had before."""

    def __init__(self, x: torch.Tensor, seed: int | None) -> None:
        self._draw = kdiff.default_noise_sampler(x, seed=seed)
        self._rounds: dict[int, list[torch.Tensor]] = {}
        self._used: dict[int, tuple[int, int]] = {}  # id(instance) -> (round, draws made in it)

    def for_instance(self, inst: _Instance) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        def sample(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
            rnd = inst.call_offset + inst.calls
            last, k = self._used.get(id(inst), (rnd, 0))
            if last != rnd:
                k = 0
            draws = self._rounds.setdefault(rnd, [])
            while len(draws) <= k:
                draws.append(self._draw(sigma, sigma_next))
            self._used[id(inst)] = (rnd, k + 1)
            return draws[k]

        return sample


class Retrack(Protocol):
    """Re-partitions the pixels during a run (dynamic masks): `begin(step)` at a rendezvous, `step` being
    the carrier steps begun so far, starts reading what decides the new tracks (None: nothing to read);
    `finish(reading, tracks)`, called once the rendezvous' model call is queued, returns the new tracks
    (every pixel's whole sequence, past and predicted future) or None when nothing changed."""

    def begin(self, step: int) -> Any: ...

    def finish(self, reading: Any, tracks: TrackSet) -> TrackSet | None: ...


class _LockstepRun:
    """The state of one lock-step run (see the module doc). `retrack` (optional, see Retrack) is asked
    at every rendezvous; it may return new tracks once the rendezvous' call is queued. A pixel whose
    sequence changed moves to an instance of its new sequence: an existing one, or a new instance that
    is replayed from the recorded model outputs (no model call) up to the call just made and checked
    to ask exactly what the pixel's old instance asked in it; the check fails (LockstepError) when the
    change reaches a sigma the sampler already used."""

    def __init__(self, sampler: comfy.samplers.KSAMPLER, model_wrap: Any, tracks: TrackSet, extra_args: dict,
                 callback: Callable | None, start: StartLatent, disable_pbar: bool,
                 pixel_model: PixelModel, retrack: Retrack | None) -> None:
        self.fn = sampler.sampler_function
        self.name = getattr(self.fn, "__name__", str(self.fn))
        self.model_wrap = model_wrap
        self.extra_args = extra_args
        self.callback = callback
        self.start = start
        self.disable_pbar = disable_pbar
        self.pixel_model = pixel_model
        self.retrack = retrack
        self.options = dict(sampler.extra_options)
        self.tracks = tracks
        self.x0 = start(tracks)
        self.seed = extra_args.get("seed")
        self.gaussian: _SharedGaussian | None = None
        if "noise_sampler" in inspect.signature(self.fn).parameters and self.options.get("noise_sampler") is None:
            shared = _shared_noise_sampler(self.fn, tracks, self.x0, self.seed)
            if shared is not None:
                self.options["noise_sampler"] = shared
            else:
                self.gaussian = _SharedGaussian(self.x0, self.seed)
        self.total = tracks.sigmas.shape[1] - 1
        self.thread_state = ThreadState.capture()
        self.guider_post_cfg = list(extra_args.get("model_options", {}).get("sampler_post_cfg_function", []))
        self.post_cfg_args: dict[int, dict] = {}  # call -> the post-CFG arguments (CFG++ side channel)
        self.outputs: list[torch.Tensor] = []  # every model call's answer, for replays (when retracking)
        self.step_call: list[int] = []  # step i of the carrier began with call step_call[i]
        self.all_instances: list[_Instance] = []
        self.instances: list[_Instance | None] = []  # one per track of self.tracks (None: not started)
        self.starts: list[int] = []
        self.reported = 0
        # Any deferred lock-step check failed: a device flag, read once after the loop (for every run of
        # several tracks, so that a run's host reads do not depend on whether a track joined late).
        self.failed: torch.Tensor | None = None
        if tracks.count > 1:
            self.failed = torch.zeros((), dtype=torch.bool, device=tracks.sigmas.device)
        self.failure_messages: list[tuple[torch.Tensor, str]] = []
        self._assign(tracks)

    # ------------------------------------------------------------------------------------ instances
    def _new_instance(self, j: int, sigmas: torch.Tensor, start: int) -> _Instance:
        sig = sigmas[start:].clone()
        args = dict(self.extra_args)  # the CFG++ samplers replace args["model_options"] in the dict they get
        args["denoise_mask"] = None  # inpainting is done once, on the composed call
        opts = dict(self.options)
        first = not self.all_instances

        def run(inst: _Instance) -> torch.Tensor:
            if self.gaussian is not None:
                opts["noise_sampler"] = self.gaussian.for_instance(inst)
            proxy = _ModelProxy(inst, self.model_wrap, sig)
            return self.fn(proxy, self.x0.clone() if not first else self.x0, sig, extra_args=args,
                           callback=inst.callbacks.append, disable=self.disable_pbar if first else True, **opts)

        inst = _Instance(j, run, self.thread_state)
        inst.host_row = self.tracks.rows[j]
        inst.run_sigmas = sig  # what the sampler function gets (UniPC writes its last sigma in place)
        inst.on_replay = self._replay_side_channel
        self.all_instances.append(inst)
        return inst

    def _assign(self, tracks: TrackSet) -> None:
        """Instances for `tracks`: keep those whose sequence is unchanged, make the others."""
        old = [(inst.host_row, inst) for inst in self.instances if inst is not None]
        old_tracks, old_instances = self.tracks, list(self.instances)
        self.tracks = tracks
        self.x0 = self.start(tracks) if old else self.x0
        self.starts = list(tracks.holds)
        if self.starts[0]:
            raise ValueError(CARRIER_HOLDS)
        self.hold_sigma = tracks.sigmas[:, 0]
        begun = len(self.step_call)
        self.instances = []
        pending: tuple[torch.Tensor, torch.Tensor] | None = None  # what the old instances ask next, per pixel
        for j in range(tracks.count):
            keep = next((inst for row, inst in old if row == tracks.rows[j]
                         and all(inst is not other for other in self.instances)), None)
            if keep is not None:
                keep.track = j
                self.instances.append(keep)
                continue
            m = self.starts[j]
            if m >= begun and (old or m > 0):
                self.instances.append(None)  # starts when the carrier begins step m
                continue
            inst = self._new_instance(j, tracks.sigmas[j], m)
            self.instances.append(inst)
            if not old:  # the first assignment: starts with the run
                continue
            # a new sequence in the middle of the run (after the rendezvous' call was made, outputs[-1]): replay
            # the calls since its step m began up to that one, which it then asks as the old instances do
            first_call = self.step_call[m]
            inst.call_offset = first_call
            inst.replay = self.outputs[first_call:-1]
            inst.start()
            if pending is None:
                pending = self._pending(old_tracks, old_instances)
            self._expect_request(inst, j, *pending, message=(
                f"{self.name}: the new timestep track of some pixels changes a sigma the sampler has already used, "
                "so their run cannot be continued on it"))
            assert inst.request is not None
            self._replay_side_channel(len(self.outputs) - 1, inst.request[2])  # the call it joins, made already
        kept = {id(inst) for inst in self.instances if inst is not None}
        for inst in old_instances:
            if inst is not None and id(inst) not in kept and not inst.done:
                inst.resume(_ABORT)
                inst.join()

    def _replay_side_channel(self, call: int, kwargs: dict) -> None:
        """An instance answered from a recorded call: its own post-CFG functions see that call's arguments."""
        args = self.post_cfg_args.get(call)
        if args is None:
            return
        for fn in _own_post_cfg(kwargs.get("model_options", {}), self.guider_post_cfg):
            fn(args)

    def _defer_check(self, flags: list[torch.Tensor], message: str) -> None:
        """A lock-step check whose failure flags stay on the device until the run ends (read once there,
        so that joining and re-partitioning never stall the launch queue): any True raises LockstepError."""
        flag = torch.stack(flags).any()
        self.failed = flag if self.failed is None else self.failed | flag
        self.failure_messages.append((flag, message))

    def _raise_failed_checks(self) -> None:
        if self.failed is None or not bool(self.failed):
            return
        for flag, message in self.failure_messages:
            if bool(flag):
                raise LockstepError(message)

    def _pending(self, old_tracks: TrackSet, old_instances: list) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, sigma map): what every pixel's old instance asks in its pending model call (waiting tracks:
        the start latent at their first sigma), composed once per re-partition."""
        xs, sigmas = [], []
        batch = self.x0.shape[0]
        for k, old in enumerate(old_instances):
            if old is None or old.request is None:
                xs.append(self.x0)
                sigmas.append(old_tracks.sigmas[k, 0].expand(batch))
            else:
                xs.append(old.request[0])
                sigmas.append(old.request[1].reshape(-1).expand(batch))
        return _compose(old_tracks, xs), torch.cat(sigmas)[old_tracks.call_index][:, None]

    def _expect_request(self, inst: _Instance, j: int, want_x: torch.Tensor, want_sigma: torch.Tensor,
                        message: str) -> None:
        """A new instance's pending call must ask, on track j's pixels, exactly want_x at want_sigma (a
        per-pixel map, or one value), with one sigma for every row: checked on the device (deferred)."""
        if inst.error is not None:
            raise inst.error
        req = inst.request
        if req is None:
            raise LockstepError(message)
        mine = self.tracks.mask(j)
        sigma = req[1].flatten()[0]
        self._defer_check([(req[1] != sigma).any(), (mine & (req[0] != want_x)).any(),
                           (mine & (want_sigma != sigma.to(want_sigma.dtype))).any()], message)

    def _start_waiting(self, new_steps: list[int], out: torch.Tensor, x_in: torch.Tensor) -> None:
        """Tracks whose hold ends at a step the carrier just began join the call just made."""
        for j, inst in enumerate(self.instances):
            if inst is not None or self.starts[j] not in new_steps:
                continue
            inst = self._new_instance(j, self.tracks.sigmas[j], self.starts[j])
            self.instances[j] = inst
            inst.call_offset = len(self.outputs) - 1
            inst.start()
            self._expect_request(inst, j, x_in, self.hold_sigma[j], (
                f"{self.name}: track {j} could not join at step {self.starts[j]} (its first model call differs from the "
                "waiting pixels')"))
            assert inst.request is not None
            self._replay_side_channel(len(self.outputs) - 1, inst.request[2])
            inst.resume(out.clone())

    # ------------------------------------------------------------------------------------ progress
    def _report(self, step: int, last_out: torch.Tensor) -> None:
        """One progress report per carrier step: tracks not started yet show their waiting pixels."""
        if self.callback is None:
            return
        xs, ds = [], []
        for j, inst in enumerate(self.instances):
            local = step - self.starts[j]
            if inst is not None and 0 <= local < len(inst.callbacks):
                xs.append(inst.callbacks[local]["x"])
                ds.append(inst.callbacks[local]["denoised"])
            else:
                xs.append(self.x0)
                ds.append(last_out)
        self.callback(step, _compose(self.tracks, ds), _compose(self.tracks, xs), self.total)

    # ------------------------------------------------------------------------------------ the run
    def run(self) -> torch.Tensor:
        try:
            for inst in self.instances:
                if inst is not None:
                    inst.start()
            try:
                samples = self._loop()
            except Exception:
                self._raise_failed_checks()  # the first failed check explains what followed it
                raise
            self._raise_failed_checks()
            return samples
        finally:
            for inst in self.all_instances:
                if inst._thread.is_alive() and not inst.done:
                    inst.resume(_ABORT)
                if inst._thread.ident is not None:
                    inst.join()

    def _loop(self) -> torch.Tensor:
        carrier_inst = self.instances[0]
        assert carrier_inst is not None
        while True:
            for inst in self.instances:
                if inst is not None and inst.error is not None:
                    raise inst.error
            live = [inst for inst in self.instances if inst is not None]
            if all(inst.done for inst in live):
                if len(live) != len(self.instances):
                    raise LockstepError(f"{self.name}: a track never started (it holds to the end)")
                break
            if len([inst for inst in live if inst.request is not None]) != len(live):
                calls = {inst.track: inst.calls for inst in live}
                raise LockstepError(
                    f"{self.name}: the tracks' runs no longer make the same model calls (calls answered per track: "
                    f"{calls}; some returned while others asked for another call): this sampler's number of "
                    "model evaluations depends on the sigma values"
                )
            # A re-partition changes sigmas from the step after this call's on: the call is queued on the
            # current tracks first, so that the read which decides the new ones lands while it runs.
            reading = self.retrack.begin(len(self.step_call)) if self.retrack is not None else None
            out, x_in = self._call(live)
            if reading is not None:
                assert self.retrack is not None
                new = self.retrack.finish(reading, self.tracks)
                if new is not None:
                    self._assign(new)
                    live = [inst for inst in self.instances if inst is not None]
            before = len(carrier_inst.callbacks)
            for n, inst in enumerate(live):
                last = n == len(live) - 1 and len(live) == len(self.instances) and self.retrack is None
                inst.resume(out if last else out.clone())
            new_steps = [cb["i"] for cb in carrier_inst.callbacks[before:]]
            self.step_call += [len(self.outputs) - 1] * len(new_steps)
            self._start_waiting(new_steps, out, x_in)
            while self.reported < len(carrier_inst.callbacks):
                self._report(self.reported, out)
                self.reported += 1
        results = [inst.result for inst in self.instances]  # type: ignore[union-attr]
        carrier = self.instances[0]
        assert carrier is not None and carrier.run_sigmas is not None
        self.final_sigma = carrier.run_sigmas[-1]
        return _compose(self.tracks, results)  # type: ignore[arg-type]

    def _call(self, live: list[_Instance]) -> tuple[torch.Tensor, torch.Tensor]:
        """ONE model call: each pixel from its own track's request; waiting tracks at their first sigma."""
        carrier_req = self.instances[0].request  # type: ignore[union-attr]
        assert carrier_req is not None
        xs, sigmas_now = [], []
        for j, inst in enumerate(self.instances):
            if inst is not None:
                assert inst.request is not None
                xs.append(inst.request[0])
                sigmas_now.append(inst.request[1])
            else:
                xs.append(self.x0)
                sigmas_now.append(self.hold_sigma[j].expand_as(carrier_req[1]))
        x_in = _compose(self.tracks, xs)
        kwargs = [inst.request[2] for inst in live]  # type: ignore[index]
        table = None
        if self.tracks.count == 1:
            sigma_map = None
        else:
            values = torch.cat(sigmas_now).to(x_in.dtype)  # (U * B,): track-major, one sigma per track and image
            index = self.tracks.call_index
            sigma_map = values[index][:, None]
            table = CallTable(values, index)
        call = len(self.outputs)
        joins = self.retrack is not None or any(inst is None for inst in self.instances)

        def record(args: dict) -> None:
            self.post_cfg_args = {call: dict(args)} if self.retrack is None else {**self.post_cfg_args, call: dict(args)}

        options = _merged_model_options(kwargs, self.guider_post_cfg, record if joins else None)
        out = self.pixel_model(x_in, sigma_map, sigmas_now[0], options, seed=kwargs[0].get("seed"), table=table)
        if self.retrack is not None:
            self.outputs.append(out.clone())
        else:
            self.outputs.append(out[:0])  # only the count is needed without re-partitions
        return out, x_in


def run_lockstep(sampler: comfy.samplers.KSAMPLER, model_wrap: Any, tracks: TrackSet, extra_args: dict,
                 callback: Callable | None, start: StartLatent, disable_pbar: bool, pixel_model: PixelModel,
                 retrack: Retrack | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `sampler` (a KSAMPLER: function + options) once per track, in lock step. Returns the composed
    latent in the sampler's own scaling and the background's last sigma as its run left it (KSAMPLER
    un-scales with that: UniPC sets a last sigma of 0 to 0.001 in place)."""
    run = _LockstepRun(sampler, model_wrap, tracks, extra_args, callback, start, disable_pbar, pixel_model, retrack)
    samples = run.run()
    return samples, run.final_sigma
