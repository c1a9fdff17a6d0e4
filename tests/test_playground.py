"""The /ui/ playground in a real headless Chromium (Debian's, through its chromedriver; nothing is
downloaded): two classes from files, a classification with the right top label, correcting it
(the image added to another class), deleting an example and a class, switching namespace, and the
layout on a 390x844 phone and a desktop. Screenshots land in the test's tmp dir; docs/development.md
says how to refresh the checked-in ones (docs/playground.png, docs/playground-phone.png)."""

from __future__ import annotations

import functools
import http.server
import io
import json
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from fewshot_service.app import ServerStack

from conftest import REPO_ROOT, stack_settings

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WAIT_S = 30
GREEN, AMBER = "rgba(22, 163, 74, 1)", "rgba(217, 119, 6, 1)"  # style.css --top, --amber
PHONE, DESKTOP = (390, 844), (1280, 800)
CLASS_ROWS = "#results .prediction:not(.unknown-row)"  # one per predicted class
MIN_TARGET_PX = 24  # WCAG 2.2's minimum target size: a finger must hit every control


def red_discs(path: Path, seed: int) -> Path:
    image = Image.new("RGB", (96, 96), (250, 240 - seed * 8, 230))
    draw = ImageDraw.Draw(image)
    for i in range(3):
        x, y = 10 + (seed * 13 + i * 29) % 60, 8 + (seed * 7 + i * 31) % 60
        draw.ellipse((x, y, x + 26, y + 26), fill=(220 - seed * 5, 20, 30))
    image.save(path)
    return path


def blue_stripes(path: Path, seed: int) -> Path:
    image = Image.new("RGB", (96, 96), (230, 235, 250))
    draw = ImageDraw.Draw(image)
    for x in range(seed % 4, 96, 12):
        draw.rectangle((x, 0, x + 5, 95), fill=(20, 40, 200 + seed * 5))
    image.save(path)
    return path


@pytest.fixture(scope="module")
def stack(private_redis) -> Iterator[ServerStack]:
    # The shipped default model: what a new user sees, and a realistic top-1.
    settings = stack_settings(REPO_ROOT / "models" / "default.onnx", private_redis.url)
    with ServerStack(settings) as running:
        yield running


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    assert not missing, f"{missing} not installed: `make test` installs chromium and chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,960",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    # CSP violations land in "browser"; every request the page makes in "performance".
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    # An explicit driver path: Selenium Manager never tries to download one.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def csp_violations(driver: WebDriver) -> list[str]:
    """The console's Content-Security-Policy complaints since the last call (the log is drained)."""
    return [e["message"] for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]


def wait_for(driver: WebDriver, css: str, text: str | None = None):
    wait = WebDriverWait(driver, WAIT_S)
    if text is None:
        return wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, css)))
    wait.until(EC.text_to_be_present_in_element((By.CSS_SELECTOR, css), text))
    return driver.find_element(By.CSS_SELECTOR, css)


def add_class(driver: WebDriver, label: str, images: list[Path]) -> None:
    label_input = driver.find_element(By.ID, "label-input")
    label_input.clear()
    label_input.send_keys(label)
    driver.find_element(By.ID, "add-files").send_keys("\n".join(str(p) for p in images))
    driver.find_element(By.ID, "add-button").click()
    plural = "" if len(images) == 1 else "s"
    wait_for(driver, f'.class-card[data-label="{label}"] .count', f"{len(images)} example{plural}")


def test_every_playground_script_loads_without_an_error(stack: ServerStack, browser: WebDriver) -> None:
    """app.js, gallery.js and report.js share one global scope: a name declared twice (or any other
    error) stops a whole script, which no single panel's test would name."""
    base = f"http://127.0.0.1:{stack.http_port}"
    browser.get_log("browser")  # drain what earlier pages left
    browser.get(base + "/ui/")
    wait_for(browser, "#model-info", stack.core.model_id)
    loaded = browser.execute_script(
        "return [typeof window.fewshot, typeof Gallery, typeof loadReport].join(' ')"
    )
    assert loaded == "object object function"
    severe = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []


def test_playground_creates_two_classes_from_files_and_classifies_an_image(
    stack: ServerStack, redis_url: str, browser: WebDriver, tmp_path: Path
) -> None:
    base = f"http://127.0.0.1:{stack.http_port}"
    reds = [red_discs(tmp_path / f"red{i}.png", i) for i in range(5)]
    blues = [blue_stripes(tmp_path / f"blue{i}.png", i) for i in range(5)]
    query = red_discs(tmp_path / "query.png", 7)

    browser.get(base + "/")  # redirects to /ui/
    assert browser.current_url == base + "/ui/"
    wait_for(browser, "#model-info", stack.core.model_id)
    wait_for(browser, "#classes", "No classes yet")

    add_class(browser, "red discs", reds)
    add_class(browser, "blue stripes", blues)
    # Each example shows the server's stored copy (fetched with the key, shown from a blob: URL).
    WebDriverWait(browser, WAIT_S).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, '.class-card[data-label="red discs"] .thumb img')) == 5
    )
    sources = [
        img.get_attribute("src")
        for img in browser.find_elements(By.CSS_SELECTOR, '.class-card[data-label="red discs"] .thumb img')
    ]
    assert all(src.startswith("blob:") for src in sources), sources

    browser.find_element(By.ID, "classify-files").send_keys(str(query))
    top = wait_for(browser, "#results .prediction .label")
    labels = [e.text for e in browser.find_elements(By.CSS_SELECTOR, f"{CLASS_ROWS} .label")]
    assert top.text == "red discs", labels
    assert sorted(labels) == ["blue stripes", "red discs"]
    browser.save_screenshot(str(tmp_path / "playground.png"))
    assert (tmp_path / "playground.png").stat().st_size > 10_000
    assert csp_violations(browser) == []  # the page works under its Content-Security-Policy

    # "unknown" is shown exactly when the server flags the image (here: noise, and the query above).
    noise = tmp_path / "noise.png"
    Image.effect_noise((96, 96), 120).convert("RGB").save(noise)
    for image in (query, noise):
        with image.open("rb") as handle:
            answer = httpx.post(base + "/v1/classify", files={"files": (image.name, handle)}).json()
        browser.execute_script("document.getElementById('results').replaceChildren()")
        browser.find_element(By.ID, "classify-files").send_keys(str(image))
        wait_for(browser, "#results .prediction .label")  # this image's answer, not the last one
        shown = browser.find_elements(By.CSS_SELECTOR, "#results .unknown")
        assert bool(shown) == answer["unknown"][0], (image.name, answer)
        # The top bar is green for an answer, amber when the image is flagged unknown.
        top_fill = browser.find_element(By.CSS_SELECTOR, "#results .prediction.top .fill")
        colour = top_fill.value_of_css_property("background-color")
        assert colour == (AMBER if answer["unknown"][0] else GREEN), (image.name, colour)

    # The page used the public API: the server holds what the page shows.
    listed = httpx.get(base + "/v1/classes").json()["classes"]
    assert {c["label"]: c["count"] for c in listed} == {"red discs": 5, "blue stripes": 5}


def test_playground_deletes_examples_and_classes_and_switches_namespace(
    stack: ServerStack, redis_url: str, browser: WebDriver, tmp_path: Path
) -> None:
    base = f"http://127.0.0.1:{stack.http_port}"
    # A class added by another client shows its stored images too; one added while the server
    # kept no images (--no-store-images) shows a neutral tile with the example id.
    with httpx.Client(base_url=base) as client:
        client.post(
            "/v1/classes/elsewhere/examples",
            files=[("files", ("b.png", blue_stripes(tmp_path / "b.png", 1).read_bytes(), "image/png"))],
        ).raise_for_status()
    assert stack.core is not None
    stack.core.store_images = False
    try:
        bare = stack.core.add_examples(None, "bare", [red_discs(tmp_path / "x.png", 3).read_bytes()])
    finally:
        stack.core.store_images = True
    browser.get(base + "/ui/")
    wait_for(browser, '.class-card[data-label="elsewhere"] .thumb img')
    tile = wait_for(browser, '.class-card[data-label="bare"] .thumb.no-image')
    assert bare.example_ids[0][:8] in tile.text

    add_class(browser, "two", [red_discs(tmp_path / f"r{i}.png", i) for i in range(2)])
    remove = browser.find_element(By.CSS_SELECTOR, '.class-card[data-label="two"] .thumb .remove')
    assert remove.is_displayed()  # no hover needed: touch screens have none
    remove.click()
    asked = WebDriverWait(browser, WAIT_S).until(EC.alert_is_present())
    assert 'of class "two"' in asked.text
    asked.dismiss()  # a stray click, taken back: nothing is deleted
    assert httpx.get(base + "/v1/classes/two").json()["count"] == 2
    browser.find_element(By.CSS_SELECTOR, '.class-card[data-label="two"] .thumb .remove').click()
    WebDriverWait(browser, WAIT_S).until(EC.alert_is_present()).accept()
    wait_for(browser, '.class-card[data-label="two"] .count', "1 example")
    assert httpx.get(base + "/v1/classes/two").json()["count"] == 1

    browser.find_element(By.CSS_SELECTOR, '.class-card[data-label="two"] .delete-class').click()
    WebDriverWait(browser, WAIT_S).until(EC.alert_is_present()).accept()
    wait_for(browser, "#banner", 'Deleted class "two"')
    assert httpx.get(base + "/v1/classes/two").status_code == 404

    namespace = browser.find_element(By.ID, "namespace-input")
    namespace.send_keys("team-b")
    browser.find_element(By.CSS_SELECTOR, "#settings-form button").click()
    wait_for(browser, "#namespace-name", "team-b")
    wait_for(browser, "#classes", "No classes yet")
    add_class(browser, "only-in-b", [red_discs(tmp_path / "b0.png", 0)])
    assert [c["label"] for c in httpx.get(base + "/v1/classes?namespace=team-b").json()["classes"]] == [
        "only-in-b"
    ]
    browser.save_screenshot(str(tmp_path / "playground-namespace.png"))
    assert csp_violations(browser) == []


def test_playground_shows_an_api_error_clearly(
    stack: ServerStack, redis_url: str, browser: WebDriver, tmp_path: Path
) -> None:
    base = f"http://127.0.0.1:{stack.http_port}"
    browser.get(base + "/ui/")
    wait_for(browser, "#classes", "No classes yet")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    browser.find_element(By.ID, "classify-files").send_keys(str(broken))
    # No classes yet: the server's 409 message, not a blank page.
    banner = wait_for(browser, "#banner.error")
    assert banner.text.startswith("Error 4"), banner.text


def test_swagger_ui_renders_the_api_from_local_assets(stack: ServerStack, browser: WebDriver) -> None:
    browser.get(f"http://127.0.0.1:{stack.http_port}/docs")
    # Operations rendered means the bundle loaded (from /docs-assets) and read the OpenAPI 3.1 document.
    wait_for(browser, ".opblock-summary-path")
    wait_for(browser, "#swagger-ui", "/v1/classify")
    assert "/v1/info" in browser.find_element(By.ID, "swagger-ui").text
    assert csp_violations(browser) == []


def test_redoc_renders_the_api_from_local_assets(stack: ServerStack, browser: WebDriver) -> None:
    browser.get(f"http://127.0.0.1:{stack.http_port}/redoc")
    wait_for(browser, "body", "/v1/classify")  # ReDoc's bundle ran and rendered the operations
    assert csp_violations(browser) == []


def requested_urls(driver: WebDriver) -> list[str]:
    """Every URL the browser asked for since the last call (DevTools' network events)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


@pytest.mark.parametrize(
    ("page", "rendered"), [("/ui/", "#model-info"), ("/docs", ".opblock"), ("/redoc", "[role=menuitem]")]
)
def test_pages_load_nothing_from_another_host(
    stack: ServerStack, browser: WebDriver, page: str, rendered: str
) -> None:
    """Offline-ready and private: the page, its scripts, styles, images (ReDoc's logo too) and icon
    all come from this server; no element points a src at another host."""
    base = f"http://127.0.0.1:{stack.http_port}"
    requested_urls(browser)  # drained: the browser's own start page is not this one's
    browser.get(base + page)
    wait_for(browser, rendered)
    time.sleep(1)  # images a rendered page draws after its first paint (ReDoc's logo was one)
    urls = requested_urls(browser)
    assert any(u.endswith(".js") for u in urls), urls
    elsewhere = [u for u in urls if not u.startswith((base + "/", "data:", "blob:", "chrome:"))]
    assert elsewhere == [], elsewhere
    sources = browser.execute_script(
        "return [...document.querySelectorAll('[src], link[href]')].map(e => e.src || e.href)"
    )
    assert [u for u in sources if re.match(r"https?://", u) and not u.startswith(base + "/")] == []
    favicon = browser.execute_script(
        "const l = document.querySelector('link[rel~=icon]'); return l && l.href"
    )
    assert favicon and favicon.startswith(base + "/"), favicon
    assert httpx.get(favicon).status_code == 200


@pytest.mark.parametrize("page", ["/ui/", "/docs", "/v1/classes"])
def test_another_origin_cannot_frame_the_server(
    stack: ServerStack, browser: WebDriver, tmp_path: Path, page: str
) -> None:
    """A page on another origin (here localhost:<other port>) frames the playground: the browser
    refuses (frame-ancestors 'none'), so no click in it can be hijacked."""
    target = f"http://127.0.0.1:{stack.http_port}{page}"
    (tmp_path / "frame.html").write_text(f'<!doctype html><iframe id="f" src="{target}"></iframe>')
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as other:
        threading.Thread(target=other.serve_forever, daemon=True).start()
        try:
            browser.get(f"http://localhost:{other.server_address[1]}/frame.html")
            refused = WebDriverWait(browser, WAIT_S).until(lambda d: csp_violations(d))
        finally:
            other.shutdown()
    assert any("frame-ancestors 'none'" in message for message in refused), refused


def test_playground_lists_many_classes_a_page_at_a_time_with_a_search(
    stack: ServerStack, redis_url: str, browser: WebDriver
) -> None:
    assert stack.core is not None
    base = f"http://127.0.0.1:{stack.http_port}"
    rng = np.random.default_rng(250)
    labels = [f"item {i:03d}" for i in range(250)]
    stack.core.registry.add_classes(
        "default",
        {label: rng.standard_normal((1, stack.core.embedder.meta.embedding_dim)) for label in labels},
        stack.core.model_id,
    )
    browser.get(base + "/ui/")
    wait_for(browser, '.class-card[data-label="item 049"]')

    def cards() -> list[str]:  # read in one script: the list is re-rendered while we look
        return browser.execute_script(
            'return [...document.querySelectorAll(".class-card")].map(c => c.dataset.label)'
        )

    assert cards() == labels[:50]  # the first page only, by label
    more = wait_for(browser, "#more-classes")

    search = browser.find_element(By.ID, "class-search")
    search.send_keys("ITEM 123")
    WebDriverWait(browser, WAIT_S).until(lambda _: cards() == ["item 123"])
    assert browser.find_element(By.ID, "more-classes").is_displayed() is False
    search.clear()
    search.send_keys(" ")  # an input event with an empty search: the whole list again
    WebDriverWait(browser, WAIT_S).until(lambda _: cards() == labels[:50])

    more = wait_for(browser, "#more-classes")
    browser.execute_script("arguments[0].scrollIntoView()", more)  # scrolling to it loads the next page
    WebDriverWait(browser, WAIT_S).until(lambda _: len(cards()) >= 100)
    assert cards()[:100] == labels[:100]
    while browser.find_element(By.ID, "more-classes").is_displayed():
        count = len(cards())
        browser.execute_script("arguments[0].click()", browser.find_element(By.ID, "more-classes"))
        WebDriverWait(browser, WAIT_S).until(lambda _, count=count: len(cards()) > count)
    assert cards() == labels  # every page once, none twice
    assert csp_violations(browser) == []


# --- the class galleries (gallery.js) -------------------------------------------------------------


def use_namespace(driver: WebDriver, namespace: str) -> None:
    field = driver.find_element(By.ID, "namespace-input")
    field.clear()
    field.send_keys(namespace)
    driver.find_element(By.CSS_SELECTOR, "#settings-form button").click()
    wait_for(driver, "#namespace-name", namespace)


def tiny_png(i: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (24, 24), (i % 256, (i * 7) % 256, (i * 13) % 256)).save(out, format="PNG")
    return out.getvalue()


def image_requests(driver: WebDriver) -> list[str]:
    """The example images this page has fetched (the browser's resource timing entries)."""
    return driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name).filter(n => n.includes('/image?'))"
    )


def test_gallery_tiles_show_the_flags_the_server_reports(
    stack: ServerStack, redis_url: str, browser: WebDriver, tmp_path: Path
) -> None:
    """Embeddings written directly (with real stored images), so each flag is there by design:
    one shot of "cats" is a dog (closer to "dogs"), one repeats another, one fits cats poorly."""
    assert stack.core is not None
    registry, model_id = stack.core.registry, stack.core.model_id
    dim = stack.core.embedder.meta.embedding_dim
    rng = np.random.default_rng(35)
    axis = np.eye(dim, dtype=np.float32)
    # Noise enough that no two distinct cats reach the duplicate threshold.
    cats = [axis[0] + 0.05 * rng.standard_normal(dim) for _ in range(8)]
    cats += [0.3 * axis[0] + 0.95 * axis[5], axis[1] + 0.05 * rng.standard_normal(dim), cats[0]]
    ids = registry.add_examples(
        "flags", "cats", np.array(cats), model_id, [tiny_png(i) for i in range(11)]
    ).example_ids
    dogs = [axis[1] + 0.05 * rng.standard_normal(dim) for _ in range(3)]
    registry.add_examples("flags", "dogs", np.array(dogs), model_id, [tiny_png(50 + i) for i in range(3)])
    odd, dog, twin = ids[8], ids[9], ids[10]

    base = f"http://127.0.0.1:{stack.http_port}"
    browser.get(base + "/ui/")
    use_namespace(browser, "flags")
    wait_for(browser, '.class-card[data-label="cats"] .gallery-tile img')

    def flags() -> dict[str, list[str]]:
        return browser.execute_script(
            "const out = {};"
            "for (const t of document.querySelectorAll('.class-card[data-label=\"cats\"] .gallery-tile'))"
            "  out[t.dataset.exampleId] = [...t.querySelectorAll('.flag')].map(f => f.dataset.flag + ':' + f.textContent);"
            "return out;"
        )

    shown = flags()
    assert shown[dog] == ['mislabel:closer to "dogs"']
    assert shown[twin] == [f"duplicate:duplicate of #{ids[0]}"]
    assert shown[odd] == ["low:low consistency"]
    assert all(not shown[i] for i in ids[:8]), shown
    order = browser.execute_script(
        "return [...document.querySelectorAll('.class-card[data-label=\"cats\"] .gallery-tile')].map(t => t.dataset.exampleId)"
    )
    assert set(order[:3]) == {odd, dog, twin}  # flagged shots first: they are what needs a look
    browser.save_screenshot(str(tmp_path / "gallery.png"))

    # Deleting the dog from its tile: one tap, a confirmation, and the flag is gone with it.
    browser.find_element(By.CSS_SELECTOR, f'.gallery-tile[data-example-id="{dog}"] .remove').click()
    WebDriverWait(browser, WAIT_S).until(EC.alert_is_present()).accept()
    wait_for(browser, '.class-card[data-label="cats"] .count', "10 examples")
    assert dog not in flags()
    assert csp_violations(browser) == []  # blob: images are allowed by the playground's policy


def test_gallery_loads_images_lazily(stack: ServerStack, redis_url: str, browser: WebDriver) -> None:
    assert stack.core is not None
    dim = stack.core.embedder.meta.embedding_dim
    rng = np.random.default_rng(200)
    vectors = rng.standard_normal((200, dim)).astype(np.float32)
    stack.core.registry.add_examples(
        "lazy", "many", vectors, stack.core.model_id, [tiny_png(i) for i in range(200)]
    )

    base = f"http://127.0.0.1:{stack.http_port}"
    browser.get(base + "/ui/")
    use_namespace(browser, "lazy")
    wait_for(browser, '.class-card[data-label="many"] .gallery-tile img')
    WebDriverWait(browser, WAIT_S).until(
        lambda d: not d.find_elements(By.CSS_SELECTOR, '.class-card[data-label="many"] .gallery-tile.loading')
    )
    first_view = image_requests(browser)
    assert 0 < len(first_view) <= 24, len(first_view)  # a screenful, not 200

    browser.find_element(By.CSS_SELECTOR, '.class-card[data-label="many"] .show-all').click()
    last = browser.find_elements(By.CSS_SELECTOR, '.class-card[data-label="many"] .gallery-tile')[-1]
    assert len(browser.find_elements(By.CSS_SELECTOR, '.class-card[data-label="many"] .gallery-tile')) == 200
    browser.execute_script("arguments[0].scrollIntoView()", last)
    WebDriverWait(browser, WAIT_S).until(lambda _: last.find_elements(By.TAG_NAME, "img"))
    after = image_requests(browser)
    assert len(after) < 200, len(after)  # the tiles scrolled past were never in view
    assert len(after) == len(set(after))  # and none was fetched twice
    assert csp_violations(browser) == []


@pytest.fixture(scope="module")
def keyed_stack(
    private_redis, tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerStack]:
    from test_access import write_key_file

    key_file = tmp_path_factory.mktemp("keys") / "api-keys.toml"
    write_key_file(key_file, {"reader": ("gallery-reader-key", "read", ["default"])})
    settings = stack_settings(
        tiny_model_path, private_redis.url, redis_key_prefix="gallery-keys", api_keys=key_file
    )
    with ServerStack(settings) as running:
        yield running


def test_gallery_fetches_images_with_the_api_key(keyed_stack: ServerStack, browser: WebDriver) -> None:
    """An <img src> cannot carry the key: the page fetches each image with it and shows a blob."""
    assert keyed_stack.core is not None
    keyed_stack.core.add_examples(None, "kept", [tiny_png(1), tiny_png(2)])
    base = f"http://127.0.0.1:{keyed_stack.http_port}"
    assert httpx.get(base + "/v1/classes/kept/examples/1/image").status_code == 401
    browser.get(base + "/ui/")
    browser.find_element(By.ID, "api-key-input").send_keys("gallery-reader-key")
    browser.find_element(By.CSS_SELECTOR, "#settings-form button").click()
    WebDriverWait(browser, WAIT_S).until(
        lambda d: (
            len(d.find_elements(By.CSS_SELECTOR, '.class-card[data-label="kept"] .gallery-tile img')) == 2
        )
    )
    sources = browser.execute_script(
        "return [...document.querySelectorAll('.gallery-tile img')].map(i => i.src)"
    )
    assert all(src.startswith("blob:") for src in sources), sources
    assert csp_violations(browser) == []


# Every visible control, whatever panel it is in (panels added later are covered too): inside the
# viewport horizontally, and tall enough to tap. Inline text links are exempt from the size rule.
LAYOUT_SCRIPT = """
const width = document.documentElement.clientWidth;
const controls = [], outside = [], small = [];
for (const el of document.querySelectorAll('button, input, select, textarea, a, label.button')) {
  const r = el.getBoundingClientRect();
  const style = getComputedStyle(el);
  if (!r.width || !r.height || style.visibility === 'hidden') continue;
  const name = el.id || el.className || el.textContent.trim().slice(0, 20) || el.tagName;
  controls.push(name);
  if (r.left < -0.5 || r.right > width + 0.5) outside.push([name, r.left, r.right]);
  if (el.tagName !== 'A' && el.type !== 'file' && r.height < arguments[0]) small.push([name, r.height]);
}
const results = document.getElementById('results').getBoundingClientRect().width;
const bars = [...document.querySelectorAll('#results .prediction .bar')].map(b => b.getBoundingClientRect());
return {
  width, innerWidth: window.innerWidth, scrollWidth: document.documentElement.scrollWidth,
  controls, outside, small, results,
  bars: bars.map(r => [r.width, r.height]),
};
"""


def set_viewport(driver: WebDriver, size: tuple[int, int], *, mobile: bool) -> None:
    """Emulate the screen (as DevTools' device mode does): the meta viewport applies on `mobile`."""
    width, height = size
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile},
    )
    driver.execute_script("window.scrollTo(0, 0)")
    WebDriverWait(driver, WAIT_S).until(lambda d: d.execute_script("return window.innerWidth") == width)


def assert_fits(driver: WebDriver, size: tuple[int, int]) -> dict:
    layout = driver.execute_script(LAYOUT_SCRIPT, MIN_TARGET_PX)
    assert layout["innerWidth"] == size[0], layout
    assert layout["scrollWidth"] <= layout["width"], f"sideways scroll at {size}: {layout}"
    assert len(layout["controls"]) >= 10, layout  # the page's controls were found
    assert layout["outside"] == [], f"controls off screen at {size}: {layout['outside']}"
    assert layout["small"] == [], f"controls too small to tap at {size}: {layout['small']}"
    # Score bars span most of the answer, readable on a phone (they were 20 px pills).
    assert layout["bars"], layout
    for bar_width, bar_height in layout["bars"]:
        assert bar_width >= 0.5 * layout["results"] and bar_width >= 150, layout
        assert bar_height >= 8, layout
    # The key field and its button are on the first screen, without scrolling.
    for element_id in ("namespace-input", "api-key-input"):
        box = driver.find_element(By.ID, element_id).rect
        assert box["y"] + box["height"] <= size[1], (element_id, box)
    use = driver.find_element(By.CSS_SELECTOR, "#settings-form button").rect
    assert use["y"] + use["height"] <= size[1] and use["x"] + use["width"] <= size[0], use
    return layout


def small_screenshot(driver: WebDriver, path: Path) -> Path:
    """The viewport as a 64-colour PNG: small enough to check in (the page has few colours)."""
    raw = path.with_suffix(".raw.png")
    driver.save_screenshot(str(raw))
    Image.open(raw).convert("RGB").quantize(64).save(path, optimize=True)
    raw.unlink()
    return path


def test_playground_corrects_an_answer_and_fits_a_phone_and_a_desktop(
    stack: ServerStack, redis_url: str, browser: WebDriver, tmp_path: Path
) -> None:
    base = f"http://127.0.0.1:{stack.http_port}"
    long_label = "a class whose label is far too long to fit on one line of a phone screen at all"
    with httpx.Client(base_url=base) as client:  # added elsewhere: a long label in the list
        for i in range(2):
            image = blue_stripes(tmp_path / f"long{i}.png", i + 5)
            client.post(
                f"/v1/classes/{long_label}/examples", files=[("files", (image.name, image.read_bytes()))]
            ).raise_for_status()
    browser.get(base + "/ui/")
    set_viewport(browser, DESKTOP, mobile=False)
    wait_for(browser, "#model-info", stack.core.model_id)
    add_class(browser, "red discs", [red_discs(tmp_path / f"red{i}.png", i) for i in range(5)])
    add_class(browser, "blue stripes", [blue_stripes(tmp_path / f"blue{i}.png", i) for i in range(5)])
    title = browser.find_element(By.CSS_SELECTOR, f'.class-card[data-label="{long_label}"] .class-label')
    assert title.get_attribute("title") == long_label  # cut with an ellipsis: the whole label on hover
    wait_for(browser, "#banner", 'Added 5 example(s) to new class "blue stripes"')

    query = red_discs(tmp_path / "query.png", 7)
    with query.open("rb") as handle:
        answer = httpx.post(base + "/v1/classify?top_k=5", files={"files": (query.name, handle)}).json()
    browser.find_element(By.ID, "classify-files").send_keys(str(query))
    wait_for(browser, "#results .prediction .label")
    assert not browser.find_element(By.ID, "banner").is_displayed()  # "Added ..." was the last step's
    # Each prediction's confidence is on the page as a percentage, beside its score.
    rows = browser.find_elements(By.CSS_SELECTOR, CLASS_ROWS)
    assert len(rows) == len(answer["results"][0]) == 3
    for row, prediction in zip(rows, answer["results"][0], strict=True):
        assert row.find_element(By.CSS_SELECTOR, ".label").get_attribute("title") == prediction["label"]
        assert row.find_element(By.CSS_SELECTOR, ".score").text == f"{prediction['score']:.3f}"
        shown = row.find_element(By.CSS_SELECTOR, ".confidence").text
        assert re.fullmatch(r"\d+(\.\d)?%", shown), shown
        assert abs(float(shown[:-1]) / 100 - prediction["confidence"]) <= 0.005, (shown, prediction)
    unknown_rows = browser.find_elements(By.CSS_SELECTOR, "#results .prediction.unknown-row")
    if "unknown_probability" in answer:  # a row of its own when the server gives it
        [row] = unknown_rows
        shown = row.find_element(By.CSS_SELECTOR, ".confidence").text
        probability = answer["unknown_probability"]
        probability = probability[0] if isinstance(probability, list) else probability
        assert abs(float(shown[:-1]) / 100 - probability) <= 0.005, (shown, probability)
    else:
        assert unknown_rows == []

    # Every control on screen and tappable, at both sizes (the screenshots of docs/ are these).
    layout = assert_fits(browser, DESKTOP)
    small_screenshot(browser, tmp_path / "playground.png")
    set_viewport(browser, PHONE, mobile=True)
    phone = assert_fits(browser, PHONE)
    assert set(layout["controls"]) == set(phone["controls"])  # nothing hidden away on the phone
    small_screenshot(browser, tmp_path / "playground-phone.png")
    for name in ("playground.png", "playground-phone.png"):
        assert 5_000 < (tmp_path / name).stat().st_size < 150_000, name

    # Correct-and-add (on the phone): prefilled with the predicted class; corrected to another,
    # that class grows by one.
    correct = wait_for(browser, "#correct-label")
    assert correct.get_attribute("value") == answer["results"][0][0]["label"]
    correct.clear()
    correct.send_keys("blue stripes")
    assert "existing class" in browser.find_element(By.ID, "correct-hint").text
    browser.find_element(By.ID, "correct-button").click()
    wait_for(browser, '.class-card[data-label="blue stripes"] .count', "6 examples")
    wait_for(browser, "#banner", '"blue stripes" (now 6 examples)')
    # The message stays in view where the page has scrolled to (on a phone the form is a screen down).
    assert browser.execute_script("return window.scrollY") > 0
    top = browser.execute_script("return document.getElementById('banner').getBoundingClientRect().top")
    assert 0 <= top < PHONE[1] / 2, top
    assert httpx.get(base + "/v1/classes/blue stripes").json()["count"] == 6
    assert not browser.find_element(By.ID, "correct-form").is_displayed()  # added once
    # Its thumbnail is the query's, cached like any example added here.
    assert (
        len(browser.find_elements(By.CSS_SELECTOR, '.class-card[data-label="blue stripes"] .thumb img')) == 6
    )

    # Again, into a new class: the shot-quality warnings of the add are shown with it.
    browser.find_element(By.ID, "classify-files").send_keys(str(query))
    correct = wait_for(browser, "#correct-label")
    correct.clear()
    correct.send_keys("more red")
    assert "new class" in browser.find_element(By.ID, "correct-hint").text
    browser.find_element(By.ID, "correct-button").click()
    wait_for(browser, '.class-card[data-label="more red"] .count', "1 example")
    banner = wait_for(browser, "#banner", 'new class "more red"')
    with query.open("rb") as handle:  # the same bytes again: a near duplicate of "more red"'s shot
        again = httpx.post(
            base + "/v1/classes/more red/examples", files={"files": (query.name, handle)}
        ).json()
    assert again["warnings"], again
    browser.find_element(By.ID, "classify-files").send_keys(str(query))
    correct = wait_for(browser, "#correct-label")
    correct.clear()
    correct.send_keys("more red")
    browser.find_element(By.ID, "correct-button").click()
    banner = wait_for(browser, "#banner.warn li")
    assert "duplicate" in banner.text.lower(), banner.text
    assert_fits(browser, PHONE)  # with the warnings' banner too
    browser.find_element(By.CSS_SELECTOR, "#banner .banner-close").click()
    assert not browser.find_element(By.ID, "banner").is_displayed()

    assert csp_violations(browser) == []

    # An answer that carries the probability of "none of these" (`unknown_probability`, one per
    # image) shows it as a row of its own, amber like the flagged top bar.
    browser.execute_script(
        "renderResults(new File([''], 'x.png'), [{label: 'x', score: 0.41, confidence: 0.55}], true, 0.3)"
    )
    row = wait_for(browser, "#results .prediction.unknown-row")
    assert row.find_element(By.CSS_SELECTOR, ".confidence").text == "30%"
    assert row.find_element(By.CSS_SELECTOR, ".fill").value_of_css_property("background-color") == AMBER
