"""`neuralpatch serve` at the HTTP level: uploads, bad inputs, the run stream, the queue, cancellation."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")
httpx = pytest.importorskip("httpx")

from neuralpatch import serve  # noqa: E402
from neuralpatch.cli import build_parser, main  # noqa: E402
from tests.serve_helpers import decode_png, photo_crop, png_of, running_server  # noqa: E402

# seconds-long runs: random VGG weights and a mean-colour start (what is tested here is the plumbing)
QUICK = {"texture_weights": "random", "content_init": "mean", "iterations": 2, "nn_every": 1}
# a run that only ends when it is cancelled
ENDLESS = {**QUICK, "iterations": 1_000_000}


@pytest.fixture(scope="module")
def quick_url():
    with running_server(serve.create_app(device="cpu", options=QUICK)) as url:
        yield url


@pytest.fixture(scope="module")
def endless_url():
    with running_server(serve.create_app(device="cpu", options=ENDLESS)) as url:
        yield url


@pytest.fixture(scope="module")
def small_limit_url():
    with running_server(serve.create_app(device="cpu", max_pixels=4096, options=QUICK)) as url:
        yield url


def stroke_mask(height: int, width: int) -> np.ndarray:
    hole = np.zeros((height, width), dtype=bool)
    hole[height // 2 - 5 : height // 2 + 5, width // 5 : 4 * width // 5] = True
    return hole


def canvas_png(hole: np.ndarray) -> bytes:
    """The mask as the page sends it: RGBA, painted pixels opaque, the rest transparent."""
    rgba = np.zeros((*hole.shape, 4), dtype=np.uint8)
    rgba[hole] = (255, 0, 110, 255)
    return png_of(rgba)


def run_files(image_png: bytes, mask_png: bytes, preset: str = "fast") -> dict:
    return {
        "files": {"image": ("photo.png", image_png, "image/png"), "mask": ("mask.png", mask_png, "image/png")},
        "data": {"preset": preset},
    }


def events_of(response) -> list[dict]:
    return [event for event in map(json.loads, response.iter_lines()) if event["type"] != "heartbeat"]


def next_event(lines, skip=("heartbeat",)) -> dict:
    for line in lines:
        event = json.loads(line)
        if event["type"] not in skip:
            return event
    raise AssertionError("the stream ended")


# --------------------------------------------------------------------------- #
# the command
# --------------------------------------------------------------------------- #


def test_serve_defaults_to_loopback():
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.device, args.max_pixels) == ("127.0.0.1", 7860, None, None)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_no_warning_for_loopback(host):
    assert serve.host_warning(host) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "example.org"])
def test_warning_for_other_hosts(host):
    assert "reachable from the network" in serve.host_warning(host)


def test_cli_serve_warns_and_binds(monkeypatch, capsys):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    assert main(["serve", "--host", "0.0.0.0", "--port", "8123", "--device", "cpu", "--max-pixels", "5000"]) == 0
    assert calls[-1]["host"] == "0.0.0.0" and calls[-1]["port"] == 8123
    assert "reachable from the network" in capsys.readouterr().err
    assert main(["serve", "--device", "cpu"]) == 0
    assert calls[-1]["host"] == "127.0.0.1" and calls[-1]["port"] == 7860
    assert "reachable from the network" not in capsys.readouterr().err


def test_cli_serve_bad_device(monkeypatch, capsys):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: pytest.fail("must not serve"))
    assert main(["serve", "--device", "tpu7"]) == 2
    assert "device" in capsys.readouterr().err


# --------------------------------------------------------------------------- #
# the page and uploads
# --------------------------------------------------------------------------- #


def test_page_and_info(quick_url):
    page = httpx.get(quick_url + "/")
    assert page.status_code == 200 and 'id="mask-canvas"' in page.text
    assert httpx.get(quick_url + "/static/app.js").status_code == 200
    info = httpx.get(quick_url + "/api/info").json()
    assert info["device"] == "cpu" and info["presets"] == ["fast", "default", "best"] and info["default_preset"] == "fast"


def test_upload_returns_the_same_pixels(quick_url):
    photo = photo_crop(40, 56)
    body = httpx.post(quick_url + "/api/image", files={"image": ("cat.png", png_of(photo), "image/png")}).json()
    assert (body["width"], body["height"], body["long_side"]) == (56, 40, 56)
    assert np.array_equal(decode_png(base64.b64decode(body["png"])), photo)
    assert body["mask_png"] is None


def test_upload_transparency_becomes_the_mask(quick_url):
    rgba = np.dstack([photo_crop(32, 32), np.full((32, 32), 255, np.uint8)])
    rgba[10:20, 5:9, 3] = 0
    body = httpx.post(quick_url + "/api/image", files={"image": ("a.png", png_of(rgba), "image/png")}).json()
    mask = decode_png(base64.b64decode(body["mask_png"])) > 127
    expected = np.zeros((32, 32), bool)
    expected[10:20, 5:9] = True
    assert np.array_equal(mask, expected)


def test_upload_jpeg(quick_url):
    out = io.BytesIO()
    Image.fromarray(photo_crop(48, 64)).save(out, format="JPEG", quality=90)
    body = httpx.post(quick_url + "/api/image", files={"image": ("p.jpg", out.getvalue(), "image/jpeg")}).json()
    assert (body["width"], body["height"]) == (64, 48)


def test_not_an_image(quick_url):
    response = httpx.post(quick_url + "/api/image", files={"image": ("notes.png", b"these are my notes, not pixels", "image/png")})
    assert response.status_code == 400
    assert "not an image file" in response.json()["error"]
    assert httpx.get(quick_url + "/api/info").status_code == 200  # still serving


def test_empty_file(quick_url):
    response = httpx.post(quick_url + "/api/image", files={"image": ("empty.png", b"", "image/png")})
    assert response.status_code == 400 and "empty" in response.json()["error"]


def test_corrupt_image(quick_url):
    data = png_of(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    response = httpx.post(quick_url + "/api/image", files={"image": ("cut.png", data[: len(data) // 2], "image/png")})
    assert response.status_code == 400
    assert "corrupt or truncated" in response.json()["error"]
    assert httpx.get(quick_url + "/api/info").status_code == 200


def test_image_over_max_pixels(small_limit_url):
    big = png_of(photo_crop(80, 80))  # 6400 pixels against a limit of 4096
    response = httpx.post(small_limit_url + "/api/image", files={"image": ("big.png", big, "image/png")})
    assert response.status_code == 413
    message = response.json()["error"]
    assert "80x80" in message and "4,096" in message and "--max-pixels 6400" in message
    run = httpx.post(small_limit_url + "/api/run", **run_files(big, canvas_png(stroke_mask(80, 80))))
    assert run.status_code == 413
    small = png_of(photo_crop(60, 60))
    assert httpx.post(small_limit_url + "/api/image", files={"image": ("ok.png", small, "image/png")}).status_code == 200


def test_client_paths_are_never_opened(quick_url, tmp_path):
    real = tmp_path / "real.png"
    real.write_bytes(png_of(photo_crop(32, 32)))
    # a path instead of a file: refused, not opened
    response = httpx.post(quick_url + "/api/image", data={"image": str(real)})
    assert response.status_code == 400 and "request" in response.json()["error"]
    # a real file's path as the upload's name, with other bytes: the bytes are what is read
    response = httpx.post(quick_url + "/api/image", files={"image": (str(real), b"not the file at that path", "image/png")})
    assert response.status_code == 400 and "not an image file" in response.json()["error"]
    response = httpx.post(quick_url + "/api/run", data={"image": str(real), "mask": str(real), "preset": "fast"})
    assert response.status_code == 400


# --------------------------------------------------------------------------- #
# runs
# --------------------------------------------------------------------------- #


def test_empty_mask(quick_url):
    photo = photo_crop(32, 48)
    response = httpx.post(quick_url + "/api/run", **run_files(png_of(photo), canvas_png(np.zeros((32, 48), bool))))
    assert response.status_code == 400
    assert "mask is empty" in response.json()["error"]


def test_mask_covering_everything(quick_url):
    photo = photo_crop(32, 48)
    response = httpx.post(quick_url + "/api/run", **run_files(png_of(photo), canvas_png(np.ones((32, 48), bool))))
    assert response.status_code == 400 and "whole image" in response.json()["error"]


def test_mask_of_another_size(quick_url):
    response = httpx.post(quick_url + "/api/run", **run_files(png_of(photo_crop(32, 48)), canvas_png(stroke_mask(30, 48))))
    assert response.status_code == 400 and "does not match" in response.json()["error"]


def test_unknown_preset(quick_url):
    photo = photo_crop(32, 48)
    response = httpx.post(quick_url + "/api/run", **run_files(png_of(photo), canvas_png(stroke_mask(32, 48)), preset="slowest"))
    assert response.status_code == 400 and "preset" in response.json()["error"]


def test_run_streams_each_scale_and_keeps_known_pixels(quick_url):
    photo = photo_crop(128, 192)  # two scales: 96x64 and 192x128
    hole = stroke_mask(128, 192)
    before = httpx.post(quick_url + "/api/estimate", json={"width": 192, "height": 128, "preset": "fast", "box": [59, 69, 38, 153]}).json()
    assert before["seconds"] > 0 and before["scales"] == 2 and "2-core CPU" in before["basis"]
    whole = httpx.post(quick_url + "/api/estimate", json={"width": 192, "height": 128, "preset": "fast", "box": None}).json()
    assert whole["seconds"] > before["seconds"] and whole["whole_image"]

    with httpx.stream("POST", quick_url + "/api/run", timeout=120, **run_files(png_of(photo), canvas_png(hole))) as response:
        assert response.status_code == 200
        events = events_of(response)
    kinds = [e["type"] for e in events]
    assert kinds[-2:] == ["done", "end"] and "error" not in kinds
    assert kinds.index("started") < kinds.index("progress") < kinds.index("scale")
    scales = [e for e in events if e["type"] == "scale"]
    assert [e["size"] for e in scales] == [[64, 96], [128, 192]]
    assert [decode_png(base64.b64decode(e["png"])).shape for e in scales] == [(64, 96, 3), (128, 192, 3)]
    progress = [(e["scale"], e["iteration"]) for e in events if e["type"] == "progress"]
    assert progress == [(0, 1), (0, 2), (1, 1), (1, 2)]

    done = events[-2]
    result = decode_png(base64.b64decode(done["png"]))
    assert result.shape == photo.shape
    assert np.array_equal(result[~hole], photo[~hole])  # bit for bit outside the hole
    assert np.abs(result[hole].astype(int) - photo[hole]).mean() > 1  # synthesised inside it
    assert np.array_equal(decode_png(base64.b64decode(done["mask_png"])) > 127, hole)

    after = httpx.post(quick_url + "/api/estimate", json={"width": 192, "height": 128, "preset": "fast", "box": [59, 69, 38, 153]}).json()
    assert after["basis"] == "measured on this server"


def test_queue_shows_places_and_a_closed_browser_frees_it(endless_url):
    photo, hole = png_of(photo_crop(48, 64)), canvas_png(stroke_mask(48, 64))
    with httpx.Client(base_url=endless_url, timeout=60) as client, contextlib.ExitStack() as tabs:
        with client.stream("POST", "/api/run", **run_files(photo, hole)) as first:
            lines_first = first.iter_lines()
            assert next_event(lines_first, skip=("heartbeat", "queued", "started"))["type"] == "progress"
            second = tabs.enter_context(client.stream("POST", "/api/run", **run_files(photo, hole)))
            lines_second = second.iter_lines()
            assert next_event(lines_second) == {"type": "queued", "place": 1}
            third = tabs.enter_context(client.stream("POST", "/api/run", **run_files(photo, hole)))
            lines_third = third.iter_lines()
            assert next_event(lines_third) == {"type": "queued", "place": 2}
            assert client.get("/api/info").json()["waiting"] == 2
        # the first tab is gone: its run is cancelled, the second starts, the third moves up
        started = time.monotonic()
        assert next_event(lines_second) == {"type": "started", "preset": "fast", "device": "cpu"}
        assert time.monotonic() - started < 20
        assert next_event(lines_third) == {"type": "queued", "place": 1}
        tabs.close()  # the other two tabs go too
        deadline = time.monotonic() + 20
        while (state := client.get("/api/info").json())["running"] or state["waiting"]:
            assert time.monotonic() < deadline, f"still busy after every browser left: {state}"
            time.sleep(0.2)


def test_upload_far_too_many_bytes(small_limit_url):
    # 8 bytes a pixel of the limit plus 1 MiB is the most an upload may take
    response = httpx.post(small_limit_url + "/api/image", files={"image": ("huge.png", b"\0" * (8 * 4096 + (1 << 20) + 1), "image/png")})
    assert response.status_code == 413 and "bytes is more than" in response.json()["error"]
