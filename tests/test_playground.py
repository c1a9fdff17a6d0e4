"""The /ui/ playground in a real headless Chromium (Debian's, through its chromedriver; nothing is
downloaded): two classes from files, a classification with the right top label, deleting an
example and a class, switching namespace. Screenshots land in the test's tmp dir."""

from __future__ import annotations

import functools
import http.server
import io
import shutil
import threading
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
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # CSP violations land there
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
    labels = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#results .prediction .label")]
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
