#!/usr/bin/env bash
# The GPU machine's image may lack pytest (it has torch, numpy, pillow; DALI comes from
# ../shared/gpu/prepare.sh). This downloads pytest and its pure-Python dependencies as wheels
# into .gpu/py (git-ignored, about 2 MB), for the call that runs gpu_suite.sh to carry
# (carry [".gpu/py", ...]); gpu_suite.sh installs them into /tmp only when `import pytest`
# fails there. Run here, in the project root, where the package registry is reached:
#   bash benchmarks/gpu_kit.sh
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu/py && mkdir -p .gpu/py
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp -d .gpu/py "pytest>=7" "pluggy>=1.6,<2" "iniconfig>=2" "packaging>=24" \
  "pygments>=2.15"
ls -la .gpu/py
