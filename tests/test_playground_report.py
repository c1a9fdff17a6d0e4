"""The playground's "Report" panel (static/report.js) and its confidences, in a real headless
Chromium against a real server with the shipped model (the drivers and helpers of test_playground)."""

from __future__ import annotations

from pathlib import Path

import httpx
import test_playground as playground
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from test_playground import blue_stripes, csp_violations, red_discs, wait_for

from fewshot_service.app import ServerStack

# The same server (shipped model) and the same headless Chromium as test_playground.
stack = playground.stack
browser = playground.browser


def upload(client: httpx.Client, label: str, paths: list[Path]) -> dict:
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]
    response = client.post(f"/v1/classes/{label}/examples", files=files)
    assert response.status_code == 201, response.text
    return response.json()


def percent(p: float) -> str:
    """As the playground writes a probability (app.js percent): one decimal under 10%."""
    return f"{p * 100:.{1 if p < 0.1 else 0}f}%"


def test_the_report_panel_shows_what_the_api_reports(
    stack: ServerStack, redis_url: str, browser: WebDriver, tmp_path: Path
) -> None:
    base = f"http://127.0.0.1:{stack.http_port}"
    with httpx.Client(base_url=base, timeout=60) as client:
        upload(client, "red discs", [red_discs(tmp_path / f"r{i}.png", i) for i in range(5)])
        upload(client, "blue stripes", [blue_stripes(tmp_path / f"b{i}.png", i) for i in range(5)])
        upload(client, "few", [red_discs(tmp_path / "f0.png", 9), blue_stripes(tmp_path / "f1.png", 9)])
        report = client.get("/v1/report").json()
    browser.get(base + "/ui/")
    browser.find_element(By.ID, "report-button").click()
    summary = wait_for(browser, "#report .report-summary", "Expected accuracy")
    assert f"{round(report['expected_accuracy'] * 100)}%" in summary.text
    assert "at 3 classes" in summary.text
    rows = browser.find_elements(By.CSS_SELECTOR, "#report .report-classes tbody tr")
    # One row per class, in the API's order (worst first).
    assert [r.get_attribute("data-label") for r in rows] == [c["label"] for c in report["per_class"]]
    few = browser.find_element(By.CSS_SELECTOR, '#report tr[data-label="few"]')
    assert "needs more shots" in few.text
    for judged in report["per_class"]:
        row = browser.find_element(By.CSS_SELECTOR, f'#report tr[data-label="{judged["label"]}"]')
        if judged["loo_accuracy"] is not None:
            assert f"{round(judged['loo_accuracy'] * 100)}%" in row.text
    confused = [p for p in report["confused_pairs"] if p["a_as_b"] + p["b_as_a"]]
    pairs = browser.find_elements(By.CSS_SELECTOR, "#report .report-pair")
    assert len(pairs) == len(confused)
    panel = browser.find_element(By.ID, "report-panel")
    browser.execute_script("arguments[0].scrollIntoView()", panel)
    panel.screenshot(str(tmp_path / "report-panel.png"))

    # On a phone (390 px) the panel fits its width: each class is a card, nothing scrolls sideways.
    browser.set_window_size(390, 844)
    fits = "const e = document.getElementById(arguments[0]); return e.scrollWidth <= e.clientWidth;"
    assert browser.execute_script(fits, "report-panel") and browser.execute_script(fits, "report")
    assert browser.execute_script("return window.innerWidth") <= 400
    card = "return getComputedStyle(document.querySelector('#report tbody tr')).display"
    assert browser.execute_script(card) == "block"  # a card, its cells named by ::before
    browser.execute_script("arguments[0].scrollIntoView()", panel)
    panel.screenshot(str(tmp_path / "report-panel-phone.png"))
    browser.set_window_size(1280, 960)

    # Classify: each score carries its confidence, and "none of these" its probability; the page
    # shows the API's numbers, which sum to at most 100%.
    query = red_discs(tmp_path / "query.png", 7)
    answer = httpx.post(
        base + "/v1/classify", params={"top_k": 5}, files={"files": query.read_bytes()}
    ).json()
    browser.find_element(By.ID, "classify-files").send_keys(str(query))
    wait_for(browser, "#results .prediction .confidence")
    rows = "#results .prediction:not(.unknown-row) .confidence"
    shown = [e.text for e in browser.find_elements(By.CSS_SELECTOR, rows)]
    expected = [percent(p["confidence"]) for p in answer["results"][0]]
    assert shown == expected
    p_unknown = answer["unknown_probability"][0]
    assert sum(p["confidence"] for p in answer["results"][0]) + p_unknown <= 1.0 + 1e-6
    # The confidences and P(unknown) are one distribution: "none of these" is a row of its own.
    unknown_row = browser.find_element(By.CSS_SELECTOR, "#results .prediction.unknown-row .confidence")
    assert unknown_row.text == percent(p_unknown)
    browser.save_screenshot(str(tmp_path / "playground-report.png"))
    assert csp_violations(browser) == []

    # Switching namespace clears the report: it belonged to the other one.
    browser.find_element(By.ID, "namespace-input").send_keys("elsewhere")
    browser.find_element(By.CSS_SELECTOR, "#settings-form button").click()
    wait_for(browser, "#namespace-name", "elsewhere")
    assert browser.find_elements(By.CSS_SELECTOR, "#report .report-summary") == []
    browser.find_element(By.ID, "report-button").click()
    banner = wait_for(browser, "#banner.error")
    assert "409" in banner.text  # no classes there yet: the server's message, shown
