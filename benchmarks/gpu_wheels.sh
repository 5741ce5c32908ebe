#!/usr/bin/env bash
# Download the wheels benchmarks/gpu.py needs on the lent GPU machine into .whl/ (ignored by git; carried there).
# That machine has Python 3.12, torch 2.11 and transformers 5.17, below slowfast-adapter's floor (5.18), and no
# network: it gets the transformers release the project is tested on. Its huggingface_hub (1.33), tokenizers,
# safetensors, peft and einops already satisfy that release and the project. See benchmarks/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
TRANSFORMERS="${TRANSFORMERS:-transformers==5.24.0}"
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
rm -rf .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "$TRANSFORMERS"
ls -la .whl
