"""The chat page in a real headless browser (Debian's chromium via Selenium and chromedriver): pick an image with
the file input, ask, read the answer from the page, and check it equals what the API answers for the same image
and question. A screenshot is saved to tests/artifacts/web-chat.png."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import openai
import pytest

from foveate.serve import ServeLimits, create_app, serve_in_thread
from foveate.tools.store import ImageStore

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
IMAGE = ROOT / "examples" / "world" / "images" / "large-7-000002.png"
QUESTION = "What color is the medium-sized square?"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra")
if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip(
        "chromium and chromedriver are needed (apt-get install chromium chromium-driver)", allow_module_level=True
    )


@pytest.fixture(scope="module")
def base_url(tiny_policy, tmp_path_factory):
    limits = ServeLimits(max_new_tokens=8)
    app = create_app(tiny_policy, store=ImageStore(tmp_path_factory.mktemp("web") / "images"), limits=limits)
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_upload_ask_and_read_the_answer(browser, base_url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    data_url = "data:image/png;base64," + base64.b64encode(IMAGE.read_bytes()).decode()
    api = client.chat.completions.create(
        model="foveate-direct",
        messages=[
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": QUESTION}],
            }
        ],
    )
    want = api.choices[0].message.content

    wait = WebDriverWait(browser, 120)
    browser.get(f"{base_url}/")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option[value='foveate-direct']"))
    assert browser.find_element(By.ID, "model").get_attribute("value") == "foveate-direct"
    browser.find_element(By.ID, "file").send_keys(str(IMAGE))
    wait.until(ready.visibility_of_element_located((By.ID, "preview")))
    browser.find_element(By.ID, "question").send_keys(QUESTION)
    browser.find_element(By.ID, "ask").click()
    answer = wait.until(
        lambda d: next(iter(d.find_elements(By.CSS_SELECTOR, ".answer:not([data-state=pending])")), None)
    )
    assert answer.get_attribute("data-state") == "done", answer.get_attribute("textContent")
    assert answer.get_attribute("textContent") == want
    # The trace arrived as pictures and text: the model call card with its output.
    steps = browser.find_elements(By.CSS_SELECTOR, ".step-model_call")
    assert len(steps) == 1 and want in steps[0].get_attribute("textContent")
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "web-chat.png"))
