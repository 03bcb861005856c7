#!/bin/sh
# Makes sure the compiler $1 (default clang++) can build a libFuzzer target
# (-fsanitize=fuzzer,address,undefined). If it cannot, installs Debian's clang with apt-get
# (root only), plus the libclang-rt package that holds libFuzzer where apt skips
# recommended packages, waiting for a dpkg/apt lock that another process holds (up to
# ZEROCKPT_APT_WAIT seconds, default 600). Quiet and quick when clang already works.
# Exits 1 with one line on stderr when clang cannot be had; `make test` then skips fuzzing.
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
  echo "fuzz: '$cxx' cannot build libFuzzer targets and $1; install clang with libFuzzer" \
    "(Debian: apt-get install clang libclang-rt-dev) or pass FUZZ_CXX=<such a clang++>." >&2
  exit 1
}

# apt-get with a bounded wait for the dpkg and lists locks (another apt, unattended-upgrades).
wait_s=${ZEROCKPT_APT_WAIT:-600}
apt() {
  deadline=$(($(date +%s) + wait_s))
  while :; do
    apt-get -o DPkg::Lock::Timeout=60 "$@" >>"$log" 2>&1 && return 0
    grep -qiE 'could not get lock|unable to acquire|lock-frontend|is another process using it' "$log" ||
      return 1
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    echo "fuzz: waiting for the apt/dpkg lock held by another process ..." >&2
    sleep 10
  done
}

[ "$cxx" = clang++ ] || fail "only the default FUZZ_CXX=clang++ is installed automatically"
[ "$(id -u)" = 0 ] || fail "installing clang automatically needs root"
command -v apt-get >/dev/null 2>&1 || fail "installing clang automatically needs apt-get"

echo "fuzz: installing clang with apt-get (once) ..."
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
if ! { apt update -qq && apt install -y -qq clang; }; then
  tail -n 5 "$log" >&2
  rm -f "$log"
  fail "apt-get install clang failed (its last lines above)"
fi
if ! probe; then
  # libFuzzer lives in libclang-rt-N-dev, only recommended by clang's packages.
  major=$(clang++ -dumpversion 2>/dev/null | cut -d. -f1)
  apt install -y -qq "libclang-rt-$major-dev" || tail -n 5 "$log" >&2
fi
rm -f "$log"
probe || fail "it still cannot after installing clang"
echo "fuzz: $(clang++ --version | head -n 1) with libFuzzer is ready"
