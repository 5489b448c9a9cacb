"""The web page at / in a real headless Chromium (Debian's chromium and chromium-driver,
driven by Selenium): drop an image and read the verdict beside its heatmap; type a prompt, watch the steps,
get the image; a screenshot of the result is checked."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="serving needs the 'serve' extra")
webdriver = pytest.importorskip("selenium.webdriver", reason="the page test drives Chromium with selenium")

import enginekit
from enginekit.serve.app import create_app
from enginekit.serve.settings import ServeSettings
from enginekit.serve.testing import UvicornThread

from ..conftest import make_photo

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1100,900", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_page_classifies_a_dropped_image_and_generates_one(browser, exported: dict, tiny_pipelines: dict,
                                                            tmp_path: Path) -> None:
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    photo = tmp_path / "photo.png"
    make_photo((48, 48), 3).save(photo)
    want = enginekit.load(exported["timm"], device="cpu").predict([str(photo)])[0]
    app = create_app({"clf": exported["timm"], "sd": tiny_pipelines[("tiny-sd15", "onnx")]}, ServeSettings())
    with UvicornThread(app) as server:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda d: "clf" in d.find_element(By.ID, "models").text)
        # A file picked is handled as a file dropped (the same handler).
        browser.execute_script("document.getElementById('file').style.display = 'block'")
        browser.find_element(By.ID, "file").send_keys(str(photo))
        wait.until(lambda d: "%" in d.find_element(By.ID, "verdict").text)
        verdict = browser.find_element(By.ID, "verdict").text
        assert verdict.startswith(want.label + " ") and f"{100 * want.score:.1f}%" in verdict
        bars = browser.find_elements(By.CSS_SELECTOR, "#scores .bar")
        assert [b.find_element(By.TAG_NAME, "span").text for b in bars] == [lbl for lbl, _ in want.top_k]
        # Beside the verdict, where the model looked: the library's overlay for the same image.
        heatmap = browser.find_element(By.ID, "heatmap")
        wait.until(lambda d: heatmap.is_displayed())
        import base64

        shown = Image.open(io.BytesIO(base64.b64decode(heatmap.get_attribute("src").split(",", 1)[1])))
        overlay = enginekit.load(exported["timm"], device="cpu").explain([str(photo)])[0].overlay(Image.open(photo))
        assert np.array_equal(np.asarray(shown.convert("RGB")), np.asarray(overlay))

        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("a red kite over the sea")
        steps = browser.find_element(By.ID, "steps")
        steps.clear()
        steps.send_keys("6")
        browser.find_element(By.ID, "seed").clear()
        browser.find_element(By.ID, "seed").send_keys("4")
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_element(By.ID, "progress-text").text.startswith("done"))
        assert browser.find_element(By.ID, "progress-text").text == "done (seed 4)"
        progress = browser.find_element(By.ID, "progress")
        assert progress.get_attribute("value") == progress.get_attribute("max") == "6"
        image = browser.find_element(By.ID, "result-image")
        assert browser.execute_script("return arguments[0].naturalWidth", image) > 0

        shot = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
        (tmp_path / "page.png").write_bytes(browser.get_screenshot_as_png())
        assert shot.size[0] >= 800
        # The generated picture is on screen: the region of the <img> is not the blank page.
        r = image.rect
        scale = shot.size[0] / browser.execute_script("return window.innerWidth")
        box = [int(v * scale) for v in (r["x"], r["y"], r["x"] + r["width"], r["y"] + r["height"])]
        region = np.asarray(shot.crop(box), dtype=np.float32)
        assert region.size and region.std() > 5
        assert (region < 250).mean() > 0.5  # mostly not white


def test_page_inpaints_with_the_model_sampler_and_size_picked(browser, tiny_pipelines: dict, inpainting: dict,
                                                              tmp_path: Path) -> None:
    """The generate card's model picker, sampler, size, picture and mask: the image the page
    shows is the library's for the same call."""
    import base64

    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from ..conftest import make_mask

    photo, mask = tmp_path / "photo.png", tmp_path / "mask.png"
    make_photo((80, 64), 5).save(photo)
    make_mask((80, 64), (20, 10, 60, 50)).save(mask)
    path = inpainting[("tiny-sd15-inpainting", "onnx")]
    want = enginekit.load(path, device="cpu")("a red fox", image=str(photo), mask_image=str(mask), seed=4,
                                              num_inference_steps=3, scheduler="euler-a", width=72, height=64)
    app = create_app({"sd": tiny_pipelines[("tiny-sd15", "onnx")], "inp": path}, ServeSettings())
    with UvicornThread(app) as server:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda d: "inp" in d.find_element(By.ID, "models").text)
        Select(browser.find_element(By.ID, "model")).select_by_value("inp")
        Select(browser.find_element(By.ID, "scheduler")).select_by_value("euler-a")
        for field, value in (("prompt", "a red fox"), ("steps", "3"), ("seed", "4"), ("width", "72"), ("height", "64")):
            box = browser.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        browser.find_element(By.ID, "init").send_keys(str(photo))
        browser.find_element(By.ID, "mask").send_keys(str(mask))
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_element(By.ID, "progress-text").text.startswith(("done", "Error", "error")))
        assert browser.find_element(By.ID, "progress-text").text == "done (seed 4)"
        src = browser.find_element(By.ID, "result-image").get_attribute("src")
        shown = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")
        assert shown.size == (72, 64)
        assert np.array_equal(np.asarray(shown), np.asarray(want.images[0]))
