"""`neuralpatch serve`: a local web page to paint a hole over a photo and watch the fill grow.

FastAPI serves one static page (``neuralpatch/web/``) whose brush is an HTML canvas; the page
posts the image and its painted mask, and reads the run back as a stream of JSON lines:
its place in the queue, progress per scale and iteration, each scale's result as it
finishes, and the result and mask as PNG bytes encoded here (so a download is bit for bit
what the pipeline wrote). One worker thread runs one :func:`neuralpatch.inpaint` at a time;
a run whose browser goes away is cancelled through the pipeline's callback.

Uploaded bytes are decoded in memory with Pillow. No path sent by a client is ever opened.
"""

import asyncio
import base64
import io
import ipaddress
import json
import math
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib.resources import files

import numpy as np
import torch
from fastapi import FastAPI, File, Form, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.datastructures import UploadFile as StarletteUpload

from neuralpatch.synthesis import PRESETS, InpaintConfig, Progress, inpaint, pyramid_sizes, resolve_device

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "BadUpload", "Runner", "create_app", "host_warning", "serve"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_PRESET = "fast"
# Seconds per unit of work (one L-BFGS iteration over one pixel of a scale's optimised crop) before
# this server has timed a run of its own, measured with the `fast` preset on a 2-core CPU: 8.6 us on
# a 192x128 photo with a 130x12 stroke (0.62 M units, 5.3 s), 13 us on the demo's mast (1.63 M units,
# 21.4 s). The midpoint:
REFERENCE_SECONDS_PER_UNIT = {"cpu": 1e-5}
# Fixed cost of a run (PatchMatch start, first VGG pass), seconds on the same CPU.
REFERENCE_OVERHEAD_S = 0.5
# The pipeline optimises each scale's hole bounding box plus VGG's receptive-field margin and one
# patch (relu4_1 of VGG-16: 26 + 2 * 8 pixels); the estimate uses the same crop.
CROP_MARGIN = 42
# intermediate scales are sent for display only; past this long side they are sent shrunk
PREVIEW_SIDE = 1536
HEARTBEAT_S = 0.5
# a run whose stream has not been read for this long is cancelled, even if no disconnect was seen
STALE_S = 30.0


class BadUpload(ValueError):
    """An upload the page reports to its user; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Cancelled(Exception):
    """Raised from the pipeline's callback when the browser that asked for a run has gone."""


def host_warning(host: str) -> str | None:
    """The warning to print when ``host`` is not a loopback address (None when it is)."""
    if host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host.strip("[]")).is_loopback:
            return None
    except ValueError:
        pass  # a host name: it may resolve to anything
    return (
        f"warning: serving on {host}: the page is then reachable from the network, and anyone who can "
        "reach it can upload images and run the pipeline on this machine. Use --host 127.0.0.1 to keep it local."
    )


# --------------------------------------------------------------------------- #
# decoding uploads (bytes only, never paths)
# --------------------------------------------------------------------------- #


def decode_upload(data: bytes, max_pixels: int, what: str = "image") -> Image.Image:
    """Bytes of an uploaded file -> a fully decoded Pillow image, or :class:`BadUpload` saying why not.

    The size is checked from the header, before any pixel is decoded."""
    if not data:
        raise BadUpload(f"{what}: the file is empty")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise BadUpload(f"{what}: the file declares more pixels than Pillow decodes safely ({exc})", 413) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadUpload(f"{what}: this is not an image file that can be read (PNG, JPEG, WebP, TIFF, BMP, GIF ...)") from exc
    width, height = img.size
    if width * height > max_pixels:
        raise BadUpload(
            f"{what}: {width}x{height} = {width * height:,} pixels is over this server's limit of {max_pixels:,} "
            f"(start it with --max-pixels {width * height} if the memory is there)",
            413,
        )
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadUpload(f"{what}: the {img.format or 'image'} file is corrupt or truncated and cannot be decoded ({exc})") from exc
    return img


def image_from_upload(data: bytes, max_pixels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(3, H, W) float32 RGB in [0, 1], and the hole of a transparent area or None."""
    from neuralpatch.io import read_image

    try:
        return read_image(decode_upload(data, max_pixels))
    except BadUpload:
        raise
    except ValueError as exc:
        raise BadUpload(f"image: {exc}") from exc


def mask_from_upload(data: bytes, size: tuple[int, int], max_pixels: int) -> torch.Tensor:
    """The hole painted on the page: an image with alpha (opaque = hole) or a grey mask (white = hole),
    as (H, W) bool of ``size``."""
    from neuralpatch.io import read_mask

    img = decode_upload(data, max_pixels, "mask")
    if (img.height, img.width) != tuple(size):
        raise BadUpload(f"mask: {img.width}x{img.height} does not match the image's {size[1]}x{size[0]}")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        return torch.from_numpy(np.asarray(img.convert("RGBA").getchannel("A")) >= 128)
    return read_mask(img)


def png_bytes(image: torch.Tensor | np.ndarray) -> bytes:
    """(3, H, W) float in [0, 1] (via :func:`neuralpatch.io.to_pil`) or an (H, W) bool mask -> PNG bytes."""
    from neuralpatch.io import to_pil

    if isinstance(image, np.ndarray):
        pil = Image.fromarray(image.astype(np.uint8) * 255, mode="L")
    else:
        pil = to_pil(image)
    out = io.BytesIO()
    pil.save(out, format="PNG")
    return out.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --------------------------------------------------------------------------- #
# time estimate
# --------------------------------------------------------------------------- #


def work_units(height: int, width: int, box: tuple[int, int, int, int] | None, config: InpaintConfig) -> float:
    """L-BFGS iterations x optimised pixels, summed over the scales: what a run's time grows with.
    ``box`` is the hole's bounding box (y0, y1, x0, x1) at full size; None assumes the whole image."""
    total = 0.0
    for h, w in pyramid_sizes(height, width, config.coarsest_side, config.max_scales):
        if box is None:
            crop = h * w
        else:
            sy, sx = h / height, w / width
            y0, y1 = max(0, math.floor(box[0] * sy) - CROP_MARGIN), min(h, math.ceil(box[1] * sy) + CROP_MARGIN)
            x0, x1 = max(0, math.floor(box[2] * sx) - CROP_MARGIN), min(w, math.ceil(box[3] * sx) + CROP_MARGIN)
            crop = (y1 - y0) * (x1 - x0)
        total += config.iterations * crop
    return total


class Estimator:
    """Seconds per work unit on this server's device: a CPU reference until a run here has been
    timed, then the measured rate (a running mean over the runs, weighted by their work)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._lock = threading.Lock()
        self._seconds = 0.0
        self._units = 0.0

    def rate(self) -> tuple[float | None, str]:
        with self._lock:
            if self._units > 0:
                return self._seconds / self._units, "measured on this server"
        reference = REFERENCE_SECONDS_PER_UNIT.get(self.device.type)
        return reference, ("from a 2-core CPU, until a run here is timed" if reference else "known after the first run here")

    def record(self, seconds: float, units: float) -> None:
        if units <= 0:
            return
        with self._lock:
            self._seconds += max(seconds - REFERENCE_OVERHEAD_S, 0.0)
            self._units += units

    def estimate(self, height: int, width: int, box, preset: str, options: dict) -> dict:
        config = _config(preset, options)
        rate, basis = self.rate()
        units = work_units(height, width, box, config)
        return {
            "preset": preset,
            "seconds": None if rate is None else REFERENCE_OVERHEAD_S + rate * units,
            "basis": basis,
            "scales": len(pyramid_sizes(height, width, config.coarsest_side, config.max_scales)),
            "whole_image": box is None,
        }


def _config(preset: str, options: dict) -> InpaintConfig:
    from dataclasses import replace

    return replace(PRESETS[preset], **options)


# --------------------------------------------------------------------------- #
# the queue: one run at a time
# --------------------------------------------------------------------------- #


@dataclass(eq=False)
class Job:
    image: torch.Tensor
    hole: torch.Tensor
    preset: str
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    last_read: float = field(default_factory=time.monotonic)

    def emit(self, event: dict) -> None:
        """Thread-safe: hand an event to the request that streams this job."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down
            self.cancelled.set()


class Runner:
    """A FIFO of jobs and one worker thread that runs them one at a time."""

    def __init__(self, device: torch.device, max_pixels: int, options: dict | None = None):
        self.device = device
        self.max_pixels = max_pixels
        self.options = {"max_pixels": max_pixels, **(options or {})}
        self.estimator = Estimator(device)
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._feature_nets: dict = {}
        self._thread = threading.Thread(target=self._work, name="neuralpatch-serve-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            self._waiting.append(job)
            self._cond.notify()

    def place(self, job: Job) -> int | None:
        """Runs ahead of ``job`` (the running one included); None once it runs or is gone."""
        with self._cond:
            if job not in self._waiting:
                return None
            return self._waiting.index(job) + (self._running is not None)

    def cancel(self, job: Job) -> None:
        job.cancelled.set()
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)

    def state(self) -> dict:
        with self._cond:
            return {"running": self._running is not None, "waiting": len(self._waiting)}

    def _feature_net(self, config: InpaintConfig):
        key = (config.texture_weights, config.layers)
        if key not in self._feature_nets:
            from neuralpatch.models import load_vgg

            self._feature_nets[key] = load_vgg(config.texture_weights, layers=config.layers, device=self.device)
        return self._feature_nets[key]

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting:
                    self._cond.wait()
                job = self._waiting.popleft()
                if job.cancelled.is_set():
                    continue
                self._running = job
            try:
                self._run(job)
            finally:
                with self._cond:
                    self._running = None

    def _run(self, job: Job) -> None:
        start = time.perf_counter()

        def callback(p: Progress) -> None:
            if job.cancelled.is_set() or time.monotonic() - job.last_read > STALE_S:
                raise Cancelled
            event = {
                "type": "scale" if p.result is not None else "progress",
                "scale": p.scale, "scales": p.scales, "size": list(p.size),
                "iteration": p.iteration, "iterations": p.iterations,
                "elapsed": time.perf_counter() - start,
            }  # fmt: skip
            if p.result is not None:
                preview = p.result
                if max(p.size) > PREVIEW_SIDE and p.scale < p.scales - 1:
                    factor = PREVIEW_SIDE / max(p.size)
                    preview = torch.nn.functional.interpolate(preview[None], scale_factor=factor, mode="area")[0]
                event["png"] = _b64(png_bytes(preview))
            job.emit(event)

        try:
            config = _config(job.preset, self.options)
            job.emit({"type": "started", "preset": job.preset, "device": str(self.device)})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = inpaint(
                    job.image, job.hole, preset=job.preset, device=self.device, progress=False,
                    feature_net=self._feature_net(config), callback=callback, **self.options,
                )  # fmt: skip
            seconds = time.perf_counter() - start
            rows, cols = job.hole.any(1).nonzero(), job.hole.any(0).nonzero()
            box = (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)
            self.estimator.record(seconds, work_units(*job.hole.shape, box, config))
            job.emit({
                "type": "done", "seconds": seconds,
                "png": _b64(png_bytes(result)), "mask_png": _b64(png_bytes(job.hole.numpy())),
            })  # fmt: skip
        except Cancelled:
            pass
        except (ValueError, TypeError, FileNotFoundError, ImportError) as exc:
            job.emit({"type": "error", "message": str(exc)})
        except Exception as exc:  # noqa: BLE001 - report it on the page and keep serving
            job.emit({"type": "error", "message": f"{type(exc).__name__}: {exc}"})
        finally:
            job.emit({"type": "end"})


# --------------------------------------------------------------------------- #
# the app
# --------------------------------------------------------------------------- #


def create_app(device: str | None = None, max_pixels: int | None = None, options: dict | None = None):
    """The FastAPI app. ``options`` are :class:`neuralpatch.InpaintConfig` fields applied to every run
    (on top of the preset the page chooses); ``max_pixels`` bounds uploads and runs alike."""
    max_pixels = InpaintConfig.max_pixels if max_pixels is None else max_pixels
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels: expected a positive int, got {max_pixels!r}")
    options = dict(options or {})
    _config(DEFAULT_PRESET, {"max_pixels": max_pixels, **options})  # unknown or bad options fail here
    runner = Runner(resolve_device(device), max_pixels, options)
    web = files("neuralpatch").joinpath("web")

    app = FastAPI(title="neuralpatch", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runner = runner

    @app.exception_handler(BadUpload)
    async def bad_upload(request, exc: BadUpload):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg')}" for e in exc.errors())
        return JSONResponse({"error": f"request: {problems} (the page sends an image file, a mask file and a preset)"}, status_code=400)

    def image_response(image: torch.Tensor, alpha_hole: torch.Tensor | None) -> dict:
        _, height, width = image.shape
        has_hole = alpha_hole is not None and bool(alpha_hole.any())
        return {
            "width": width, "height": height, "long_side": max(width, height), "png": _b64(png_bytes(image)),
            "mask_png": _b64(png_bytes(alpha_hole.numpy())) if has_hole else None,
        }  # fmt: skip

    async def read_upload(upload, what: str) -> bytes:
        if not isinstance(upload, StarletteUpload):
            raise BadUpload(f"{what}: expected an uploaded file")
        # a PNG of noise takes about 4 bytes a pixel; anything far past that is not an image we take
        limit = 8 * max_pixels + (1 << 20)
        size = upload.size  # known from the parsed form, before the bytes are read into memory
        if size is not None and size > limit:
            raise BadUpload(f"{what}: {size:,} bytes is more than an image within this server's {max_pixels:,}-pixel limit", 413)
        return await upload.read()

    @app.get("/")
    async def index():
        return FileResponse(str(web.joinpath("index.html")), media_type="text/html")

    @app.get("/api/info")
    async def info():
        rate, basis = runner.estimator.rate()
        return {
            "device": str(runner.device), "max_pixels": max_pixels, "presets": list(PRESETS),
            "default_preset": DEFAULT_PRESET, "seconds_per_unit": rate, "basis": basis, **runner.state(),
        }  # fmt: skip

    @app.post("/api/image")
    async def upload_image(image: UploadFile = File(...)):
        """The uploaded image decoded: its size, and the PNG (base64) that the page paints on and sends
        back to run; ``mask_png`` is the hole of a transparent area, if it has one."""
        data = await read_upload(image, "image")
        tensor, alpha_hole = await asyncio.to_thread(image_from_upload, data, max_pixels)
        return image_response(tensor, alpha_hole)

    @app.get("/api/demo")
    async def demo():
        """The bundled demo photo and its built-in mask, as /api/image answers."""
        from neuralpatch.demo import demo_inputs

        image, hole = await asyncio.to_thread(demo_inputs)
        return image_response(image, hole)

    @app.post("/api/estimate")
    async def estimate(payload: dict):
        try:
            height, width = int(payload["height"]), int(payload["width"])
            preset = str(payload.get("preset", DEFAULT_PRESET))
            box = payload.get("box")
            box = None if box is None else tuple(int(v) for v in box)
        except (KeyError, TypeError, ValueError) as exc:
            raise BadUpload(f"estimate: expected width, height, preset and box [y0, y1, x0, x1] or null ({exc})") from exc
        if preset not in PRESETS:
            raise BadUpload(f"preset: expected one of {list(PRESETS)}, got {preset!r}")
        if height < 1 or width < 1 or (box is not None and len(box) != 4):
            raise BadUpload("estimate: width and height must be positive, box four numbers")
        return runner.estimator.estimate(height, width, box, preset, runner.options)

    @app.post("/api/run")
    async def run(image: UploadFile = File(...), mask: UploadFile = File(...), preset: str = Form(DEFAULT_PRESET)):
        """Queue a run; the response streams it as JSON lines until an ``end`` event."""
        if preset not in PRESETS:
            raise BadUpload(f"preset: expected one of {list(PRESETS)}, got {preset!r}")
        image_data, mask_data = await read_upload(image, "image"), await read_upload(mask, "mask")
        tensor, _ = await asyncio.to_thread(image_from_upload, image_data, max_pixels)
        hole = await asyncio.to_thread(mask_from_upload, mask_data, tuple(tensor.shape[1:]), max_pixels)
        if not bool(hole.any()):
            raise BadUpload("mask: the mask is empty; paint over what should be removed, then run")
        if bool(hole.all()):
            raise BadUpload("mask: the mask covers the whole image, so there is nothing left to copy texture from")
        job = Job(tensor, hole, preset, asyncio.get_running_loop())
        runner.submit(job)
        return StreamingResponse(_stream(runner, job), media_type="application/x-ndjson", headers={"Cache-Control": "no-store"})

    app.mount("/static", StaticFiles(directory=str(web)), name="static")
    return app


async def _stream(runner: Runner, job: Job) -> AsyncIterator[bytes]:
    """The job's events as JSON lines; while it waits, its place in the queue every heartbeat.
    When the client goes away the generator is closed, and the job is cancelled."""
    try:
        last_place = -1
        while True:
            job.last_read = time.monotonic()
            place = runner.place(job)
            if place is not None and place != last_place:
                last_place = place
                yield _line({"type": "queued", "place": place})
            try:
                event = await asyncio.wait_for(job.events.get(), HEARTBEAT_S)
            except asyncio.TimeoutError:
                yield _line({"type": "heartbeat"})  # a write that fails when the browser has gone
                continue
            yield _line(event)
            if event["type"] == "end":
                return
    finally:
        runner.cancel(job)


def _line(event: dict) -> bytes:
    return (json.dumps(event) + "\n").encode()


def serve(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, device: str | None = None, max_pixels: int | None = None) -> int:
    """Run the server until interrupted (``neuralpatch serve``)."""
    import uvicorn

    warning = host_warning(host)
    if warning:
        print(warning, file=sys.stderr)
    app = create_app(device=device, max_pixels=max_pixels)
    shown = f"[{host}]" if ":" in host else host
    print(f"neuralpatch serve: open http://{shown}:{port}/ (device {app.state.runner.device}; Ctrl+C stops)", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0
