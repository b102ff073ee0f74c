#!/usr/bin/env bash
# normkit as a user gets it: build the sdist and the wheel from it (python -m build), check what they carry, install
# the wheel (not editable) with its lightning extra and triton in a fresh venv, and from outside the checkout run
# `normkit --version`, the demo on both datasets, and the import check (.ci/import_budget.py).
# Environment: PYTHON (default python3), TORCH (the torch requirement, default torch==2.13.0), IMPORT_BUDGET_S.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
work=$(mktemp -d "${TMPDIR:-/tmp}/normkit-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT
pip_quiet=(--quiet --disable-pip-version-check)
version=$("$PYTHON" -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])")

step() { printf '\n== wheel-check (%ds): %s\n' "$SECONDS" "$*"; }

step "build the sdist, then the wheel from it"
"$PYTHON" -m venv "$work/build-venv"
"$work/build-venv/bin/python" -m pip install "${pip_quiet[@]}" "build>=1"
"$work/build-venv/bin/python" -m build --outdir "$work/dist" . > "$work/build.log" 2>&1 \
    || { cat "$work/build.log"; exit 1; }
ls -l "$work/dist"
"$PYTHON" .ci/wheel_contents.py "$work/dist"

step "install the wheel in a fresh venv ($TORCH, the lightning extra, triton)"
"$PYTHON" -m venv "$work/venv"
bin=$work/venv/bin
"$bin/python" -m pip install "${pip_quiet[@]}" "$TORCH"
wheel=$(ls "$work"/dist/normkit-*.whl)
# triton is not a dependency of a CPU torch; installed so that the import check can see it is not imported
"$bin/python" -m pip install "${pip_quiet[@]}" "$wheel[lightning]" "triton>=3.2; platform_system == 'Linux' and platform_machine == 'x86_64'"

cd "$work"  # away from the checkout: nothing may come from src/
location=$("$bin/python" -c "import normkit; print(normkit.__file__)")
case $location in
    "$work/venv/lib/"*/site-packages/normkit/__init__.py) echo "normkit imported from $location" ;;
    *) echo "wheel-check: FAIL: normkit imported from $location, expected the fresh venv's site-packages" >&2; exit 1 ;;
esac
if "$bin/python" -m pip show -f normkit | grep -q -i -e '__editable__' -e '\.egg-link'; then
    echo "wheel-check: FAIL: normkit is installed editable in the fresh venv" >&2; exit 1
fi

step "normkit --version"
printed=$("$bin/normkit" --version)
echo "$printed"
[ "$printed" = "normkit $version" ] \
    || { echo "wheel-check: FAIL: expected 'normkit $version' (pyproject.toml), got '$printed'" >&2; exit 1; }

for dataset in digits mnist1d; do
    step "normkit demo --steps 100 --dataset $dataset"
    NORMKIT_CACHE_DIR=$work/cache "$bin/normkit" demo --steps 100 --dataset "$dataset" --out "$work/demo-$dataset"
    "$bin/python" - "$work/demo-$dataset" "$dataset" <<'EOF'
import json, sys
from pathlib import Path
out, dataset = Path(sys.argv[1]), sys.argv[2]
png = (out / "normkit-demo.png").read_bytes()
if not png.startswith(b"\x89PNG\r\n\x1a\n") or len(png) < 10_000:
    sys.exit(f"wheel-check: FAIL: {out}/normkit-demo.png is not a plotted PNG ({len(png)} bytes)")
result = json.loads((out / "normkit-demo.json").read_text())
if result["config"]["dataset"] != dataset or not result["arms"]:
    sys.exit(f"wheel-check: FAIL: normkit-demo.json has dataset {result['config'].get('dataset')!r} and arms "
             f"{list(result['arms'])}; expected {dataset!r} and both arms")
print(f"demo ok: {dataset}, arms {', '.join(result['arms'])}, {len(png)} bytes of PNG")
EOF
done

step "import normkit: no heavy optional module, within the time budget"
"$bin/python" "$root/.ci/import_budget.py" --budget-s "${IMPORT_BUDGET_S:-0.5}"
printf '\nwheel-check: ok (%ds)\n' "$SECONDS"
