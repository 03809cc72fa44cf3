"""A synthetic search world in the shape of OmniSearchSage's inputs (SPEC §1), for demos and tests.

Writes the raw tables of `schema.RAW_TABLES` as Parquet (`queries_log`, `pins`, `products`,
`board_saves`), with the structure a model can learn and the defects `prepare` must survive:

- Latent topics, each with `words_per_topic` concepts; a concept has a surface form per language
  (en/fr/de/es syllable words with accents, German capitals, 'ß', ligatures and NFD-decomposed
  renderings, so NFKC + case folding matter).
- Queries are 1-4 concept words of one topic in one language; pins and products carry titles,
  descriptions, optional captions, a legacy 256-d vector (topic centroid + noise) and visual bits
  (a random projection of a latent vector, 1024 bits packed into 128 bytes).
- Logs: a query engages entities of its own topic, half the time one whose main concept and
  language match the query's first word, with 10% noise; queries and entities have Zipf
  popularity; timestamps span `num_days` days (day-aligned, so splits fall on whole UTC days).
- Defects: entities without text or features, and `bad_row_rate` bad rows per table (NaN vectors,
  invalid UTF-8, absurdly long text, missing fields, unknown entity ids). Bad rows are extra rows
  that nothing else references, so `prepare` must find exactly the injected counts.

Deterministic: the same config and seed give byte-identical files.

Usage:
  summary = generate(get_config().synthetic, seed=0, out_dir="/tmp/raw")
"""

import os
import time
import unicodedata

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from omnisage.data import text
from omnisage.data.omnisearchsage import schema

DAY = 86_400
T0 = 19_676 * DAY  # 2023-11-15 00:00 UTC: day-aligned, so log days are whole UTC days
LANG_PROBS = {"en": 0.4, "fr": 0.2, "de": 0.2, "es": 0.2}
# Topic-free words: they make descriptions and some board titles noisy, as in real data.
FILLERS = {
    "en": "best ideas easy new home diy great simple favorite love".split(),
    "fr": "idées facile nouveau maison meilleur simple préféré joli amour déco".split(),
    "de": "Ideen einfach neu Haus beste schön Lieblings Liebe Deko Tipps".split(),
    "es": "ideas fácil nuevo casa mejor sencillo favorito bonito amor decoración".split(),
}
_SUFFIX = {"en": ("",), "fr": ("e", "eau", "ière"), "de": ("ung", "chen", "straße"),
           "es": ("o", "a", "ión")}
_ACCENT = {"en": {}, "fr": {"e": "é", "a": "à"}, "de": {"u": "ü", "o": "ö"},
           "es": {"n": "ñ", "i": "í"}}
NOISE = 0.1  # share of engagements that ignore the query's topic


def _zipf(n: int, s: float) -> np.ndarray:
  w = 1.0 / np.arange(1, n + 1) ** s
  return w / w.sum()


def _vocabulary(cfg, rng) -> np.ndarray:
  """forms[language, concept]: unique syllable stems turned into per-language words."""
  cons, vows = list("bcdfghjklmnprstvz"), list("aeiou")
  n = cfg.num_topics * cfg.words_per_topic
  stems, seen = [], set()
  while len(stems) < n:
    k = int(rng.integers(2, 4))
    stem = "".join(rng.choice(cons) + rng.choice(vows) for _ in range(k))
    if stem not in seen:
      seen.add(stem)
      stems.append(stem)
  forms = np.empty((len(cfg.languages), n), object)
  for li, lang in enumerate(cfg.languages):
    accent, suffixes = _ACCENT.get(lang, {}), _SUFFIX.get(lang, ("",))
    for c, stem in enumerate(stems):
      word = stem
      for a, b in accent.items():  # accent the first matching vowel/consonant only
        word = word.replace(a, b, 1)
      word += suffixes[c % len(suffixes)]
      forms[li, c] = word.capitalize() if lang == "de" else word  # German nouns are capitalised
  return forms


def _render(texts: list[str], rng, mess: float) -> list[str]:
  """Raw renderings that normalise back: NFD accents, the 'fi' ligature, odd spacing, upper case."""
  out = []
  kinds = rng.integers(0, 4, len(texts))
  messy = rng.random(len(texts)) < mess
  for t, k, m in zip(texts, kinds.tolist(), messy.tolist()):
    if m:
      t = (unicodedata.normalize("NFD", t) if k == 0 else t.replace("fi", "\ufb01") if k == 1
           else "  " + t.replace(" ", "   ") + " " if k == 2 else t.upper())
    out.append(t)
  return out


class _World:
  """Topics, vocabulary, and samplers shared by every table."""

  def __init__(self, cfg, rng):
    self.cfg, self.rng = cfg, rng
    self.forms = _vocabulary(cfg, rng)
    self.langs = list(cfg.languages)
    self.lang_p = np.array([LANG_PROBS.get(l, 1.0) for l in self.langs])
    self.lang_p /= self.lang_p.sum()
    self.concept_p = _zipf(cfg.words_per_topic, cfg.zipf_exponent)
    self.fillers = np.empty((len(self.langs), 10), object)
    for li, l in enumerate(self.langs):
      self.fillers[li] = (FILLERS.get(l, FILLERS["en"]) * 10)[:10]
    self.legacy_centroid = rng.standard_normal((cfg.num_topics, schema.LEGACY_DIM))
    self.latent_centroid = rng.standard_normal((cfg.num_topics, 64))
    self.projection = rng.standard_normal((schema.VISUAL_DIM, 64))

  def language(self, n):
    return self.rng.choice(len(self.langs), n, p=self.lang_p)

  def concepts(self, topic, k):
    """k Zipf-drawn concepts of each row's topic (column 0 is the row's main concept)."""
    ranks = self.rng.choice(self.cfg.words_per_topic, (len(topic), k), p=self.concept_p)
    return topic[:, None] * self.cfg.words_per_topic + ranks

  def text(self, topic, lang, lo, hi, filler_rate=0.0, unique=False):
    """lo..hi words per row: concepts of the row's topic, some replaced by filler words."""
    n = len(topic)
    concepts = self.concepts(topic, hi)
    fill = self.rng.random((n, hi)) < filler_rate
    fill[:, 0] = False  # the first word is the row's main concept
    words = np.where(fill, self.fillers[lang[:, None], self.rng.integers(0, 10, (n, hi))],
                     self.forms[lang[:, None], concepts]).tolist()
    lengths = self.rng.integers(lo, hi + 1, n).tolist()
    # Zipf draws repeat words; a query or a title says each word once.
    join = (lambda ws: " ".join(dict.fromkeys(ws))) if unique else " ".join
    return [join(w[:k]) for w, k in zip(words, lengths)], concepts[:, 0]

  def legacy(self, topic):
    noise = self.rng.standard_normal((len(topic), schema.LEGACY_DIM))
    return (self.legacy_centroid[topic] + 0.8 * noise).astype(np.float32)

  def bits(self, latent):
    proj = self.projection.astype(np.float32).T
    return np.packbits(latent.astype(np.float32) @ proj > 0, axis=1)  # (n, 128) uint8

  def latent(self, topic):
    return self.latent_centroid[topic] + 0.8 * self.rng.standard_normal((len(topic), 64))


def _null(rng, n, rate):
  return rng.random(n) < rate


def _entities(world, n, kind):
  """Ids, text columns, topics, main keys, legacy vectors and latents of pins or products."""
  cfg, rng = world.cfg, world.rng
  topic = rng.integers(0, cfg.num_topics, n)
  lang = world.language(n)
  title, main = world.text(topic, lang, 2, 5 if kind == "pins" else 6, 0.1, unique=True)
  desc, _ = world.text(topic, lang, 6, 14 if kind == "pins" else 20, filler_rate=0.3)
  title = np.array(_render(title, rng, 0.15), object)
  desc = np.array(_render(desc, rng, 0.15), object)
  title[_null(rng, n, cfg.missing_text_rate)] = None
  desc[_null(rng, n, cfg.missing_text_rate)] = None
  # `main`: (main concept, language); queries engage entities that share it (see _engage).
  prefix = "pin" if kind == "pins" else "prod"
  return dict(ids=np.array([f"{prefix}_{i:07d}" for i in range(n)], object), topic=topic,
              title=title, description=desc, main=main * len(world.langs) + lang,
              legacy=world.legacy(topic), latent=world.latent(topic))


def _popularity(topic, main, num_topics, num_keys, s, rng):
  """Per-entity Zipf weight within its topic, and member lists per topic and per main key."""
  weight = np.empty(len(topic))
  by_topic = []
  order = rng.permutation(len(topic))  # popularity rank order within a topic is random
  for t in range(num_topics):
    members = order[topic[order] == t]
    weight[members] = _zipf(len(members), s) if len(members) else 0
    by_topic.append(members)
  sort = np.argsort(main, kind="stable")
  bounds = np.searchsorted(main[sort], np.arange(num_keys + 1))
  by_key = [sort[bounds[c]:bounds[c + 1]] for c in range(num_keys)]
  return weight, by_topic, by_key


def _draw(groups, group_of_row, weight, rng):
  """For each row, a member of its group drawn by weight (-1 where the group is empty)."""
  out = np.full(len(group_of_row), -1, np.int64)
  u = rng.random(len(group_of_row))
  # One sort instead of a mask per group: thousands of concept groups in the demo world.
  order = np.argsort(group_of_row, kind="stable")
  sorted_groups = group_of_row[order]
  starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
  for a, b in zip(starts.tolist(), np.r_[starts[1:], len(order)].tolist()):
    members, rows = groups[sorted_groups[a]], order[a:b]
    if len(members):
      cdf = np.cumsum(weight[members])
      pick = np.searchsorted(cdf, u[rows] * cdf[-1], side="right")
      out[rows] = members[np.minimum(pick, len(members) - 1)]
  return out


def _engage(q_topic, q_main, pop, n_entities, rng):
  """Entity per log row: one about the query's main concept in its language (half of the rows),
  else one of its topic in any language (so cross-language equivalents are learnable), or noise."""
  weight, by_topic, by_concept = pop
  n = len(q_topic)
  ent = _draw(by_topic, q_topic, weight, rng)
  concept_rows = rng.random(n) < 0.5
  by_c = _draw(by_concept, np.where(concept_rows, q_main, 0), weight, rng)
  ent = np.where(concept_rows & (by_c >= 0), by_c, ent)
  noise = (rng.random(n) < NOISE) | (ent < 0)
  ent[noise] = rng.integers(0, n_entities, int(noise.sum()))
  return ent


def _queries(world):
  """Distinct queries (by normal form): canonical text, topic, main key, popularity, raw bytes."""
  cfg, rng = world.cfg, world.rng
  texts, topics, keys, seen = [], [], [], set()
  while len(texts) < cfg.num_queries:
    m = 2 * cfg.num_queries
    topic, lang = rng.integers(0, cfg.num_topics, m), world.language(m)
    phrases, main = world.text(topic, lang, 1, 4, unique=True)
    for t, tp, key in zip(phrases, topic.tolist(), (main * len(world.langs) + lang).tolist()):
      t = t.lower()  # typed queries are lower case; normalisation still folds 'ß', accents, ...
      if text.normalize(t) not in seen and len(texts) < cfg.num_queries:
        seen.add(text.normalize(t))
        texts.append(t)
        topics.append(tp)
        keys.append(key)
  pop = _zipf(cfg.num_queries, cfg.zipf_exponent)[rng.permutation(cfg.num_queries)]
  # Two raw renderings per query: as typed, and a messy one (case, spacing, NFD, ligature).
  raw = np.array([[t.encode() for t in texts], [t.encode() for t in _render(texts, rng, 1.0)]],
                 object)
  return dict(text=np.array(texts, object), topic=np.array(topics), main=np.array(keys), pop=pop,
              raw=raw)


def _log(world, queries, pins, prods, n_keys):
  """queries_log rows: query->pin, ->product and ->query engagements (time-sorted in _inject)."""
  cfg, rng = world.cfg, world.rng
  q_topic, q_main, n_q = queries["topic"], queries["main"], cfg.num_queries
  parts = []
  for kind, n_rows, ents, engagements, probs in (
      ("pins", cfg.num_query_pin, pins, ("save", "long_click"), (0.45, 0.55)),
      ("products", cfg.num_query_product, prods, ("save", "long_click", "add_to_cart",
                                                  "checkout"), (0.4, 0.3, 0.2, 0.1)),
      ("queries", cfg.num_query_query, queries, ("click",), (1.0,))):
    qi = rng.choice(n_q, n_rows, p=queries["pop"])
    pop = _popularity(ents["topic"], ents["main"], cfg.num_topics, n_keys, cfg.zipf_exponent, rng)
    ent = _engage(q_topic[qi], q_main[qi], pop, len(ents["topic"]), rng)
    if kind == "queries":
      ent = np.where(ent == qi, (ent + 1) % n_q, ent)  # no self-clicks
    ids = ents["text"] if kind == "queries" else ents["ids"]  # a clicked query is its text
    parts.append((qi, np.full(n_rows, kind, object), ids[ent],
                  np.array(engagements, object)[rng.choice(len(engagements), n_rows, p=probs)]))
  qi = np.concatenate([p[0] for p in parts])
  return dict(query=queries["raw"][(rng.random(len(qi)) < 0.15).astype(int), qi],
              entity_kind=np.concatenate([p[1] for p in parts]),
              entity_id=np.concatenate([p[2] for p in parts]),
              engagement=np.concatenate([p[3] for p in parts]),
              timestamp=T0 + rng.integers(0, cfg.num_days * DAY, len(qi)))


def _board_saves(world, pins):
  """Boards titled with topic words (20% generic titles); pins saved mostly to on-topic boards."""
  cfg, rng = world.cfg, world.rng
  topic, lang = rng.integers(0, cfg.num_topics, cfg.num_boards), world.language(cfg.num_boards)
  titles, _ = world.text(topic, lang, 1, 3, unique=True)
  generic = rng.random(cfg.num_boards) < 0.2
  titles = [" ".join(world.fillers[l, :2]) if g else t
            for t, l, g in zip(titles, lang.tolist(), generic.tolist())]
  cased = rng.random(cfg.num_boards) < 0.3
  titles = np.array(_render([t.title() if c else t for t, c in zip(titles, cased.tolist())], rng,
                            0.1), object)
  pin_pop = _zipf(cfg.num_pins, cfg.zipf_exponent)[rng.permutation(cfg.num_pins)]
  pin = rng.choice(cfg.num_pins, cfg.num_board_saves, p=pin_pop)
  by_topic = [np.flatnonzero(topic == t) for t in range(cfg.num_topics)]
  board = _draw(by_topic, pins["topic"][pin], np.ones(cfg.num_boards), rng)
  off = (rng.random(len(board)) < 0.15) | (board < 0)
  board[off] = rng.integers(0, cfg.num_boards, int(off.sum()))
  return dict(pin_id=pins["ids"][pin], board_title=titles[board],
              timestamp=T0 + rng.integers(0, cfg.num_days * DAY, len(board)))


def _pin_table(world, pins):
  cfg, rng, n = world.cfg, world.rng, world.cfg.num_pins
  en = world.langs.index("en") if "en" in world.langs else 0
  caption = np.array(_render([f"a photo of {a} {b}" for a, b in world.forms[en][
      world.concepts(pins["topic"], 2)].tolist()], rng, 0.1), object)
  # Captions stand in for text where title or description is missing (SPEC: synthetic captions).
  lacking = (pins["title"] == None) | (pins["description"] == None)  # noqa: E711
  caption[rng.random(n) >= np.where(lacking, 0.9, 0.2)] = None
  visual = np.array([b.tobytes() for b in world.bits(pins["latent"])], object)
  visual[_null(rng, n, cfg.missing_feature_rate)] = None
  return dict(id=pins["ids"], title=pins["title"], description=pins["description"],
              caption=caption, pinsage=pins["legacy"],
              pinsage_null=_null(rng, n, cfg.missing_feature_rate), visual_bits=visual)


def _product_table(world, prods):
  cfg, rng, n = world.cfg, world.rng, world.cfg.num_products
  n_img = rng.integers(1, 5, n)  # 1-4 images per product, each near the product's latent
  latent = np.repeat(prods["latent"], n_img, axis=0)
  bits = [b.tobytes() for b in world.bits(latent + 0.5 * rng.standard_normal(latent.shape))]
  ends = np.cumsum(n_img).tolist()
  images = np.empty(n, object)
  images[:] = [bits[e - k:e] for e, k in zip(ends, n_img.tolist())]
  no_img = np.flatnonzero(_null(rng, n, cfg.missing_feature_rate))
  images[no_img] = [None if i % 2 else [] for i in range(len(no_img))]  # null or empty list
  return dict(id=prods["ids"], title=prods["title"], description=prods["description"],
              itemsage=prods["legacy"], itemsage_null=_null(rng, n, cfg.missing_feature_rate),
              image_bits=images)


def generate(config: ml_collections.ConfigDict, seed: int, out_dir: str) -> dict:
  """Writes the four raw Parquet tables into `out_dir`; returns row and injected bad-row counts."""
  start = time.perf_counter()
  world = _World(config, np.random.default_rng(seed))
  n_keys = config.num_topics * config.words_per_topic * len(config.languages)
  queries = _queries(world)
  pins = _entities(world, config.num_pins, "pins")
  prods = _entities(world, config.num_products, "products")
  tables = dict(queries_log=_log(world, queries, pins, prods, n_keys),
                board_saves=_board_saves(world, pins), pins=_pin_table(world, pins),
                products=_product_table(world, prods))
  bad = _inject(tables, config, world.rng)
  os.makedirs(out_dir, exist_ok=True)
  rows = _write(tables, out_dir)
  return dict(rows=rows, bad_rows=bad, out_dir=out_dir, seconds=time.perf_counter() - start)


# --- defects ------------------------------------------------------------------------------------
def _append(table: dict, src: np.ndarray, edits: dict) -> None:
  """Appends copies of rows `src` of a column dict, with `edits` {column: values} applied."""
  for col, values in table.items():
    new = values[src].copy()
    if col in edits:
      new[:] = edits[col]
    table[col] = np.concatenate([values, new])


def _inject(tables: dict, cfg, rng) -> dict:
  """Appends bad rows (one defect each) to every table; returns {table: {reason: count}}."""
  long_text = ("lorem ipsum " * (cfg.absurd_text_chars // 12 + 1))[:cfg.absurd_text_chars]
  bad: dict[str, dict[str, int]] = {}

  def count(name, kinds):  # rows per defect kind: at least one, so tiny data has every kind
    n = len(next(iter(tables[name].values())))
    return max(1, int(round(cfg.bad_row_rate * n / kinds)))

  def copies(name, k, pool=None):
    n = len(next(iter(tables[name].values())))
    return rng.choice(n if pool is None else pool, k)

  # queries_log: missing query / entity_id, invalid UTF-8, absurd length, unknown entity id.
  log, k = tables["queries_log"], count("queries_log", 4)
  entity_rows = np.flatnonzero(log["entity_kind"] != "queries")
  src = copies("queries_log", k)
  half = np.arange(k) % 2 == 0
  _append(log, src[half], {"query": None})
  _append(log, src[~half], {"entity_id": None})
  # 0xff never occurs in UTF-8; a lone lead byte 0xc3 is a truncated two-byte sequence.
  _append(log, copies("queries_log", k), {"query": [(b"\xff" if i % 2 else b"\xc3") + b" query"
                                                     for i in range(k)]})
  _append(log, copies("queries_log", k), {"query": long_text.encode()})
  src = copies("queries_log", k, entity_rows)
  _append(log, src, {"entity_id": [f"{kd[:-1] if kd == 'pins' else 'prod'}_missing_{i:06d}"
                                   for i, kd in enumerate(log["entity_kind"][src])]})
  bad["queries_log"] = dict(missing_field=k, undecodable_text=k, absurd_length=k,
                            unknown_entity=k)
  order = np.argsort(log["timestamp"], kind="stable")  # logs arrive in time order
  for col in log:
    log[col] = log[col][order]

  # pins / products: extra rows (never referenced by logs) with a null id, absurd text, NaN vector.
  for name, vec, long_col in (("pins", "pinsage", "description"),
                              ("products", "itemsage", "title")):
    t, k = tables[name], count(name, 3)
    start = len(t["id"])
    _append(t, copies(name, k), {"id": None})
    _append(t, copies(name, k), {long_col: long_text})
    _append(t, copies(name, k), {vec + "_null": False})
    n = len(t["id"])
    t["id"][start + k:] = [f"{name[:-1]}_bad_{i:06d}" for i in range(n - start - k)]
    t[vec][np.arange(n - k, n), rng.integers(0, schema.LEGACY_DIM, k)] = np.nan
    bad[name] = dict(missing_field=k, absurd_length=k, nan_vector=k)

  # board_saves: a missing title, a pin id that does not exist, an absurdly long title.
  saves, k = tables["board_saves"], count("board_saves", 3)
  _append(saves, copies("board_saves", k), {"board_title": None})
  _append(saves, copies("board_saves", k), {"pin_id": [f"pin_missing_{i:06d}" for i in range(k)]})
  _append(saves, copies("board_saves", k), {"board_title": long_text})
  bad["board_saves"] = dict(missing_field=k, unknown_entity=k, absurd_length=k)
  return bad


# --- writing ------------------------------------------------------------------------------------
def _vectors(x: np.ndarray, null: np.ndarray) -> pa.Array:
  n, d = x.shape
  return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * d),
                                  pa.array(x.reshape(-1).astype(np.float32)), mask=pa.array(null))


def _write(tables: dict, out_dir: str) -> dict:
  """Parquet files with the column order of schema.RAW_TABLES; returns row counts."""
  types = dict(query=pa.binary(), timestamp=pa.int64(), visual_bits=pa.binary(),
               image_bits=pa.list_(pa.binary()))
  rows = {}
  for name, cols in schema.RAW_TABLES.items():
    t = tables[name]
    arrow = pa.table({c: _vectors(t[c], t[c + "_null"]) if c in ("pinsage", "itemsage") else
                      pa.array(t[c], types.get(c, pa.string())) for c in cols})
    pq.write_table(arrow, os.path.join(out_dir, f"{name}.parquet"))
    rows[name] = arrow.num_rows
  return rows
