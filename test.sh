#!/usr/bin/env bash
# Supra's test suite: the lesson cells of every library notebook (nbdev-test), then the
# integration tests in tests/ (pytest: papermill runs at the smoke preset, resume after SIGKILL,
# DDP, lm-eval parity, the paper and the dashboard in headless Chromium).
# Data: $SUPRA_DATA if set, else ../shared/data when it exists, else the Hugging Face Hub.
set -euo pipefail
cd "$(dirname "$0")"
if [ -z "${SUPRA_DATA:-}" ] && [ -d ../shared/data ]; then export SUPRA_DATA=$(cd ../shared/data && pwd); fi
export SUPRA_CACHE=${SUPRA_CACHE:-$(pwd)/outputs/test-cache}
export PATH="$(pwd)/.venv/bin:$PATH"
# two test processes share the two cores: one thread each (a tiny model's ops split over threads would only wait on the
# other process's work), and idle OpenMP workers sleep, not spin
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
echo "== lesson cells (nbdev-test) — SUPRA_DATA=${SUPRA_DATA:-<hub>}"
nbdev-test --n-workers 2 --file-re '^\d' --timing
echo "== integration tests (pytest)"
# two workers, a test file each at a time (its module-scoped smoke run stays in one process), the longest files first
# (tests/conftest.py: LONGEST_FIRST); `-n 0` for one process
python -m pytest tests -q -p no:cacheprovider -n 2 --dist loadfile --no-loadscope-reorder "$@"
