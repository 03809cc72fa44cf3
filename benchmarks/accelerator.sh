#!/usr/bin/env bash
# Accelerator path: train-step pairs/s and MFU at the largest batch that fits.
#
# Two sides. On a CPU box with the full environment (TensorFlow tokenises), make the shards:
#   benchmarks/accelerator.sh --prepare-only            # -> runs/accelerator/synthetic/prepared
# carry runs/accelerator/synthetic/prepared to the GPU box, and there (JAX with CUDA, no TF):
#   benchmarks/accelerator.sh [--query-size distilbert] [--max-pairs 65536] [--steps 10]
# Without a GPU, a CPU dry run (tiny config, 2 steps; makes its tiny shards first if needed):
#   benchmarks/accelerator.sh --dry-run
# Env: PYTHON (default .venv/bin/python), PREPARED (the shard directory). Remaining flags go to
# benchmarks/accelerator.py. Prints a table and ends with one JSON line.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
# The repo root importable (omnisage, configs, benchmarks) also for a $PYTHON without the editable
# install, e.g. a CUDA environment on the GPU box.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

dry_run=0 prepare_only=0 args=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    --prepare-only) prepare_only=1 ;;
    *) args+=("$arg") ;;
  esac
done

if (( dry_run )); then
  config="configs/omnisage_synthetic.py:tiny" workdir="runs/accelerator/tiny"
  export JAX_PLATFORMS=cpu
else
  config="configs/omnisage_synthetic.py" workdir="runs/accelerator/synthetic"
fi
prepared="${PREPARED:-$workdir/prepared}"

if [[ ! -f "$prepared/meta.json" ]]; then
  if ! "$PY" -c "import tensorflow_text" 2>/dev/null; then
    echo "error: no shards at $prepared and no TensorFlow here to make them: run" \
         "'benchmarks/accelerator.sh --prepare-only' on a CPU box and carry $prepared over" >&2
    exit 2
  fi
  echo "making shards: launch.py prepare --config=$config -> $prepared" >&2
  JAX_PLATFORMS=cpu "$PY" launch.py prepare --config="$config" --workdir="$workdir" \
    --config.data.prepared_dir="$prepared" >&2
fi
if (( prepare_only )); then
  echo "shards ready in $prepared" >&2
  exit 0
fi
if (( dry_run )); then
  exec "$PY" benchmarks/accelerator.py --dry-run --prepared "$prepared" "${args[@]+"${args[@]}"}"
fi
exec "$PY" benchmarks/accelerator.py --prepared "$prepared" "${args[@]+"${args[@]}"}"
