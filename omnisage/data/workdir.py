"""Where a run's files live: the prepared data directory of a config and workdir, and the public
datasets root (../shared/datasets, or $OMNISAGE_DATASETS).

Usage: `prepared = prepared_dir_of(config, workdir)`.
"""

import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def prepared_dir_of(config, workdir: str) -> str:
  """`config.data.prepared_dir` when set, else <workdir>/prepared (what `prepare` writes)."""
  return config.data.get("prepared_dir") or os.path.join(workdir, "prepared")


def datasets_root() -> str:
  """$OMNISAGE_DATASETS, else the `shared/datasets` folder beside the checkout."""
  return os.environ.get("OMNISAGE_DATASETS") or os.path.join(os.path.dirname(REPO), "shared",
                                                             "datasets")
