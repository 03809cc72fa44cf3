"""The search page (omnisage/serving/static/index.html) in a real browser: Debian's headless
chromium driven by selenium types a query, clicks search, and must show what /v1/search returns.
"""

import os

import httpx
import pytest

from omnisage.serving.omnisearchsage.service import create_app
from tests.helpers import build_tiny_index, running

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
KINDS = ("pins", "products", "queries")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
  missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
  if missing:
    pytest.skip(f"{' and '.join(missing)} not installed (apt-get install chromium "
                "chromium-driver): the search page test needs a headless browser")
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  # No network beyond loopback, no background traffic, a profile nobody else uses.
  for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--no-first-run", "--disable-quic", "--window-size=1400,900",
              f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
    options.add_argument(arg)
  driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
  yield driver
  driver.quit()


@pytest.fixture(scope="module")
def url(tiny_bundle, tmp_path_factory):
  bundle, _, index = build_tiny_index(tiny_bundle, tmp_path_factory.mktemp("page_index"))
  with running(create_app(bundle, index, max_batch=4)) as base:
    yield base


def test_search_page_shows_the_api_results(browser, url, tmp_path):
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait
  query = "summer garden party"
  expected = httpx.post(url + "/v1/search", json={"query": query, "k": 10}).json()["results"]
  browser.get(url + "/")
  assert browser.title == "omnisage search"
  box = browser.find_element(By.ID, "q")
  box.clear()
  box.send_keys(query)
  browser.find_element(By.ID, "go").click()

  def rows(kind):
    return browser.find_elements(By.CSS_SELECTOR, f"#results-{kind} li.result")

  WebDriverWait(browser, 20).until(lambda _: all(rows(kind) for kind in KINDS))
  for kind in KINDS:
    shown = [(row.get_attribute("data-id"), row.find_element(By.CLASS_NAME, "title").text,
              float(row.get_attribute("data-score"))) for row in rows(kind)]
    want = [(hit["id"], hit["title"] or hit["id"], hit["score"]) for hit in expected[kind]]
    assert [s[:2] for s in shown] == [w[:2] for w in want], kind
    assert [s[2] for s in shown] == pytest.approx([w[2] for w in want], abs=1e-6)
  status = browser.find_element(By.ID, "status").text
  assert "ms" in status and "cached" in status   # the API call above cached the embedding
  browser.save_screenshot(str(tmp_path / "search_page.png"))
  assert (tmp_path / "search_page.png").stat().st_size > 10_000
  assert "q=summer+garden+party" in browser.current_url and "mode=dense" in browser.current_url


def test_a_shared_url_runs_its_search(browser, url):
  """?q=&k=&mode= fills the form and runs the search: here lexical (BM25), 3 per type."""
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait
  query = "summer garden party"
  expected = httpx.post(url + "/v1/search", json={"query": query, "k": 3,
                                                  "mode": "lexical"}).json()["results"]
  browser.get(url + "/?q=summer+garden+party&k=3&mode=lexical")

  def rows(kind):
    return browser.find_elements(By.CSS_SELECTOR, f"#results-{kind} li.result")

  WebDriverWait(browser, 20).until(lambda _: all(rows(kind) for kind in KINDS))
  for kind in KINDS:
    assert [r.get_attribute("data-id") for r in rows(kind)] == [h["id"] for h in expected[kind]]
  assert browser.find_element(By.ID, "mode").get_attribute("value") == "lexical"
  assert browser.find_element(By.ID, "k").get_attribute("value") == "3"


def test_search_page_reports_errors(browser, url):
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait
  browser.get(url + "/")
  browser.find_element(By.ID, "q").clear()
  browser.find_element(By.ID, "q").send_keys("   ")   # blank: the API answers 422
  browser.find_element(By.ID, "go").click()
  status = browser.find_element(By.ID, "status")
  WebDriverWait(browser, 20).until(lambda _: "blank" in status.text)
  assert "error" in status.get_attribute("class")
  assert not browser.find_elements(By.CSS_SELECTOR, "li.result")
