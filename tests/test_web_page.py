"""The web page in a real headless Chromium: set seed, batch size and steps, see progress and images."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.server_process import ServerProcess
from tests.tiny_model import save_tiny_model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
REQUIRED = os.environ.get("DDPM_REQUIRE_BROWSER") == "1"  # .ci/run installs Chromium and sets this

if not (CHROMIUM and CHROMEDRIVER) and not REQUIRED:
    pytest.skip("Chromium and chromedriver are not installed (apt-get install chromium chromium-driver)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver") if not REQUIRED else __import__("selenium.webdriver").webdriver


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    model = save_tiny_model(tmp_path_factory.mktemp("m") / "tiny")
    s = ServerProcess(model)
    s.wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=900,700",
                 f"--user-data-dir={profile}",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]:  # no host but this one: an air-gapped network  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _fill(d: object, fields: dict[str, str]) -> None:
    """Type each value into the form field of that id (replacing what it held)."""
    from selenium.webdriver.common.by import By

    for field, value in fields.items():
        box = d.find_element(By.ID, field)  # type: ignore[attr-defined]
        box.clear()
        box.send_keys(value)


def test_page_generates_images(server: ServerProcess, browser: object, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d = browser
    d.get(server.url + "/")  # type: ignore[attr-defined]
    from selenium.webdriver.support.ui import Select

    # the served model, from GET /info, above the form
    info = httpx.get(server.url + "/info").json()
    WebDriverWait(d, 20).until(lambda drv: info["model"]["weights_sha256"] in drv.find_element(By.ID, "info-list").text)
    shown = d.find_element(By.ID, "info-list").text  # type: ignore[attr-defined]
    assert "tiny (ddpm-serve)" in shown and f"{info['model']['parameters']:,}" in shown and "sde-dpmsolver++" in shown
    assert d.find_element(By.ID, "batch_size").get_attribute("max") == str(info["limits"]["max_images_per_request"])  # type: ignore[attr-defined]
    assert not d.find_element(By.ID, "conditional").is_displayed()  # type: ignore[attr-defined]  # an unconditional model

    _fill(d, {"seed": "5", "batch_size": "3", "steps": "300", "eta": "0.5"})
    Select(d.find_element(By.ID, "sampler")).select_by_value("ddim")  # type: ignore[attr-defined]
    d.find_element(By.ID, "go").click()  # type: ignore[attr-defined]
    wait = WebDriverWait(d, 60, poll_frequency=0.02)
    # progress moves before the result arrives
    wait.until(lambda drv: 0 < float(drv.find_element(By.ID, "progress").get_attribute("value")) < 1)
    # previews of the three images while the chain runs (the model's x_0 so far), then the images in their place
    wait.until(lambda drv: len(drv.find_elements(By.CSS_SELECTOR, "#images img.preview")) == 3)
    wait.until(lambda drv: "done" in drv.find_element(By.ID, "status").text)
    assert len(d.find_elements(By.CSS_SELECTOR, "#images img")) == 3 and not d.find_elements(By.CSS_SELECTOR, "#images img.preview")  # type: ignore[attr-defined]
    wait.until(lambda drv: all(drv.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i) == 8
                               for i in drv.find_elements(By.CSS_SELECTOR, "#images img")))  # fmt: skip
    assert "done: 3 images, ddim, 300 steps" in d.find_element(By.ID, "status").text  # type: ignore[attr-defined]

    # the screenshot shows the images: their area is not blank
    shot = Image.open(io.BytesIO(d.get_screenshot_as_png())).convert("L")  # type: ignore[attr-defined]
    shot.save(tmp_path / "page.png")
    img = d.find_elements(By.CSS_SELECTOR, "#images img")[0]  # type: ignore[attr-defined]
    ratio = d.execute_script("return window.devicePixelRatio")  # type: ignore[attr-defined]
    r = {k: int(v * ratio) for k, v in img.rect.items()}
    region = np.asarray(shot)[r["y"] + 2 : r["y"] + r["height"] - 2, r["x"] + 2 : r["x"] + r["width"] - 2]
    assert region.size > 0 and region.std() > 10, region.std()


def test_the_pages_policy_blocks_a_script_it_did_not_ship(server: ServerProcess, browser: object) -> None:
    """The page's Content-Security-Policy, enforced by a real browser: its own script ran (the form works:
    test_page_generates_images), an inline script added later does not, and no frame may hold the page."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d = browser
    d.get(server.url + "/")  # type: ignore[attr-defined]
    WebDriverWait(d, 20).until(lambda drv: "ddpm-serve" in drv.find_element(By.ID, "info-list").text)  # its own script ran
    ran = d.execute_script(  # type: ignore[attr-defined]
        "const s = document.createElement('script'); s.textContent = 'window.injected = 1'; document.body.appendChild(s);"
        "return window.injected === 1"
    )
    assert ran is False
    d.get("data:text/html,<iframe id=f src='" + server.url + "/'></iframe>")  # type: ignore[attr-defined]
    framed = d.find_element(By.ID, "f")  # type: ignore[attr-defined]
    d.switch_to.frame(framed)  # type: ignore[attr-defined]
    try:
        assert d.find_elements(By.ID, "go") == []  # type: ignore[attr-defined]  # the frame is empty: frame-ancestors 'none'
    finally:
        d.switch_to.default_content()  # type: ignore[attr-defined]


def test_page_shows_errors(server: ServerProcess, browser: object) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d = browser
    d.get(server.url + "/")  # type: ignore[attr-defined]
    _fill(d, {"steps": "5000"})
    d.find_element(By.ID, "go").click()  # type: ignore[attr-defined]
    WebDriverWait(d, 30).until(lambda drv: "422" in drv.find_element(By.ID, "status").text)
    assert "steps" in d.find_element(By.ID, "status").text  # type: ignore[attr-defined]


# what a replica of a version before previews answers a body with "previews" (its 422 for an unknown field)
OLDER_REPLICA = """
window.sent = [];
window.older = true;
const real = window.fetch;
window.fetch = async (url, init) => {
  if (String(url).endsWith("generate/stream")) {
    const body = JSON.parse(init.body);
    window.sent.push(body);
    if (window.older && "previews" in body) {
      const error = { type: "extra_forbidden", loc: ["body", "previews"], msg: "Extra inputs are not permitted", input: body.previews };
      return new Response(JSON.stringify({ detail: "previews: Extra inputs are not permitted", errors: [error] }),
                          { status: 422, headers: { "Content-Type": "application/json" } });
    }
  }
  return real(url, init);
};
"""


def test_page_makes_images_where_an_older_replica_refuses_previews(server: ServerProcess, browser: object) -> None:
    """During a rolling update a page from a new replica may send its request to an old one, which refuses the
    unknown ``previews`` field: the page showed "422: previews: Extra inputs are not permitted" until the update
    ended. Now it asks again without previews, once, and shows the images; another 422 is still shown."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d = browser
    d.get(server.url + "/")  # type: ignore[attr-defined]
    WebDriverWait(d, 20).until(lambda drv: "tiny (ddpm-serve)" in drv.find_element(By.ID, "info-list").text)
    d.execute_script(OLDER_REPLICA)  # type: ignore[attr-defined]
    _fill(d, {"seed": "4", "batch_size": "2", "steps": "3"})
    d.find_element(By.ID, "go").click()  # type: ignore[attr-defined]
    status = lambda drv: drv.find_element(By.ID, "status").text  # noqa: E731
    WebDriverWait(d, 60).until(lambda drv: "done" in status(drv) or "422" in status(drv))
    assert "done: 2 images" in d.find_element(By.ID, "status").text  # type: ignore[attr-defined]
    sent = d.execute_script("return window.sent")  # type: ignore[attr-defined]
    assert [("previews" in body) for body in sent] == [True, False] and sent[1]["seed"] == 4
    d.execute_script("window.older = false")  # type: ignore[attr-defined]  # a replica of this version: a 422 for another field
    _fill(d, {"steps": "5000"})  # shown, not asked again
    d.find_element(By.ID, "go").click()  # type: ignore[attr-defined]
    WebDriverWait(d, 30).until(lambda drv: "422" in drv.find_element(By.ID, "status").text)
    assert "steps" in d.find_element(By.ID, "status").text and len(d.execute_script("return window.sent")) == 3  # type: ignore[attr-defined]
    assert d.execute_script("return window.sent[2].previews") == 3  # type: ignore[attr-defined]


def test_page_works_behind_a_proxy_that_serves_it_under_a_prefix(server: ServerProcess, browser: object, tmp_path: Path) -> None:
    """One host, several services: nginx serves this replica at /ddpm/ (``location /ddpm/ { proxy_pass http://replica/; }``).
    The page called "/info" and "/generate/stream", the proxy's own paths (404 there): no model shown, no image made."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.nginx_process import under_a_prefix

    proxy, prefix = under_a_prefix(server.url, tmp_path)
    try:
        assert httpx.get(prefix + "/healthz").status_code == 200  # the replica, through the prefix
        d = browser
        d.get(prefix + "/")  # type: ignore[attr-defined]
        WebDriverWait(d, 20).until(lambda drv: "tiny (ddpm-serve)" in drv.find_element(By.ID, "info-list").text)
        _fill(d, {"seed": "2", "batch_size": "2", "steps": "3"})
        d.find_element(By.ID, "go").click()  # type: ignore[attr-defined]
        WebDriverWait(d, 60).until(lambda drv: len(drv.find_elements(By.CSS_SELECTOR, "#images img")) == 2)
        assert "done: 2 images" in d.find_element(By.ID, "status").text  # type: ignore[attr-defined]
    finally:
        proxy.stop()


def test_page_asks_a_class_conditional_model_for_a_class(browser: object, tmp_path_factory: pytest.TempPathFactory) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from tests.tiny_model import TINY_CLASSES, save_tiny_conditional_model

    cond = ServerProcess(save_tiny_conditional_model(tmp_path_factory.mktemp("c") / "tiny-cond", num_timesteps=50))
    try:
        cond.wait_ready()
        d = browser
        d.get(cond.url + "/")  # type: ignore[attr-defined]
        wait = WebDriverWait(d, 30, poll_frequency=0.02)
        wait.until(lambda drv: drv.find_element(By.ID, "conditional").is_displayed())
        options = [o.get_attribute("value") for o in Select(d.find_element(By.ID, "class_label")).options]  # type: ignore[attr-defined]
        assert options == ["", *TINY_CLASSES, "balanced"]  # the last: each class in turn (image k: class k mod K)
        assert "model's: 1.5" in d.find_element(By.ID, "guidance_scale").get_attribute("placeholder")  # type: ignore[attr-defined]
        Select(d.find_element(By.ID, "class_label")).select_by_value("dog")  # type: ignore[attr-defined]
        _fill(d, {"guidance_scale": "2.5", "steps": "10", "batch_size": "2"})
        d.find_element(By.ID, "go").click()  # type: ignore[attr-defined]
        wait.until(lambda drv: "done: 2 images" in drv.find_element(By.ID, "status").text)
        assert "class dog, guidance 2.5" in d.find_element(By.ID, "status").text  # type: ignore[attr-defined]
        Select(d.find_element(By.ID, "class_label")).select_by_value("balanced")  # type: ignore[attr-defined]
        d.find_element(By.ID, "go").click()  # type: ignore[attr-defined]
        wait.until(lambda drv: "classes cat, dog, guidance 2.5" in drv.find_element(By.ID, "status").text)
        assert cond.metric('ddpm_requests_total{code="200"}') == 2
    finally:
        cond.stop()


def test_page_repaints_what_the_user_erases(server: ServerProcess, browser: object) -> None:
    """Generate a digit, click it into the editor, erase a band across it, repaint: the band changes and
    every pixel outside the brush is the original's (the known region is kept exactly)."""
    import base64

    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    d = browser
    d.get(server.url + "/")  # type: ignore[attr-defined]
    _fill(d, {"seed": "8", "batch_size": "1", "steps": "5"})
    Select(d.find_element(By.ID, "sampler")).select_by_value("ddim")  # type: ignore[attr-defined]
    d.find_element(By.ID, "go").click()  # type: ignore[attr-defined]
    wait = WebDriverWait(d, 60, poll_frequency=0.05)
    wait.until(lambda drv: "done: 1 images" in drv.find_element(By.ID, "status").text)

    def pixels() -> np.ndarray:
        src = d.find_element(By.CSS_SELECTOR, "#images img").get_attribute("src")  # type: ignore[attr-defined]
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",")[1]))))

    original = pixels()
    d.find_element(By.CSS_SELECTOR, "#images img").click()  # type: ignore[attr-defined]
    canvas = d.find_element(By.ID, "canvas")  # type: ignore[attr-defined]
    wait.until(lambda drv: canvas.is_displayed())
    d.find_element(By.ID, "tool-erase").click()  # type: ignore[attr-defined]
    size = canvas.size  # the 8x8 model shown at 224 px: a model pixel is 28 px; erase model row 5 (rows 4-6 with the brush)
    y = int(5.5 * size["height"] / 8) - size["height"] // 2
    ActionChains(d).move_to_element_with_offset(canvas, -size["width"] // 2 + 2, y).click_and_hold().move_by_offset(
        size["width"] - 4, 0).release().perform()  # fmt: skip
    d.find_element(By.ID, "repaint").click()  # type: ignore[attr-defined]
    wait.until(lambda drv: "done: 1 images" in drv.find_element(By.ID, "status").text and not np.array_equal(pixels(), original))
    repainted = pixels()
    assert np.array_equal(repainted[:4], original[:4]) and np.array_equal(repainted[7:], original[7:])
    assert not np.array_equal(repainted[4:7], original[4:7])


def test_page_loads_a_colour_photo_for_a_grey_model(server: ServerProcess, browser: object, tmp_path: Path) -> None:
    """A phone's photo (a 40x30 colour JPEG) loaded into the editor is drawn at the model's size and made grey, and a
    variation of it is made. The picker took PNGs only, and a colour image the server refuses for a grey model: the
    page said "422 ... an RGBA PNG whose red, green and blue differ"."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    rng = np.random.default_rng(0)
    photo = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), "RGB").save(photo, "JPEG")
    d = browser
    d.get(server.url + "/")  # type: ignore[attr-defined]
    WebDriverWait(d, 30).until(lambda drv: "1 x 8 x 8" in drv.find_element(By.ID, "info").text)  # the editor knows the model
    assert d.find_element(By.ID, "upload").get_attribute("accept") == "image/*"  # type: ignore[attr-defined]
    d.find_element(By.ID, "upload").send_keys(str(photo))  # type: ignore[attr-defined]
    _fill(d, {"seed": "3", "batch_size": "1", "steps": "3"})
    d.find_element(By.ID, "vary").click()  # type: ignore[attr-defined]
    WebDriverWait(d, 60, poll_frequency=0.05).until(
        lambda drv: "done" in drv.find_element(By.ID, "status").text or drv.find_element(By.ID, "status").get_attribute("class"))
    assert "done: 1 images" in d.find_element(By.ID, "status").text, d.find_element(By.ID, "status").text  # type: ignore[attr-defined]
    # a portrait: its middle square, not stretched (the commands' --resize alike): red and blue bands above and below a
    # grey 100 middle, drawn at 8x8, are grey 100 everywhere (stretched, the top and bottom rows were the bands' greys)
    portrait = np.zeros((60, 20, 3), dtype=np.uint8)
    portrait[:20], portrait[20:40], portrait[40:] = (255, 0, 0), (100, 100, 100), (0, 0, 255)
    Image.fromarray(portrait).save(tmp_path / "portrait.png")
    d.find_element(By.ID, "upload").send_keys(str(tmp_path / "portrait.png"))  # type: ignore[attr-defined]
    drawn = "const c = editor.image; return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);"
    WebDriverWait(d, 10).until(lambda drv: set(drv.execute_script(drawn)[0::4]) <= {99, 100, 101})


FETCH = """
const [api, token, done] = arguments;
fetch(api + "/generate", {method: "POST", body: JSON.stringify({seed: 1, batch_size: 1, steps: 2}),
                          headers: {"Authorization": "Bearer " + token, "Content-Type": "application/json"}})
  .then(r => r.json().then(j => done({status: r.status, etag: r.headers.get("ETag"), images: (j.images || []).length})))
  .catch(e => done({error: String(e)}));
"""


def test_a_page_of_another_origin_calls_the_api_where_cors_allows_it(server: ServerProcess, browser: object,
                                                                      tmp_path_factory: pytest.TempPathFactory) -> None:  # fmt: skip
    """A front end served from another origin (here another port) fetching /generate with a token, in the real browser:
    refused by Chromium without DDPM_CORS_ALLOW_ORIGINS (no server sent CORS headers before), answered with the ETag
    readable where the server allows that origin."""
    import http.server
    import threading

    from tests.server_process import free_port

    root = tmp_path_factory.mktemp("front-end")
    (root / "index.html").write_text("<!doctype html><title>another app</title>")
    port = free_port()
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(root))  # noqa: E731
    page = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=page.serve_forever, daemon=True).start()
    allowed = ServerProcess(save_tiny_model(tmp_path_factory.mktemp("cors") / "tiny"), DDPM_API_TOKEN="t0ken",
                            DDPM_CORS_ALLOW_ORIGINS=f"http://127.0.0.1:{port}")  # fmt: skip
    try:
        allowed.wait_ready()
        d = browser
        d.set_script_timeout(60)  # type: ignore[attr-defined]
        d.get(f"http://127.0.0.1:{port}/index.html")  # type: ignore[attr-defined]
        answer = d.execute_async_script(FETCH, allowed.url, "t0ken")  # type: ignore[attr-defined]
        assert answer["status"] == 200 and answer["images"] == 1 and answer["etag"], answer
        refused = d.execute_async_script(FETCH, server.url, "t0ken")  # type: ignore[attr-defined]  # the module's server: no CORS
        assert refused == {"error": "TypeError: Failed to fetch"}, refused
    finally:
        allowed.stop()
        page.shutdown()


def test_the_interactive_docs_render_without_the_internet(server: ServerProcess, browser: object) -> None:
    """/docs and /redoc on a network that reaches no other host (the browser resolves none but 127.0.0.1, as on an
    air-gapped cluster or our own machines): FastAPI's own pages loaded Swagger UI and ReDoc from cdn.jsdelivr.net and
    stayed blank; the replica serves fastapi-offline's copy now."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d = browser
    d.get(server.url + "/docs")  # type: ignore[attr-defined]
    paths = WebDriverWait(d, 20).until(lambda d: {e.text for e in d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")})
    assert {"/generate", "/generate/stream", "/v1/images/generations", "/schedule"} <= paths, paths
    d.get(server.url + "/redoc")  # type: ignore[attr-defined]
    WebDriverWait(d, 20).until(lambda d: "POST /generate/stream" in d.find_element(By.TAG_NAME, "body").text.replace("\n", " "))
