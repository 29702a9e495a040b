#!/usr/bin/env bash
# Install Supra into ./.venv and register its Jupyter kernel. Idempotent: re-running is cheap.
#   ./install.sh          the package, JupyterLab, papermill and the kernel
#   ./install.sh --dev    also the test tools (trackio, TensorBoard, W&B, psycopg2), headless Chromium for the browser
#                         tests and PostgreSQL for the shared-sweep test
#   ./install.sh --data DIR   use DIR (laid out like shared/data, see its MANIFEST.md) as the local data root
# The data root — DIR, else ../shared/data beside this checkout when it exists — is recorded in .venv/supra-data, which
# Supra reads in every process of this venv (kernel, papermill, the supra command, tests); $SUPRA_DATA, when set, wins.
# Without one, the named corpora and evaluation sets come from the Hugging Face Hub.
# Where the machine allows it (root with apt), it also installs jemalloc, which speeds up CPU
# training by 40-60%; every Supra entry point preloads it: the supra command, python -m supra.train and supra.bench,
# each torchrun rank, and the supra kernel.
set -euo pipefail
DEV=0; DATA=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) DEV=1 ;;
    --data) [ $# -ge 2 ] || { echo "install.sh: --data needs a directory (./install.sh --data DIR)" >&2; exit 2; }; DATA=$2; shift ;;
    --data=*) DATA=${1#--data=} ;;
    *) echo "install.sh: unknown option '$1' (allowed: --dev, --data DIR)" >&2; exit 2 ;;
  esac
  shift
done
if [ -n "$DATA" ]; then   # resolved against the directory install.sh was started from
  [ -d "$DATA" ] || { echo "install.sh: --data '$DATA' is not a directory (a data root laid out like shared/data)" >&2; exit 2; }
  DATA=$(cd "$DATA" && pwd)
fi
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

# System libraries (optional): jemalloc and WordNet always; with --dev chromium and postgresql for the tests.
pkgs=""
ldconfig -p 2>/dev/null | grep -q libjemalloc.so.2 || pkgs="libjemalloc2"
[ $DEV = 1 ] && ! command -v chromium >/dev/null 2>&1 && pkgs="$pkgs chromium"
# PostgreSQL server binaries for the two-worker shared-sweep test (tests/test_sweep.py starts a throwaway cluster)
[ $DEV = 1 ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1 && pkgs="$pkgs postgresql"
# WordNet 3.0 for flm's WordNet losses (supra.flm.wordnet reads it with NLTK; without it flm trains without them and says so)
[ -f /usr/share/wordnet/data.noun ] || pkgs="$pkgs wordnet-base"
if [ -n "$pkgs" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "install.sh: apt-get install $pkgs"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $pkgs >/dev/null) \
    || echo "install.sh: could not install $pkgs (continuing without)"
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
extra=""; [ $DEV = 1 ] && extra="[dev]"
.venv/bin/python -m pip install -q --upgrade pip 2>/dev/null || true
.venv/bin/python -m pip install -q -e ".${extra}"

# The Jupyter kernel that papermill and JupyterLab use for Supra's notebooks: this venv's Python, registered inside the
# venv (sys.prefix) so that it never points at another checkout. Its command is supra.train.runtime.launch_kernel, which
# restarts the kernel once with jemalloc preloaded where present (MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1 unless
# you set your own), like every Supra entry point; SUPRA_NO_JEMALLOC=1 turns it off. See nbs/03_train/01_runtime.ipynb.
JE=$(.venv/bin/python -c "from supra.train.runtime import jemalloc_path; print(jemalloc_path() or '')")
.venv/bin/python -c "from supra.train.runtime import install_kernel; install_kernel()" >/dev/null

# The data root, recorded where every process of this venv finds it (supra.data.corpus.data_root reads <venv>/supra-data)
[ -z "$DATA" ] && [ -d ../shared/data ] && DATA=../shared/data
if [ -n "$DATA" ]; then
  DATA=$(cd "$DATA" && pwd)
  known=0; for d in wikipedia-en fineweb-edu blimp arc_easy boolq wikitext2; do [ -d "$DATA/$d" ] && known=1; done
  [ $known = 1 ] || echo "install.sh: warning: $DATA holds none of wikipedia-en, fineweb-edu, blimp, arc_easy, boolq, wikitext2 (layout of shared/data)"
  echo "$DATA" > .venv/supra-data
  datamsg="data root $DATA"
elif [ -f .venv/supra-data ]; then
  datamsg="data root $(cat .venv/supra-data) (recorded earlier)"
else
  datamsg="no data root: named data sets stream from the Hugging Face Hub (./install.sh --data DIR for a local copy)"
fi
echo "install.sh: ok — kernel 'supra' -> $(pwd)/.venv/bin/python${JE:+ (jemalloc: $JE)}; $datamsg"
