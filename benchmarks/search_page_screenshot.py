"""A screenshot of the search page over a served bundle and index, for the docs.

Starts `launch.py serve` on a free loopback port, prints the top results of each retrieval mode
for the query, opens `/?q=...&k=...&mode=...` in headless Chromium (Debian's chromium +
chromedriver, as tests/test_search_page.py) and saves the page as a PNG.

Usage (after benchmarks/homedepot.py, which writes runs/homedepot/serve):
  .venv/bin/python benchmarks/search_page_screenshot.py --out docs/search_page_homedepot.png
Ends with one JSON line {"screenshot": {...}}.
"""

import argparse
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.parse

import httpx


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--bundle", default="runs/homedepot/serve/bundle")
  p.add_argument("--index", default="runs/homedepot/serve/index")
  p.add_argument("--query", default="cordless drill")
  p.add_argument("--k", type=int, default=8)
  p.add_argument("--mode", default="hybrid", choices=("dense", "lexical", "hybrid"))
  p.add_argument("--out", default="search_page.png")
  args = p.parse_args(argv)
  from selenium import webdriver
  from selenium.webdriver.chrome.options import Options
  from selenium.webdriver.chrome.service import Service
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait

  sock = socket.socket()
  sock.bind(("127.0.0.1", 0))
  port = sock.getsockname()[1]
  sock.close()
  server = subprocess.Popen([sys.executable, "launch.py", "serve", f"--config.bundle={args.bundle}",
                             f"--config.index={args.index}", f"--config.port={port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  url = f"http://127.0.0.1:{port}"
  try:
    for _ in range(600):
      try:
        if httpx.get(url + "/healthz").status_code == 200:
          break
      except httpx.TransportError:
        pass
      time.sleep(0.5)
    top = {}
    for mode in ("dense", "lexical", "hybrid"):
      body = httpx.post(url + "/v1/search", json={"query": args.query, "k": 5, "mode": mode},
                        timeout=60).json()
      top[mode] = {kind: [hit["title"] or hit["id"] for hit in hits]
                   for kind, hits in body["results"].items()}
      print(f"{mode:<8} {top[mode]}")
    options = Options()
    for flag in ("--headless=new", "--no-sandbox", "--window-size=1400,900"):
      options.add_argument(flag)
    options.binary_location = "/usr/bin/chromium"
    browser = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
      query = urllib.parse.urlencode({"q": args.query, "k": args.k, "mode": args.mode})
      browser.get(f"{url}/?{query}")
      WebDriverWait(browser, 60).until(
          lambda _: browser.find_elements(By.CSS_SELECTOR, "li.result"))
      time.sleep(0.5)
      browser.save_screenshot(args.out)
    finally:
      browser.quit()
  finally:
    server.send_signal(signal.SIGINT)
    server.wait(60)
  out = {"screenshot": {"out": args.out, "query": args.query, "mode": args.mode, "top5": top}}
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
