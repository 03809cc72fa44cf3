"""Load test of the query service (SPEC §1 "Serving": p50 3 ms, p90 20 ms, behind a cache that
Zipfian query frequencies keep hot).

N concurrent client coroutines (httpx.AsyncClient, HTTP/1.1 keep-alive) drive the HTTP API of
omnisage/serving/omnisearchsage/service.py in three phases, each of --requests requests, one query
per request:
  uncached   every request a query the server has never seen (real queries glued in pairs, checked
             distinct after tokenisation, since the server caches by token ids): the model path
  zipf       queries drawn Zipf(--zipf-a) over the demo query vocabulary: repeats hit the cache
  malformed  the Zipf stream with a --malformed fraction of bad requests mixed in (bad JSON, wrong
             types, empty, oversize, too many queries, unknown types, ...): all must be 4xx
Per phase: QPS, latency p50/p90/p99 (perf_counter around each request, client side; also split
into requests whose query embedding came from the cache and those that reached the tower), the
share of requests the server itself timed under 3 ms and 20 ms (its /metrics histogram, all
statuses), and the cache hit rate seen by clients ("cached" in responses) and by the server
(/metrics before and after).

By default it starts the server itself (`launch.py serve` on a free loopback port, waits for
/healthz, stops it with SIGINT at the end); --url drives one that is already running.

Usage:
  .venv/bin/python benchmarks/serving_load.py                       # runs/demo/bundle + index
  .venv/bin/python benchmarks/serving_load.py --url http://127.0.0.1:8080 --endpoint search
  .venv/bin/python benchmarks/serving_load.py --endpoint search --mode hybrid   # dense + BM25
Prints a table and ends with one JSON line {"serving_load": {...}}. Exit status 1 when any
response was a 5xx or a request failed to connect (0 otherwise; missed latency targets are
reported, not fatal: they depend on the machine).
"""

import argparse
import asyncio
import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TARGETS_MS = {"p50": 3.0, "p90": 20.0}   # SPEC §1 "Serving"
MAX_QUERY_CHARS, MAX_QUERIES = 256, 64   # the server's defaults (contract 3)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--url", help="drive this running server instead of starting one")
  p.add_argument("--bundle", default=os.path.join(ROOT, "runs", "demo", "bundle"))
  p.add_argument("--index", default=os.path.join(ROOT, "runs", "demo", "index"))
  p.add_argument("--queries", help="a parquet file whose `text` or `title` column holds the "
                 "query vocabulary (default: the index's queries, else the demo's)")
  p.add_argument("--endpoint", choices=("embed", "search"), default="embed",
                 help="embed: POST /v1/embed (the SPEC's query-embedding service); search: "
                 "POST /v1/search (embedding + ANN over every type)")
  p.add_argument("--mode", choices=("dense", "lexical", "hybrid"), default="dense",
                 help="/v1/search mode: embeddings, BM25 or both fused (hybrid search latency)")
  p.add_argument("--clients", type=int, default=16, help="concurrent client coroutines")
  p.add_argument("--requests", type=int, default=3000, help="requests per phase")
  p.add_argument("--zipf-a", type=float, default=1.1, help="Zipf exponent of query frequency")
  p.add_argument("--malformed", type=float, default=0.1, help="bad-request share in phase 3")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for "
                 "/healthz of a server started here")
  args = p.parse_args(argv)
  if args.clients < 1 or args.requests < 1 or not 0 <= args.malformed <= 1 or args.zipf_a <= 0:
    p.error("--clients and --requests must be >= 1, --malformed in [0, 1], --zipf-a > 0")
  return args


# ---------------------------------------------------------------------------------------------
# Query texts


def load_queries(args) -> tuple[list[str], str]:
  """Distinct query texts and where they came from."""
  candidates = [args.queries] if args.queries else [
      os.path.join(args.index, "queries", "items.parquet"),
      *sorted(glob.glob(os.path.join(ROOT, "runs", "demo", "embeddings", "queries", "*.parquet"))),
      os.path.join(ROOT, "runs", "demo", "prepared", "entities", "queries.parquet")]
  for path in candidates:
    if not os.path.isfile(path):
      continue
    names = pq.read_schema(path).names
    column = next((c for c in ("text", "title") if c in names), None)
    if column is None:
      raise ValueError(f"{path}: no `text` or `title` column (columns: {names})")
    texts = pq.read_table(path, columns=[column]).column(column).to_pylist()
    texts = list(dict.fromkeys(t for t in texts if t and t.strip()
                               and len(t) <= MAX_QUERY_CHARS))
    if len(texts) >= 2:
      return texts, path
  raise FileNotFoundError(f"no query texts found in {candidates}; pass --queries")


def token_keys(args):
  """text -> the server's cache key (token ids cropped to query_len), when the bundle is here;
  else the text itself (distinct texts may then collide in the server's cache)."""
  try:
    from omnisage.data.omnisearchsage.query_input import QueryEncoder
    with open(os.path.join(args.bundle, "manifest.json"), encoding="utf-8") as f:
      length = json.load(f)["dims"]["query_len"]
    tokenizer = QueryEncoder.from_bundle(args.bundle)
  except (OSError, KeyError, ValueError) as error:
    print(f"note: no tokenizer from {args.bundle} ({error}); uniqueness checked on text only")
    return lambda texts: list(texts)
  return lambda texts: [row.tobytes() for row in tokenizer.encode_batch(list(texts), length)]


def zipf_stream(texts: list[str], a: float, n: int, rng) -> list[str]:
  """n draws, P(rank r) ~ r^-a over a random ranking of `texts`."""
  ranked = [texts[i] for i in rng.permutation(len(texts))]
  p = np.arange(1, len(ranked) + 1, dtype=np.float64) ** -a
  return [ranked[i] for i in rng.choice(len(ranked), size=n, p=p / p.sum())]


def unseen_queries(texts: list[str], n: int, rng, keys, avoid: set) -> list[str]:
  """n queries, distinct from each other and from `avoid` after tokenisation: real queries glued
  in pairs (then triples), so they look like queries but were never asked."""
  out, seen = [], set(avoid)
  for width in (2, 3, 4):
    for _ in range(20):
      picks = rng.integers(0, len(texts), size=(2 * n, width))
      batch = [" ".join(texts[i] for i in row)[:MAX_QUERY_CHARS] for row in picks]
      for text, key in zip(batch, keys(batch)):
        if key not in seen:
          seen.add(key)
          out.append(text)
          if len(out) == n:
            return out
  raise ValueError(f"could only make {len(out)} distinct unseen queries of {n}")


# ---------------------------------------------------------------------------------------------
# Requests: (kind, path, body bytes, content type, expected status or None)


def good_request(endpoint: str, text: str, mode: str = "dense"):
  if endpoint == "embed":
    return ("ok", "/v1/embed", json.dumps({"queries": [text]}).encode(), "application/json", 200)
  return ("ok", "/v1/search", json.dumps({"query": text, "k": 10, "mode": mode}).encode(),
          "application/json", 200)


def malformed_requests() -> list[tuple]:
  """Every kind of bad request a client can send, with the status contract 3 promises."""
  def js(obj):
    return json.dumps(obj).encode()
  e, s, j = "/v1/embed", "/v1/search", "application/json"
  return [
      ("bad_json", e, b'{"queries": ["red velvet"', j, 400),
      ("bad_json", s, b'{"query": red velvet}', j, 400),
      ("not_object", e, b'[1, 2, 3]', j, 422),
      ("wrong_type", e, js({"queries": "red velvet cake"}), j, 422),
      ("wrong_type", e, js({"queries": [1, 2]}), j, 422),
      ("wrong_type", e, js({"queries": [None]}), j, 422),
      ("wrong_type", s, js({"query": 42}), j, 422),
      ("wrong_type", s, js({"query": "cake", "k": "10"}), j, 422),
      ("missing_field", e, js({}), j, 422),
      ("unknown_field", e, js({"queries": ["cake"], "extra": True}), j, 422),
      ("empty", e, js({"queries": [""]}), j, 422),
      ("empty", e, js({"queries": ["   "]}), j, 422),
      ("empty", e, js({"queries": []}), j, 422),
      ("empty", s, js({"query": ""}), j, 422),
      ("lone_surrogate", e, b'{"queries": ["cake \\ud800"]}', j, 422),
      ("oversize", e, js({"queries": ["x" * (MAX_QUERY_CHARS + 1)]}), j, 413),
      ("oversize", s, js({"query": "cake " * 200}), j, 413),
      ("too_many", e, js({"queries": ["cake"] * (MAX_QUERIES + 1)}), j, 413),
      ("huge_body", e, js({"queries": ["y" * 200_000]}), j, 413),
      ("unknown_type", s, js({"query": "cake", "types": ["boards"]}), j, 422),
      ("k_range", s, js({"query": "cake", "k": 0}), j, 422),
      ("k_range", s, js({"query": "cake", "k": 101}), j, 422),
      ("content_type", e, js({"queries": ["cake"]}), "text/plain", 415),
  ]


# ---------------------------------------------------------------------------------------------
# Running a phase


async def run_phase(client: httpx.AsyncClient, requests: list[tuple], clients: int) -> dict:
  """Sends `requests` from `clients` coroutines; per-request (kind, status, seconds, cached,
  queries, detail) in request order, and the wall time."""
  results = [None] * len(requests)
  todo = iter(enumerate(requests))

  async def worker():
    for i, (kind, path, body, ctype, expect) in todo:   # a shared iterator: no request twice
      t0 = time.perf_counter()
      try:
        response = await client.post(path, content=body, headers={"content-type": ctype})
        seconds = time.perf_counter() - t0
      except httpx.HTTPError as error:
        results[i] = (kind, None, time.perf_counter() - t0, 0, 0, type(error).__name__)
        continue
      cached, queries, detail = 0, 0, ""
      try:
        payload = response.json()
        if response.status_code == 200:
          flags = payload["cached"]
          flags = flags if isinstance(flags, list) else [flags]
          cached, queries = sum(map(bool, flags)), len(flags)
        elif not isinstance(payload.get("error", {}).get("code"), str):
          detail = "error body without error.code"
      except (ValueError, KeyError, AttributeError, TypeError):
        detail = "response is not the contract's JSON"
      if expect is not None and response.status_code != expect:
        detail = detail or f"expected {expect}"
      results[i] = (kind, response.status_code, seconds, cached, queries, detail)

  t0 = time.perf_counter()
  await asyncio.gather(*(worker() for _ in range(clients)))
  return {"results": results, "wall_s": time.perf_counter() - t0}


def scrape(url: str, endpoint: str) -> dict:
  """Cache hits/misses by cache, responses by status class and the server-side latency histogram
  of `endpoint` (at the SPEC's two targets), from /metrics."""
  text = httpx.get(url + "/metrics", timeout=30).text
  out = {}
  for line in text.splitlines():
    m = re.match(r'omnisage_request_latency_seconds_(?:bucket|count)\{endpoint="([^"]*)"'
                 r'(?:,le="([^"]*)")?\} (\S+)', line)
    if m and m[1] == endpoint and m[2] in (None, "0.003", "0.02"):
      out[f"latency_le_{m[2] or 'inf'}"] = float(m[3])
    m = re.match(r'omnisage_cache_(hits|misses)(?:_total)?\{cache="(\w+)"\} (\S+)', line)
    if m:
      out[f"{m[2]}_{m[1]}"] = float(m[3])
    m = re.match(r'omnisage_requests(?:_total)?\{endpoint="[^"]*",status="(\d)\d\d"\} (\S+)', line)
    if m:
      out[f"status_{m[1]}xx"] = out.get(f"status_{m[1]}xx", 0.0) + float(m[2])
  return out


def summarise(phase: dict, before: dict, after: dict) -> dict:
  rows = phase["results"]
  status = np.array([r[1] if r[1] is not None else -1 for r in rows])
  seconds = np.array([r[2] for r in rows])
  valid = np.array([r[0] == "ok" for r in rows])
  ok = valid & (status == 200)
  lat = np.sort(seconds[ok]) * 1e3

  def pct(q, values=lat):
    return round(float(np.percentile(values, q)), 3) if values.size else None

  # Requests answered wholly from the cache vs those that reached the query tower.
  hit = ok & np.array([r[4] > 0 and r[3] == r[4] for r in rows])
  hit_lat, miss_lat = seconds[hit] * 1e3, seconds[ok & ~hit] * 1e3

  queries = sum(r[4] for r, good in zip(rows, ok) if good)
  cached = sum(r[3] for r, good in zip(rows, ok) if good)
  delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
  server_rate = {}
  for cache in ("embedding", "search"):
    hits, misses = delta.get(f"{cache}_hits", 0.0), delta.get(f"{cache}_misses", 0.0)
    if hits + misses:
      server_rate[cache] = round(hits / (hits + misses), 4)
  out = {
      "requests": len(rows), "ok": int(ok.sum()), "valid_not_ok": int((valid & ~ok).sum()),
      "malformed": int((~valid).sum()),
      "status_4xx": int(((status >= 400) & (status < 500)).sum()),
      "status_5xx": int((status >= 500).sum()), "connection_errors": int((status < 0).sum()),
      "wall_s": round(phase["wall_s"], 3), "qps": round(len(rows) / phase["wall_s"], 1),
      "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99),
      "max_ms": round(float(lat[-1]), 3) if lat.size else None,
      "cached_p50_ms": pct(50, hit_lat), "cached_p90_ms": pct(90, hit_lat),
      "uncached_p50_ms": pct(50, miss_lat), "uncached_p90_ms": pct(90, miss_lat),
      "client_cached_rate": round(cached / queries, 4) if queries else None,
      "server_cache_hit_rate": server_rate,
      "server_5xx": int(delta.get("status_5xx", 0)),
  }
  served = delta.get("latency_le_inf", 0.0)
  for key, le in (("server_share_le_3ms", "0.003"), ("server_share_le_20ms", "0.02")):
    out[key] = round(delta.get(f"latency_le_{le}", 0.0) / served, 4) if served else None
  out["meets_targets"] = bool(lat.size and out["p50_ms"] <= TARGETS_MS["p50"]
                              and out["p90_ms"] <= TARGETS_MS["p90"])
  if (~valid).any():
    kinds = {}
    for r in rows:
      if r[0] != "ok":
        entry = kinds.setdefault(r[0], {})
        entry[str(r[1])] = entry.get(str(r[1]), 0) + 1
    out["malformed_status"] = kinds
  problems = sorted({f"{r[0]}: {r[1]} {r[5]}" for r in rows if r[5]})
  if problems:
    out["unexpected"] = problems[:20]
  return out


# ---------------------------------------------------------------------------------------------
# Server process


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def start_server(args, log_file):
  for path, what in ((args.bundle, "--bundle"), (args.index, "--index")):
    if not os.path.isdir(path):
      raise FileNotFoundError(f"{what} {path}: no such directory (or pass --url)")
  port = free_port()
  python = os.path.join(ROOT, ".venv", "bin", "python")
  python = python if os.path.exists(python) else sys.executable
  proc = subprocess.Popen([python, "launch.py", "serve", f"--bundle={args.bundle}",
                           f"--index={args.index}", f"--port={port}"], cwd=ROOT,
                          stdout=log_file, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  deadline = time.time() + args.startup_timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      break
    try:
      if httpx.get(url + "/healthz", timeout=2).status_code == 200:
        return proc, url
    except httpx.HTTPError:
      pass
    time.sleep(0.5)
  stop_server(proc)
  log_file.seek(0)
  tail = log_file.read().decode(errors="replace")[-3000:]
  raise RuntimeError(f"the server did not become healthy within {args.startup_timeout} s "
                     f"(exit code {proc.returncode}):\n{tail}")


def stop_server(proc) -> None:
  if proc.poll() is None:
    proc.send_signal(signal.SIGINT)   # graceful: the server prints its own summary line
    try:
      proc.wait(30)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def last_json_line(log_file) -> dict | None:
  log_file.seek(0)
  for line in reversed(log_file.read().decode(errors="replace").splitlines()):
    if line.startswith("{"):
      try:
        return json.loads(line)
      except ValueError:
        return None
  return None


# ---------------------------------------------------------------------------------------------


async def drive(args, url: str, phases: dict) -> dict:
  limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
  async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60.0, http1=True,
                               http2=False) as client:
    # Open the keep-alive connections first, so no phase pays for connection set-up.
    await asyncio.gather(*(client.get("/healthz") for _ in range(args.clients)))
    out = {}
    endpoint = f"/v1/{args.endpoint}"
    for name, requests in phases.items():
      before = scrape(url, endpoint)
      phase = await run_phase(client, requests, args.clients)
      out[name] = summarise(phase, before, scrape(url, endpoint))
  return out


def print_table(phases: dict) -> None:
  cols = ("requests", "ok", "status_4xx", "status_5xx", "connection_errors", "qps", "p50_ms",
          "p90_ms", "p99_ms", "max_ms", "client_cached_rate")
  heads = ("phase", "reqs", "ok", "4xx", "5xx", "conn_err", "QPS", "p50 ms", "p90 ms", "p99 ms",
           "max ms", "cached", "server hit rate")
  print("  ".join(f"{h:>10}" for h in heads))
  for name, s in phases.items():
    cells = [name] + ["-" if s[c] is None else s[c] for c in cols]
    rate = ",".join(f"{k}={v}" for k, v in s["server_cache_hit_rate"].items()) or "-"
    print("  ".join(f"{c:>10}" for c in cells) + f"  {rate}")
  for name, s in phases.items():
    print(f"{name}: cached requests p50/p90 {s['cached_p50_ms']}/{s['cached_p90_ms']} ms, "
          f"tower requests p50/p90 {s['uncached_p50_ms']}/{s['uncached_p90_ms']} ms; "
          f"server-side <= 3 ms: {s['server_share_le_3ms']}, <= 20 ms: "
          f"{s['server_share_le_20ms']}")
  for name, s in phases.items():
    if "malformed_status" in s:
      print(f"{name}: status by malformed kind: {json.dumps(s['malformed_status'])}")
    for problem in s.get("unexpected", []):
      print(f"{name}: unexpected: {problem}")


def main(argv=None) -> int:
  args = parse_args(argv)
  rng = np.random.default_rng(args.seed)
  texts, source = load_queries(args)
  keys = token_keys(args)
  zipf = zipf_stream(texts, args.zipf_a, 2 * args.requests, rng)
  fresh = unseen_queries(texts, args.requests, rng, keys, avoid=set(keys(texts)))
  bad = malformed_requests()
  mixed = [good_request(args.endpoint, t, args.mode) for t in zipf[args.requests:]]
  for i in np.flatnonzero(rng.random(len(mixed)) < args.malformed):
    mixed[i] = bad[rng.integers(len(bad))]
  phases = {"uncached": [good_request(args.endpoint, t, args.mode) for t in fresh],
            "zipf": [good_request(args.endpoint, t, args.mode) for t in zipf[: args.requests]],
            "malformed": mixed}
  print(f"{len(texts)} query texts from {source}; endpoint /v1/{args.endpoint}, "
        f"{args.clients} clients, {args.requests} requests per phase, zipf a={args.zipf_a}")

  server_summary, proc = None, None
  with tempfile.TemporaryFile() as log_file:
    try:
      if args.url:
        url = args.url.rstrip("/")
      else:
        t0 = time.perf_counter()
        proc, url = start_server(args, log_file)
        print(f"server up at {url} in {time.perf_counter() - t0:.1f} s")
      results = asyncio.run(drive(args, url, phases))
    finally:
      if proc is not None:
        stop_server(proc)
        server_summary = last_json_line(log_file)
  print_table(results)
  errors_5xx = sum(s["status_5xx"] for s in results.values())
  conn = sum(s["connection_errors"] for s in results.values())
  summary = {
      "url": url, "endpoint": args.endpoint, "mode": args.mode, "clients": args.clients,
      "requests": args.requests,
      "zipf_a": args.zipf_a, "malformed_share": args.malformed, "query_texts": len(texts),
      "targets_ms": TARGETS_MS, "phases": results,
      # The SPEC's figures are for the live, cached (Zipfian) stream.
      "targets_met": results["zipf"]["meets_targets"],
      "status_5xx": errors_5xx, "connection_errors": conn,
      "server": server_summary,
  }
  print(json.dumps({"serving_load": summary}))
  return 1 if errors_5xx or conn else 0


if __name__ == "__main__":
  try:
    sys.exit(main())
  except (OSError, ValueError, RuntimeError) as error:   # bad paths, no server: say so, exit 2
    print(f"error: {error}", file=sys.stderr)
    print(json.dumps({"serving_load": {"error": str(error)}}))
    sys.exit(2)
