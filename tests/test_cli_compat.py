"""Earlier releases' command lines keep working (omnisage/cli_compat.py)."""

from omnisage.cli_compat import translate_argv

JOBS = {"embed": "index.py", "index": "index.py", "bench": "index.py", "serve": "serve.py"}


def test_dashes_and_system_commands_untouched():
  argv = ["launch.py", "train", "--config=c.py:tiny", "--host-malloc=default",
          "--config.train.steps=3"]
  assert translate_argv(argv, "CFG", JOBS) == [
      "launch.py", "train", "--config=c.py:tiny", "--host_malloc=default",
      "--config.train.steps=3"]


def test_old_serve_flags_become_config_fields(capsys):
  argv = ["launch.py", "serve", "--bundle=B", "--index=I", "--port=0", "--max-batch=8"]
  assert translate_argv(argv, "CFG", JOBS) == [
      "launch.py", "serve", "--config=CFG/serve.py", "--config.bundle=B", "--config.index=I",
      "--config.port=0", "--config.max_batch=8"]
  assert "`--bundle` is `--config.bundle` now" in capsys.readouterr().err


def test_new_job_form_gets_its_default_config_once():
  argv = ["launch.py", "index", "--config.embeddings=E", "--out=O"]
  assert translate_argv(argv, "CFG", JOBS) == [
      "launch.py", "index", "--config=CFG/index.py", "--config.embeddings=E", "--out=O"]
  own = ["launch.py", "index", "--config=mine.py", "--config.embeddings=E", "--out=O"]
  assert translate_argv(own, "CFG", JOBS) == own


def test_old_embed_with_a_system_config_ignores_it():
  argv = ["launch.py", "embed", "--config=configs/omnisage_synthetic.py:tiny", "--workdir=W",
          "--bundle=B", "--entities=P", "--out=O", "--embed-batch-size=16"]
  assert translate_argv(argv, "CFG", JOBS) == [
      "launch.py", "embed", "--config=CFG/index.py", "--workdir=W", "--config.bundle=B",
      "--config.entities=P", "--out=O", "--config.batch_size=16"]


def test_old_pinnersage_command_is_train_with_its_config(capsys):
  argv = ["launch.py", "pinnersage", "--item-embeddings=E", "--actions=A", "--out=D",
          "--lambda-decay=0.1", "--alpha=0.5"]
  assert translate_argv(argv, "CFG", JOBS) == [
      "launch.py", "train", "--config=CFG/pinnersage_movielens.py", "--config.item_embeddings=E",
      "--config.actions=A", "--workdir=D", "--config.lam=0.1", "--config.alpha=0.5"]
  assert "launch.py train --config=configs/pinnersage_movielens.py" in capsys.readouterr().err
