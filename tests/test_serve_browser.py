"""`neuralpatch serve` in a real browser: Debian's Chromium driven by Selenium through chromium-driver.

Skips where chromium, chromedriver, selenium or the ui extra is missing (under CI=true a missing
Chromium is an error instead). Set NEURALPATCH_SCREENSHOT
to a path to keep the screenshot of the finished run (the README's picture comes from here).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")
pytest.importorskip("selenium")

from neuralpatch import serve  # noqa: E402
from tests.serve_helpers import decode_png, photo_crop, png_of, running_server  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if os.environ.get("CI") == "true" and not (CHROMIUM and CHROMEDRIVER):
    # CI installs both (README's test command): a skip there would hide a broken install step
    raise RuntimeError("CI: chromium and chromedriver are not installed; the browser tests must run here")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
    ),
]

RUN_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def url():
    # the real pipeline: shipped VGG-16 weights, PatchMatch start, the page's own preset choice
    with running_server(serve.create_app(device="cpu")) as base:
        yield base


@pytest.fixture()
def downloads(tmp_path):
    folder = tmp_path / "downloads"
    folder.mkdir()
    return folder


@pytest.fixture()
def browser(downloads):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1000",
        "--hide-scrollbars",
    ):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(condition, timeout: float = 30, what: str = "the page"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def open_page(driver, url):
    driver.get(url)
    wait_for(lambda: driver.execute_script("return document.getElementById('preset').options.length") == 3, what="the presets")


def upload(driver, path: Path):
    driver.find_element("id", "file").send_keys(str(path))


def mask_alpha(driver, x: int, y: int) -> int:
    return driver.execute_script(
        "return document.getElementById('mask-canvas').getContext('2d').getImageData(arguments[0], arguments[1], 1, 1).data[3]", x, y
    )


def painted_pixels(driver) -> int:
    return driver.execute_script(
        "const c = document.getElementById('mask-canvas'); const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] >= 128; return n;"
    )


def drag(driver, canvas, points):
    """Press at the first image pixel (x, y), move through the others, release: real pointer events."""
    from selenium.webdriver.common.action_chains import ActionChains

    rect = driver.execute_script(
        "const r = arguments[0].getBoundingClientRect(); return [r.width, r.height, arguments[0].width, arguments[0].height];", canvas
    )
    scale_x, scale_y = rect[0] / rect[2], rect[1] / rect[3]

    def offset(p):  # Selenium offsets are from the element's centre, in CSS pixels
        return round((p[0] + 0.5) * scale_x - rect[0] / 2), round((p[1] + 0.5) * scale_y - rect[1] / 2)

    chain = ActionChains(driver, duration=20).move_to_element_with_offset(canvas, *offset(points[0])).click_and_hold()
    for p in points[1:]:
        chain = chain.move_to_element_with_offset(canvas, *offset(p))
    chain.release().perform()


def set_range(driver, element_id: str, value: int):
    driver.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1]; e.dispatchEvent(new Event('input'));", element_id, value
    )


def test_paint_run_download(browser, url, tmp_path, downloads):
    photo = photo_crop(128, 192)  # two scales: 96x64, then 192x128
    photo_path = tmp_path / "chelsea.png"
    photo_path.write_bytes(png_of(photo))
    notes = tmp_path / "notes.png"
    notes.write_bytes(b"shopping list: milk, eggs")

    open_page(browser, url)
    # a file that is not an image: a message on the page, and the page goes on working
    upload(browser, notes)
    message = browser.find_element("id", "message")
    wait_for(lambda: message.is_displayed(), what="the error message")
    assert "not an image file" in message.text

    upload(browser, photo_path)
    info = browser.find_element("id", "info")
    wait_for(lambda: "long side 192 px" in info.text, what="the image info")
    assert "192×128" in info.text and "on cpu" in info.text and " s " in info.text + " "
    canvas = browser.find_element("id", "mask-canvas")

    # the stroke over the fur above the cat's eye: a 12-pixel brush from (30, 28) to (160, 28)
    set_range(browser, "brush-size", 12)
    assert browser.find_element("id", "brush-size-value").text == "12 px"
    drag(browser, canvas, [(30, 28), (60, 27), (95, 29), (130, 28), (160, 28)])
    assert mask_alpha(browser, 95, 28) == 255 and mask_alpha(browser, 95, 60) == 0
    stroke = painted_pixels(browser)
    assert 12 * 120 < stroke < 14 * 150

    # a second stroke, then undo: gone again
    drag(browser, canvas, [(100, 70), (100, 100)])
    assert mask_alpha(browser, 100, 85) == 255
    browser.find_element("id", "undo").click()
    assert mask_alpha(browser, 100, 85) == 0 and painted_pixels(browser) == stroke

    # the eraser takes the stroke's right end off
    browser.find_element("id", "tool-eraser").click()
    set_range(browser, "brush-size", 30)
    drag(browser, canvas, [(160, 28), (158, 28)])
    assert mask_alpha(browser, 160, 28) == 0 and mask_alpha(browser, 95, 28) == 255
    browser.find_element("id", "tool-brush").click()
    wait_for(lambda: "for this hole" in info.text, what="the estimate for the painted hole")

    assert browser.find_element("id", "preset").get_attribute("value") == "fast"
    browser.find_element("id", "run").click()
    status = browser.find_element("id", "status")
    seen = set()

    def finished():
        seen.add(status.text.split(":")[0])
        return browser.execute_script("return document.body.dataset.done === '1' || !document.getElementById('message').hidden")

    wait_for(finished, RUN_TIMEOUT_S, "the run")
    assert message.is_displayed() is False, message.text
    assert any(s.startswith("Scale 1/2") for s in seen) or any(s.startswith("Scale 2/2") for s in seen), seen
    captions = [e.text for e in browser.find_elements("css selector", "#scales figcaption")]
    assert [c.split(",")[0] for c in captions] == ["scale 1/2: 96×64", "scale 2/2: 192×128"]
    assert browser.find_element("id", "result").is_displayed()
    set_range(browser, "compare", 30)
    assert "30%" in browser.find_element("id", "result").value_of_css_property("clip-path")
    set_range(browser, "compare", 0)  # all "after" for the screenshot

    screenshot = os.environ.get("NEURALPATCH_SCREENSHOT")
    browser.save_screenshot(str(screenshot or tmp_path / "serve.png"))

    browser.find_element("id", "download-result").click()
    browser.find_element("id", "download-mask").click()
    result_file, mask_file = downloads / "chelsea_inpainted.png", downloads / "chelsea_mask.png"
    wait_for(lambda: result_file.is_file() and mask_file.is_file() and not list(downloads.glob("*.crdownload")), what="the downloads")

    result = decode_png(result_file.read_bytes())
    hole = decode_png(mask_file.read_bytes()) > 127
    assert result.shape == photo.shape and hole.shape == photo.shape[:2]
    # the hole is the stroke that was painted, less what was erased
    assert hole[28, 40:140].all() and not hole[28, 155:].any() and not hole[:15].any() and not hole[45:].any()
    assert np.array_equal(result[~hole], photo[~hole])  # bit for bit outside the stroke
    changed = np.abs(result[hole].astype(int) - photo[hole]).max(axis=1) > 0
    assert changed.mean() > 0.5  # synthesised under it


def test_demo_photo_and_empty_mask_message(browser, url):
    open_page(browser, url)
    browser.find_element("id", "demo").click()
    info = browser.find_element("id", "info")
    wait_for(lambda: "long side 640 px" in info.text, what="the demo photo")
    assert painted_pixels(browser) > 5000  # the demo's mast mask comes with it
    browser.find_element("id", "clear").click()
    assert painted_pixels(browser) == 0
    browser.find_element("id", "run").click()
    message = browser.find_element("id", "message")
    wait_for(lambda: message.is_displayed(), what="the empty-mask message")
    assert "mask is empty" in message.text
    browser.find_element("id", "undo").click()  # the clear is undone: the mast mask is back
    assert painted_pixels(browser) > 5000


def test_second_tab_waits_with_its_place_and_a_closed_tab_frees_the_queue(browser, tmp_path):
    import httpx

    # runs that end only when cancelled (random weights, a mean-colour start: quick rounds)
    endless = {"texture_weights": "random", "content_init": "mean", "iterations": 1_000_000, "nn_every": 1}
    photo_path = tmp_path / "small.png"
    photo_path.write_bytes(png_of(photo_crop(48, 64)))
    with running_server(serve.create_app(device="cpu", options=endless)) as base:

        def start_run():
            open_page(browser, base)
            upload(browser, photo_path)
            wait_for(lambda: "long side 64 px" in browser.find_element("id", "info").text, what="the image")
            drag(browser, browser.find_element("id", "mask-canvas"), [(10, 24), (50, 24)])
            browser.find_element("id", "run").click()
            return browser.find_element("id", "status")

        status = start_run()
        wait_for(lambda: status.text.startswith("Scale 1/1"), what="the first tab's run")
        first = browser.current_window_handle
        browser.switch_to.new_window("tab")
        status = start_run()
        wait_for(lambda: "place 2 in the queue (1 run ahead of this one)" in status.text, what="the second tab's place")
        second = browser.current_window_handle

        browser.switch_to.window(first)
        browser.close()  # the first tab goes away mid-run
        browser.switch_to.window(second)
        wait_for(lambda: status.text.startswith("Scale 1/1"), 30, "the second tab's run to start")
        browser.find_element("id", "cancel").click()
        wait_for(lambda: status.text == "Cancelled.", what="the cancel")
        wait_for(lambda: not (s := httpx.get(base + "/api/info").json())["running"] and not s["waiting"], 30, "the server to go idle")
