"""The search page driven in a real headless Chromium (Selenium): upload, grid, float/binary, click to search."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from normsoftmax.checkpoint import load_embedder
from normsoftmax.config import ServeConfig
from normsoftmax.search import BackgroundServer, SearchIndex, create_app

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _browser_and_driver() -> tuple[str | None, str | None]:
    browser = next((shutil.which(name) for name in CHROMIUM_NAMES if shutil.which(name)), None)
    return browser, shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, chromedriver = _browser_and_driver()
    if chromium is None or chromedriver is None:
        pytest.skip(f"no Chromium ({' / '.join(CHROMIUM_NAMES)}) or chromedriver on PATH "
                    "(Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver  # a test dependency (pip install -e .[test]): missing, the test fails
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--no-first-run", "--window-size=1280,1000",
                     f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def served(search_index):
    """The shared tiny run (dim 64), its 48 images in a flat index, served on 127.0.0.1:
    ``(base_url, embeddings)``."""
    run_dir, index_dir, embeddings = search_index
    app = create_app(load_embedder(run_dir, "cpu"), SearchIndex.open(index_dir), ServeConfig(device="cpu"))
    with BackgroundServer(app) as server:
        yield server.url, embeddings


def _wait_for_results(driver, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(
        lambda d: d.execute_script("return document.body.dataset.state") in ("done", "error"))
    assert driver.execute_script("return document.body.dataset.state") == "done", \
        driver.find_element("id", "status").text
    WebDriverWait(driver, timeout).until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))
    return driver.find_elements("css selector", "#results .result")


def _mark_stale(driver):
    driver.execute_script("document.body.dataset.state = 'stale'")


def test_upload_a_query_see_the_grid_switch_to_binary_and_click_a_result(browser, served, tmp_path):
    url, stored = served
    codes = np.packbits(stored.embeddings > 0, axis=1)
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    # A query whose sign pattern no other image shares, so it is first under Hamming distance too.
    row = next(r for r in range(7, len(stored)) if counts[inverse.reshape(-1)[r]] == 1)
    browser.get(url + "/")
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(lambda d: "48 images" in d.find_element("id", "info").text)

    browser.find_element("css selector", "input[type=file]").send_keys(stored.paths[row])
    results = _wait_for_results(browser)
    assert len(results) == 12  # the service's default k, read from /healthz
    first = results[0]
    assert (first.get_attribute("data-id"), first.get_attribute("data-path")) == (str(row), stored.paths[row])
    assert first.find_element("css selector", ".score").text.endswith("cosine 1.0000")
    scores = [float(card.get_attribute("data-score")) for card in results]
    assert scores == sorted(scores, reverse=True) and scores[-1] < scores[0]
    assert browser.find_element("id", "query-caption").text.endswith("(uploaded)")
    browser.save_screenshot(str(tmp_path / "search_page_float.png"))

    _mark_stale(browser)
    browser.find_element("css selector", "input[name=kind][value=binary]").click()
    results = _wait_for_results(browser)
    assert results[0].get_attribute("data-id") == str(row)
    assert results[0].find_element("css selector", ".score").text.startswith("1. Hamming 0")

    clicked = results[2].get_attribute("data-id")
    _mark_stale(browser)
    results[2].click()
    results = _wait_for_results(browser)
    assert results[0].get_attribute("data-id") == clicked  # the clicked image is now the query
    assert browser.find_element("id", "query-caption").text.startswith(f"#{clicked} ")
    browser.save_screenshot(str(tmp_path / "search_page_clicked.png"))
    for name in ("search_page_float.png", "search_page_clicked.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_page_shows_the_services_refusal(browser, served, tmp_path):
    url, _ = served
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not pixels")
    browser.get(url + "/")
    browser.find_element("css selector", "input[type=file]").send_keys(str(not_an_image))
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return document.body.dataset.state") == "error")
    assert browser.find_element("id", "status").text.startswith("Search failed — 415: the upload is not an image")
    assert browser.find_elements("css selector", "#results .result") == []


def test_the_page_marks_matches_sends_its_key_and_shows_labels_and_metadata(browser, search_index, tmp_path):
    """A served copy whose reads need a key, with thresholds (a cosine that some neighbours reach and others do
    not) and one item added with a label and metadata: the page asks for the key, sends it, shows the item's label
    and metadata, and marks exactly the neighbours at or above the threshold as matches."""
    import httpx
    from selenium.webdriver.support.ui import WebDriverWait

    from normsoftmax.search.keys import ApiKeys

    run_dir, index_dir, stored = search_index
    folder = tmp_path / "index"
    shutil.copytree(index_dir, folder)
    key = "page-key-" + "x" * 20
    (tmp_path / "keys.txt").write_text(f"{key} write\n{'r' * 20} read\n")
    index = SearchIndex.open(folder)
    neighbours = index.search_items([3], k=12)
    threshold = float((neighbours.scores[0, 3] + neighbours.scores[0, 4]) / 2)  # four neighbours at or above it
    thresholds = {"float": {"threshold": threshold, "target": "precision>=0.99"}, "file": "calibration.json"}
    app = create_app(load_embedder(run_dir, "cpu"), index, ServeConfig(device="cpu"), thresholds=thresholds,
                     keys=ApiKeys.read_file(tmp_path / "keys.txt"))
    with BackgroundServer(app) as server:
        added = httpx.post(f"{server.url}/items", headers={"Authorization": f"Bearer {key}"},
                           files={"image": ("copy.jpg", Path(stored.paths[3]).read_bytes(), "image/jpeg")},
                           data={"label": "the copy", "metadata": '{"sku": "X-3"}'}, timeout=60)
        assert added.status_code == 200, added.text
        browser.get(server.url + "/")
        WebDriverWait(browser, 30).until(lambda d: d.find_element("id", "key-box").is_displayed())
        browser.find_element("id", "key").send_keys(key)
        browser.execute_script("document.getElementById('key').dispatchEvent(new Event('change'))")
        browser.find_element("css selector", "input[type=file]").send_keys(stored.paths[3])
        results = _wait_for_results(browser)  # every thumbnail loaded: fetched with the key
        decided = [(float(card.get_attribute("data-score")), card.get_attribute("data-match")) for card in results]
        assert all(match == str(score >= threshold).lower() for score, match in decided)
        assert sum(match == "true" for _, match in decided) >= 4
        assert "match" in results[0].find_element("css selector", ".badge").text
        copy = next(card for card in results if card.get_attribute("data-id") == str(added.json()["id"]))
        assert copy.find_element("css selector", ".label").text == "the copy"
        assert copy.find_element("css selector", ".meta").text == "sku: X-3 · filename: copy.jpg"
        assert "cosine ≥" in browser.find_element("id", "status").text
        browser.save_screenshot(str(tmp_path / "search_page_matches.png"))
