#!/bin/sh
# Sabotage run (docs/device_testing.md): for each site of csrc/torch/sabotage.h (a stream wait,
# event record or synchronisation in device_staging.cpp / async_save.cpp), builds zerockpt._C
# without it in build/sabotage (only those two files recompile), runs the device tests on the
# test accelerator zpu against that build, and records which tests fail. A site that no test
# notices fails the run. Usage: tools/sabotage_device.sh [SITE ...]   (default: every site)
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PY:-$ROOT/.venv/bin/python}
BIN=$(dirname "$PY")
BUILD=$ROOT/build/sabotage
PKG=$BUILD/pkg
TABLE=$BUILD/table.md
SITES=${*:-$(sed -n 's/.*ZEROCKPT_SITE(\([0-9]*\)).*/\1/p' csrc/torch/*.cpp | sort -n | uniq)}
DELAY=${ZPU_DELAY_US:-0-300}
TIMEOUT=${SABOTAGE_TIMEOUT:-600}

[ -f build/accel/libzerockpt_test_accel.so ] || { echo "run make test-accel first"; exit 2; }

# The device tests against the package in $PKG (not the editable install), zpu only.
run_tests() {
  ZPU_DELAY_US=$DELAY timeout "$TIMEOUT" "$PY" -c "
import sys
sys.meta_path[:] = [f for f in sys.meta_path if '_editable_skbc' not in type(f).__module__]
sys.path.insert(0, '$PKG')
import pytest, zerockpt
assert zerockpt.__file__.startswith('$PKG'), zerockpt.__file__
sys.exit(pytest.main(['tests/test_device.py', '-q', '-rfE', '-k', 'zpu', '-p', 'no:cacheprovider']))
" > "$BUILD/site-$1.log" 2>&1
  echo $?
}

build_site() {
  "$BIN/cmake" -S . -B "$BUILD" -G Ninja -DCMAKE_MAKE_PROGRAM="$BIN/ninja" \
    -DPython_EXECUTABLE="$PY" -DZEROCKPT_SABOTAGE="$1" > "$BUILD/configure.log" 2>&1 &&
    "$BIN/cmake" --build "$BUILD" --target _C > "$BUILD/build-$1.log" 2>&1 || {
    echo "build of site $1 failed: $BUILD/build-$1.log"
    exit 2
  }
  mkdir -p "$PKG/zerockpt"
  for f in python/zerockpt/*; do ln -sf "$ROOT/$f" "$PKG/zerockpt/"; done
  cp "$BUILD"/_C.*.so "$PKG/zerockpt/"
}

# What a site is: the source line that the switch guards (and the next one after a brace).
describe() {
  grep -n -A1 "ZEROCKPT_SITE($1)" csrc/torch/device_staging.cpp csrc/torch/async_save.cpp |
    sed 's/^csrc\/torch\///; s/ZEROCKPT_SITE([0-9]*)/1/; s/[-:][0-9]*[-:]  */: /' |
    awk 'NR == 1 { line = $0; more = /[{]$/ } NR == 2 && more { sub(/^[^:]*: /, " "); line = line $0 }
         END { print line }' | tr -s ' ' | cut -c1-120
}

mkdir -p "$BUILD"
status=0
build_site 0
rc=$(run_tests 0)
if [ "$rc" != 0 ]; then
  echo "the unsabotaged build fails the device tests (exit $rc): $BUILD/site-0.log"
  exit 1
fi
{
  echo "| site | what is removed (file:line) | failing device tests (zpu, ZPU_DELAY_US=$DELAY) |"
  echo "|---|---|---|"
} > "$TABLE"
for site in $SITES; do
  build_site "$site"
  rc=$(run_tests "$site")
  # Test names without their parameters; "(teardown)": zpu saw freed memory used.
  failed=$(sed -n -e 's/^FAILED tests\/test_device.py::\([^[ ]*\).*/\1/p' \
    -e 's/^ERROR tests\/test_device.py::\([^[ ]*\).*/\1 (teardown)/p' "$BUILD/site-$site.log" |
    uniq | tr '\n' ',' | sed 's/,$//; s/,/, /g')
  case $rc in
    0) failed="NONE (no test noticed)"; status=1 ;;
    124 | 137) failed="timed out (${TIMEOUT} s): $failed" ;;
    1) ;;
    *) failed="crashed (exit $rc) $failed" ;;
  esac
  echo "| $site | \`$(describe "$site")\` | $failed |" >> "$TABLE"
  echo "site $site: $failed"
done
cat "$TABLE"
exit $status
