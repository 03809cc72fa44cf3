"""Options of `launch.py serve`: the query service over a bundle and its index.

  python launch.py serve --config.bundle=runs/demo/bundle --config.index=runs/demo/index

(`--config=configs/serve.py` is the default of `serve`; the older `--bundle=... --index=...
--port=...` flags still work.) The bundle's manifest says which system serves it
(omnisage/systems.py): OmniSearchSage's /v1/embed and /v1/search, or the two-tower /v1/recommend
(plus /v1/pinnersage/* when `pinnersage` names a batch-job output; online updates survive a
restart when `pinnersage_state_db` names a SQLite file).
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.bundle = config_dict.placeholder(str)   # the serving bundle (launch.py export); required
  c.index = config_dict.placeholder(str)    # the index directory (launch.py index); required
  c.host = "127.0.0.1"     # address to bind: loopback unless you mean to expose it (a warning)
  c.port = 8080
  c.max_batch = 64         # queries per query-tower call (micro-batch cap)
  c.max_wait_ms = 2.0      # how long a query waits for a fuller batch
  c.max_queue = 256        # queries queued before requests get 503
  c.cache_size = 100_000   # query embeddings kept in the LRU cache
  c.cache_ttl_days = 30.0  # cache time-to-live (SPEC: 30 days)
  # Hardening (omnisage/serving/service/limits.py, auth.py; docs/serving.md "Hardening").
  c.max_header_bytes = 32 * 1024   # request line + headers over this -> 431, connection closed
  c.max_headers = 100              # more header lines than this -> 431, connection closed
  c.read_timeout_s = 10.0          # a request's headers + body must arrive within this -> 408
  c.keep_alive_s = 5.0             # an idle keep-alive connection is closed after this
  c.max_keep_alive_requests = 1000  # requests per connection, then Connection: close
  c.max_connections = 512          # open connections served at once; a request beyond -> 503
  # A file holding a bearer token that every route but /healthz then requires (401 without it);
  # unset: no authentication (fine on loopback, a warning on any other address).
  c.auth_token_file = config_dict.placeholder(str)
  # Two-tower bundles only: a `launch.py train --config=configs/pinnersage_movielens.py` output
  # directory adds /v1/pinnersage/{update,recommend}, over the item embeddings it clustered.
  c.pinnersage = config_dict.placeholder(str)
  c.item_embeddings = config_dict.placeholder(str)
  # With `pinnersage`: a SQLite file (WAL, omnisage/serving/pinnersage/store.py) where every
  # acknowledged /v1/pinnersage/update is written before it is answered and from which a restarted
  # server reads it back; created if absent, its directory must exist. "": in memory only, so a
  # restart serves the batch output again and loses the updates made since.
  c.pinnersage_state_db = ""
  return c
