#!/usr/bin/env bash
# Python users' install: `pip wheel .` from the checkout (offline, Debian's setuptools and wheel),
# the wheel installed into a fresh venv, imported from another directory, one call on a fixture.
# Usage: test_wheel.sh [PYTHON] [BUILD_DIR]. With BUILD_DIR, the wheel packages that tree's module
# (NANSCOPE_BUILD_DIR, as ctest runs it: fast); without, pip configures and builds its own tree.
set -euo pipefail
py=${1:-python3}
root=$(cd "$(dirname "$0")/../.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ -n "${2:-}" ]; then export NANSCOPE_BUILD_DIR=$2; fi

cd "$root"
"$py" -m pip wheel --no-build-isolation --no-deps --no-index -q -w "$tmp/dist" . >"$tmp/pip.log" 2>&1 \
  || { cat "$tmp/pip.log"; exit 1; }
whl=$(ls "$tmp"/dist/nanscope-*.whl)
echo "built $(basename "$whl")"
# numpy from the system (Debian's python3-numpy): the test is offline.
"$py" -m venv --system-site-packages "$tmp/venv"
"$tmp/venv/bin/python" -m pip install --no-index --no-deps -q "$whl"

mkdir "$tmp/elsewhere" && cd "$tmp/elsewhere"
env -u PYTHONPATH "$tmp/venv/bin/python" - "$root" "$tmp/venv" <<'PY'
import pathlib, re, sys
root, venv = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]).resolve()
import nanscope
where = pathlib.Path(nanscope.__file__).resolve()
# The installed module, not the checkout's build/python.
assert venv in where.parents, where
cmake = (root / "CMakeLists.txt").read_text()
assert nanscope.__version__ == re.search(r"project\(nanscope VERSION ([0-9.]+)", cmake).group(1)
t = nanscope.trace(root / "tests/fixtures/models/qwen3-nan", [1, 15, 300], dtype="bf16")
assert t["first_nonfinite"] is not None, t["first_nonfinite"]
t = nanscope.trace(root / "tests/fixtures/models/qwen3-tiny", [1, 15, 300], dtype="bf16")
assert len(t["hidden"]) == 4 and t["first_nonfinite"] is None
print(f"nanscope {nanscope.__version__} from {where}: trace ok")
PY
