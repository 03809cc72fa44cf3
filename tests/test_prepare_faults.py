"""`prepare` on hostile raw tables (issue 16): wrong Arrow types, invalid UTF-8 in string columns,
empty or all-bad tables the tasks need, and out-of-range timestamps. Every defect is either a
ValueError that names table, file and column (`launch.py prepare`: exit 2, `error: ...`, no stack
trace) or bad rows counted by reason; never a crash and never a later failure in `train`."""

import shutil
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from omnisage.data.omnisearchsage import prepare, synthetic
from tests.helpers import TINY_CONFIG, last_json, run_launch, tiny_config

DAY = 86_400


@pytest.fixture(scope="module")
def world(ray_cluster, tmp_path_factory):
  """(raw dir, generate() summary) of the tiny synthetic world, generated once: copy, then edit."""
  config = tiny_config()
  raw = tmp_path_factory.mktemp("faults") / "raw"
  return raw, synthetic.generate(config.synthetic, config.seed, str(raw))


@pytest.fixture
def raw(world, tmp_path):
  shutil.copytree(world[0], tmp_path / "raw")
  return tmp_path / "raw"


def read(raw, name: str) -> pa.Table:
  return pq.read_table(raw / f"{name}.parquet")


def replace_column(raw, name: str, column: str, values) -> str:
  """Rewrites column `column` of raw table `name`; returns the table's path."""
  path = raw / f"{name}.parquet"
  table = pq.read_table(path)
  pq.write_table(table.set_column(table.column_names.index(column), column, values), path)
  return str(path)


def run_prepare(raw, tmp_path, config=None):
  return prepare.prepare(config or tiny_config(), str(raw), str(tmp_path / "out"))


def not_utf8(values: list, row: int) -> pa.Array:
  """A string-typed array whose row `row` holds bytes that are not UTF-8 (Parquet keeps them)."""
  raw = [v.encode() if isinstance(v, str) else v for v in values]
  raw[row] = b"\xff\xfe broken"
  return pa.array(raw, pa.binary()).view(pa.string())


# --- wrong Arrow types: a ValueError naming table, file, column, expected and found type ---------
WRONG_TYPES = {
    "string timestamp": ("queries_log", "timestamp", lambda c: c.cast(pa.string()),
                         "an integer", "string"),
    "string pinsage": ("pins", "pinsage", lambda c: pa.array(["[0.1, 0.2]"] * len(c)),
                       "list, large_list or fixed_size_list of float", "string"),
    "int64 id": ("pins", "id", lambda c: pa.array(np.arange(len(c))), "string or large_string",
                 "int64"),
    "int visual_bits": ("pins", "visual_bits", lambda c: pa.array(np.zeros(len(c), np.int32)),
                        "binary, large_binary or fixed_size_binary", "int32"),
    "string board timestamp": ("board_saves", "timestamp", lambda c: c.cast(pa.string()),
                               "an integer", "string"),
    "int vector values": ("products", "itemsage", lambda c: pa.array([[1, 2]] * len(c)),
                          "of float16/float32/float64", "list<element: int64>"),
}


@pytest.mark.parametrize("case", list(WRONG_TYPES))
def test_wrong_column_type_names_table_file_column_types(raw, tmp_path, case):
  name, column, change, expected, found = WRONG_TYPES[case]
  path = replace_column(raw, name, column, change(read(raw, name)[column]))
  with pytest.raises(ValueError) as error:
    run_prepare(raw, tmp_path)
  message = str(error.value)
  for part in (f"{name} table", path, f"column '{column}'", expected, f"Arrow type {found}"):
    assert part in message, (part, message)
  assert not (tmp_path / "out").exists()  # checked before anything is written


# --- invalid UTF-8 in a string-typed column -------------------------------------------------------
@pytest.mark.parametrize("name,column", [("pins", "title"), ("queries_log", "entity_id"),
                                         ("board_saves", "pin_id")])
def test_invalid_utf8_in_string_column_names_file_column_row(raw, tmp_path, name, column):
  values = read(raw, name)[column].to_pylist()
  path = replace_column(raw, name, column, not_utf8(values, 7))
  with pytest.raises(ValueError) as error:
    run_prepare(raw, tmp_path)
  message = str(error.value)
  for part in (f"{name} table", path, f"column '{column}'", "row 7 is not valid UTF-8"):
    assert part in message, (part, message)


# --- tables the tasks need: empty, or every row bad ---------------------------------------------
def test_empty_pins_table_is_an_error_naming_table_and_task(raw, tmp_path):
  pins = read(raw, "pins")
  pq.write_table(pins.slice(0, 0), raw / "pins.parquet")
  with pytest.raises(ValueError, match=r"pins table .*pins\.parquet is empty \(0 rows\), but "
                                       r"task q2pin needs pins"):
    run_prepare(raw, tmp_path)


def test_empty_pins_table_is_fine_without_pin_tasks(raw, tmp_path):
  """Home Depot / Best Buy: no pins, and a config that asks for no pin pairs."""
  pq.write_table(read(raw, "pins").slice(0, 0), raw / "pins.parquet")
  pq.write_table(read(raw, "board_saves").slice(0, 0), raw / "board_saves.parquet")
  config = tiny_config()
  config.tasks.q2pin = 0
  summary = run_prepare(raw, tmp_path, config)
  assert summary["entities"]["pins"] == 0 and summary["entities"]["products"] > 0
  assert "timestamp_out_of_range" not in summary["bad_rows"]["queries_log"]


def test_empty_log_is_an_error(raw, tmp_path):
  pq.write_table(read(raw, "queries_log").slice(0, 0), raw / "queries_log.parquet")
  with pytest.raises(ValueError, match=r"queries_log table .*queries_log\.parquet is empty"):
    run_prepare(raw, tmp_path)


def test_all_bad_pins_is_an_error_with_the_counts(raw, tmp_path):
  pins = read(raw, "pins")
  replace_column(raw, "pins", "id", pa.nulls(pins.num_rows, pa.string()))
  with pytest.raises(ValueError) as error:
    run_prepare(raw, tmp_path)
  message = str(error.value)
  assert f"pins table {raw / 'pins.parquet'} has no valid row" in message
  assert f"all {pins.num_rows} bad: {{'missing_field': {pins.num_rows}}}" in message
  assert "task q2pin needs pins" in message


def test_log_rows_of_a_task_all_bad_is_an_error(raw, tmp_path):
  """Pins are fine but no log row engages a known pin: q2pin would have no pair to train on."""
  log = read(raw, "queries_log")
  kind = np.asarray(log["entity_kind"].to_pylist(), object)
  ids = np.asarray(log["entity_id"].to_pylist(), object)
  ids[kind == "pins"] = "pin_nobody_knows"
  replace_column(raw, "queries_log", "entity_id", pa.array(ids, pa.string()))
  with pytest.raises(ValueError, match=r"queries_log table .* has no valid training row engaging "
                                       r"pins, but task q2pin needs pins .*unknown_entity"):
    run_prepare(raw, tmp_path)


# --- timestamps: counted bad rows, never kept, never dropped silently -----------------------------
def extra_rows(raw, name: str, timestamps: list, word: str) -> pa.Table:
  """Rows of a valid shape for table `name` (known pin ids), with the given timestamps."""
  pin_ids = [p for p in read(raw, "pins")["id"].to_pylist()[:40] if p][:len(timestamps)]
  assert len(pin_ids) == len(timestamps)
  ts = pa.array(timestamps, pa.int64())
  if name == "queries_log":
    return pa.table(dict(query=pa.array([word.encode()] * len(ts), pa.binary()),
                         entity_kind=["pins"] * len(ts), entity_id=pin_ids,
                         engagement=["save"] * len(ts), timestamp=ts))
  return pa.table(dict(pin_id=pin_ids, board_title=[word] * len(ts), timestamp=ts))


def test_negative_and_absurd_timestamps_are_counted(world, raw, tmp_path):
  _, generated = world
  log, saves = read(raw, "queries_log"), read(raw, "board_saves")
  t_max = int(log["timestamp"].to_numpy().max())
  future = int(time.time()) + 10 * DAY
  log_ts = [-1, -DAY, -5 * 10**9, 0, 631_152_000, future, 1_700_000_000_000]  # 1990, ms not s
  saves_ts = [-7, 5, future]
  pq.write_table(pa.concat_tables([log, extra_rows(raw, "queries_log", log_ts, "stampword")
                                   .cast(log.schema)]), raw / "queries_log.parquet")
  pq.write_table(pa.concat_tables([saves, extra_rows(raw, "board_saves", saves_ts, "stampboard")
                                   .cast(saves.schema)]), raw / "board_saves.parquet")
  summary = run_prepare(raw, tmp_path)
  bad = summary["bad_rows"]
  assert bad["queries_log"] == {**generated["bad_rows"]["queries_log"], "negative_timestamp": 3,
                                "timestamp_out_of_range": 4}
  assert bad["board_saves"] == {**generated["bad_rows"]["board_saves"], "negative_timestamp": 1,
                                "timestamp_out_of_range": 2}
  assert bad["pins"] == generated["bad_rows"]["pins"]
  # Dropped: the future rows do not move the time split, and their texts reach nothing.
  assert summary["split"]["eval_end"] == (t_max // DAY + 1) * DAY
  texts = pq.read_table(tmp_path / "out" / "entities" / "queries.parquet")["text"].to_pylist()
  assert "stampword" not in texts
  unigrams = (tmp_path / "out" / "ngram_vocab" / "unigram.txt").read_text().splitlines()
  assert "stampboard" not in unigrams
  with open(tmp_path / "out" / "meta.json") as f:
    assert '"negative_timestamp": 3' in f.read()


def test_explicit_split_accepts_zero_but_counts_negative_timestamps(world, raw, tmp_path):
  """A log with a `split` column (Home Depot: no time, timestamps 0) is not split by time."""
  _, generated = world
  log = read(raw, "queries_log")
  log = log.set_column(log.column_names.index("timestamp"), "timestamp",
                       pa.array(np.zeros(log.num_rows, np.int64)))
  log = pa.concat_tables([log, extra_rows(raw, "queries_log", [-1, -2, -DAY], "stampword")
                          .cast(log.schema)])
  split = np.where(np.arange(log.num_rows) % 5 == 0, "eval", "train")
  pq.write_table(log.append_column("split", pa.array(split)), raw / "queries_log.parquet")
  summary = run_prepare(raw, tmp_path)
  assert summary["split"]["kind"] == "column"
  assert summary["bad_rows"]["queries_log"] == {**generated["bad_rows"]["queries_log"],
                                                "negative_timestamp": 3}


# --- the natural variants of each type are accepted, with the same result -------------------------
def test_compatible_type_variants_prepare_the_same(world, raw, tmp_path):
  _, generated = world
  log, pins, products = read(raw, "queries_log"), read(raw, "pins"), read(raw, "products")
  t_max = int(log["timestamp"].to_numpy().max())
  replace_column(raw, "queries_log", "timestamp",
                 pa.array(log["timestamp"].to_numpy() * 1000, pa.timestamp("ms", "UTC")))
  replace_column(raw, "queries_log", "entity_kind", log["entity_kind"].dictionary_encode())
  replace_column(raw, "queries_log", "engagement", log["engagement"].cast(pa.large_string()))
  replace_column(raw, "pins", "pinsage", pins["pinsage"].cast(pa.list_(pa.float32(), 256)))
  replace_column(raw, "pins", "visual_bits", pins["visual_bits"].cast(pa.binary(128)))
  replace_column(raw, "pins", "id", pins["id"].cast(pa.large_string()))
  replace_column(raw, "products", "itemsage", products["itemsage"].cast(
      pa.large_list(pa.float64())))
  replace_column(raw, "products", "image_bits", products["image_bits"].cast(
      pa.large_list(pa.large_binary())))
  saves = read(raw, "board_saves")
  replace_column(raw, "board_saves", "timestamp", saves["timestamp"].cast(pa.uint32()))
  summary = run_prepare(raw, tmp_path)
  assert summary["bad_rows"] == generated["bad_rows"]
  assert summary["split"]["eval_end"] == (t_max // DAY + 1) * DAY
  for kind in ("pins", "products"):
    assert summary["entities"][kind] == generated["rows"][kind] - sum(
        generated["bad_rows"][kind].values())


# --- through launch.py: exit 2, `error: ...` on stderr, no traceback, the closing JSON line -------
def launch_prepare(raw, tmp_path):
  result = run_launch("prepare", f"--config={TINY_CONFIG}:tiny", f"--workdir={tmp_path}",
                      f"--config.data.raw_dir={raw}")
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  error = last_json(result)["prepare"]["error"]
  assert f"error: {error}" in result.stderr
  return error


def test_launch_prepare_string_pinsage_exits_2(raw, tmp_path):
  replace_column(raw, "pins", "pinsage", pa.array(["x"] * read(raw, "pins").num_rows))
  error = launch_prepare(raw, tmp_path)
  assert "pins table" in error and "pins.parquet" in error and "'pinsage'" in error
  assert "Arrow type string" in error


def test_launch_prepare_invalid_utf8_exits_2(raw, tmp_path):
  values = read(raw, "products")["description"].to_pylist()
  replace_column(raw, "products", "description", not_utf8(values, 3))
  error = launch_prepare(raw, tmp_path)
  assert "products.parquet" in error and "'description'" in error and "UTF-8" in error


def test_launch_prepare_empty_pins_exits_2(raw, tmp_path):
  pq.write_table(read(raw, "pins").slice(0, 0), raw / "pins.parquet")
  error = launch_prepare(raw, tmp_path)
  assert "pins.parquet is empty (0 rows)" in error and "q2pin" in error
