"""The chat page at `/` in a real headless browser (Debian's chromium + chromedriver, driven by selenium):
load the page, send a message, watch the streamed answer arrive in pieces and equal the API's own greedy
answer; upload an image to a vision model and get its answer, equal to the API's and non-empty. Skipped where
chromium, chromedriver, selenium or openai is missing, except under CI (CI=true; .ci/run installs them), where
that fails the run (support.needs)."""
import base64
import shutil

import numpy as np
import pytest

from support.needs import import_or_fail, missing
from support.serving import running_server

pytestmark = pytest.mark.slow
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    missing("chromium and chromedriver are not installed (apt-get install -y chromium chromium-driver)")
webdriver = import_or_fail("selenium.webdriver", 'pip install -e ".[test]"')
openai = import_or_fail("openai", 'pip install -e ".[test]"')
from selenium.webdriver.common.by import By                      # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait          # noqa: E402

# The browser flags of /work/.library/env/machines/python.md: no sandbox as root, no network of its own.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_script_timeout(120)
    yield driver
    driver.quit()


OBSERVE = """
const log = document.getElementById('log');
window.__pieces = [];
new MutationObserver(() => {
  const spans = log.querySelectorAll('.assistant .text');
  if (spans.length) window.__pieces.push(spans[spans.length - 1].textContent);
}).observe(log, {subtree: true, childList: true, characterData: true});
"""


def send(driver, text, wait_s=240):
    box = driver.find_element(By.ID, "input")
    box.clear()
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()
    WebDriverWait(driver, wait_s).until(
        lambda d: d.execute_script("const m = document.querySelectorAll('.msg.assistant');"
                                   "return m.length && m[m.length-1].dataset.state !== 'streaming' "
                                   "&& m[m.length-1].dataset.state"))
    last = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
    return last.get_attribute("data-state"), last.find_element(By.CSS_SELECTOR, ".text").text


def last_answer(driver) -> str:
    """The text of the last answer as the page holds it (textContent: unstripped)."""
    return driver.execute_script("const s = document.querySelectorAll('.assistant .text');"
                                 "return s[s.length - 1].textContent;")


def open_page(driver, url):
    driver.get(url + "/")
    WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "model").get_attribute("data-ready") == "1")
    driver.execute_script(OBSERVE)


def test_page_streams_the_answer(browser, text_engine):
    from lwm.serve import create_app

    # Two decode steps per engine call: 24 tokens leave the server as about 12 bursts, so the page must show
    # the answer growing (with the default 16 steps an answer can arrive in one or two bursts that the browser
    # reads at once, and the growth check would depend on timing).
    app = create_app(text_engine["engine"], text_engine["tok"], model_name="tiny", decode_steps_per_call=2)
    with running_server(app) as url:
        open_page(browser, url)
        browser.execute_script("document.getElementById('max_tokens').value = '24';")
        state, text = send(browser, "the quick brown fox")
        assert state == "done", text
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        want = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the quick brown fox"}],
                                              max_tokens=24, temperature=0).choices[0].message.content
        pieces = browser.execute_script("return window.__pieces;")
        assert last_answer(browser) == want and want
        grown = [p for p in dict.fromkeys(pieces) if p]          # the distinct texts the answer passed through
        assert len(grown) >= 2 and all(want.startswith(p) for p in grown), grown   # streamed: prefixes, piece by piece
        # a second turn goes out with the history and is answered too
        state, _ = send(browser, "and the dog")
        assert state == "done"


def test_page_uploads_an_image_to_a_vision_model(browser, vision_engine):
    from PIL import Image

    from lwm.serve import create_app

    tmp, engine, tok, vqgan = (vision_engine[k] for k in ("dir", "engine", "tok", "vqgan"))
    image = np.random.default_rng(0).integers(0, 255, (40, 48, 3), np.uint8)
    path = tmp / "picture.png"
    Image.fromarray(image).save(path)
    app = create_app(engine, tok, model_name="tiny-vision", vqgan=vqgan)
    with running_server(app) as url:
        open_page(browser, url)
        assert browser.find_element(By.ID, "media").is_displayed()
        browser.execute_script("document.getElementById('max_tokens').value = '6';")
        browser.find_element(By.ID, "media").send_keys(str(path))
        state, text = send(browser, "what is in the picture")
        assert state == "done", text
        assert browser.find_elements(By.CSS_SELECTOR, ".msg.user img"), "the upload is not shown"
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        data = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
        want = client.chat.completions.create(
            model="tiny-vision", max_tokens=6, temperature=0,
            messages=[{"role": "user", "content": [{"type": "text", "text": "what is in the picture"},
                                                    {"type": "image_url", "image_url": {"url": data}}]}])
        want = want.choices[0].message.content
        assert last_answer(browser) == want and want
