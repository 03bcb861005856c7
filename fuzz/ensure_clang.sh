#!/bin/sh
# Makes sure the compiler $1 (default clang++) can build a libFuzzer target
# (-fsanitize=fuzzer,address,undefined). If it cannot, installs Debian's clang with apt-get
# (root only), plus the libclang-rt package that holds libFuzzer where apt skips
# recommended packages. Quiet and quick when clang already works.
set -u
cxx=${1:-clang++}

probe() {
  dir=$(mktemp -d) || return 1
  printf '%s\n' 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }' >"$dir/probe.cpp"
  "$cxx" -fsanitize=fuzzer,address,undefined "$dir/probe.cpp" -o "$dir/probe" >"$dir/log" 2>&1 &&
    "$dir/probe" -runs=1 >>"$dir/log" 2>&1
  rc=$?
  rm -rf "$dir"
  return $rc
}

probe && exit 0

fail() {
  echo "fuzz: '$cxx' cannot build libFuzzer targets (-fsanitize=fuzzer) and $1. Install clang" \
    "with libFuzzer by hand (Debian/Ubuntu: apt-get install clang libclang-rt-dev), or run" \
    "make fuzz FUZZ_CXX=<a clang++ that has it>." >&2
  exit 1
}

[ "$cxx" = clang++ ] || fail "only the default FUZZ_CXX=clang++ is installed automatically"
[ "$(id -u)" = 0 ] || fail "installing clang automatically needs root"
command -v apt-get >/dev/null 2>&1 || fail "installing clang automatically needs apt-get"

echo "fuzz: installing clang with apt-get (once) ..."
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
if ! { apt-get update -qq && apt-get install -y -qq clang; } >"$log" 2>&1; then
  tail -n 20 "$log" >&2
  rm -f "$log"
  fail "apt-get install clang failed (output above)"
fi
if ! probe; then
  # libFuzzer lives in libclang-rt-N-dev, only recommended by clang's packages.
  major=$(clang++ -dumpversion 2>/dev/null | cut -d. -f1)
  apt-get install -y -qq "libclang-rt-$major-dev" >"$log" 2>&1 || tail -n 20 "$log" >&2
fi
rm -f "$log"
probe || fail "it still cannot after installing clang"
echo "fuzz: $(clang++ --version | head -n 1) with libFuzzer is ready"
