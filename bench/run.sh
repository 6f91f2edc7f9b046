#!/usr/bin/env bash
# portwake benchmark suite: builds, checks its tools, runs every comparison as
# paired, alternating rounds and writes BENCHMARKS.md at the repository root.
#
#   bench/run.sh [--quick] [--only latency,datapath,scale,burst,herd,engines]
#                [--rounds X] [--idle-secs N] [--sizes 1000,10000,50000]
#                [--json FILE] [--out FILE]
#
# Needs: Linux, Rust (cargo), python3, a C compiler, wrk, systemd's
# systemd-socket-activate and systemd-socket-proxyd; root for the engine tests.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

want_engines=1
for a in "$@"; do
    case "$a" in --only=*) [[ "${a#--only=}" == *engines* ]] || want_engines=0 ;; esac
done
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    if [[ "${args[$i]}" == --only ]]; then
        [[ "${args[$((i + 1))]:-}" == *engines* ]] || want_engines=0
    fi
done

say() { printf '== %s\n' "$*" >&2; }

# ---- tools
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v systemd-socket-activate >/dev/null && [[ -x /lib/systemd/systemd-socket-proxyd ]] || missing+=(systemd)
command -v cc >/dev/null || missing+=(gcc)
command -v python3 >/dev/null || missing+=(python3)
if ((${#missing[@]})); then
    if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
        say "installing ${missing[*]}"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "missing tools: ${missing[*]} (Debian: apt-get install ${missing[*]})" >&2
        exit 1
    fi
fi
command -v cargo >/dev/null || { echo "cargo not found" >&2; exit 1; }

# ---- fd limit: the scale section holds up to 50,000 listeners in one process.
hard=$(ulimit -Hn)
if [[ $hard != unlimited && $hard -lt 65536 ]]; then
    ulimit -Hn 65536 2>/dev/null || say "cannot raise the hard fd limit above $hard (no CAP_SYS_RESOURCE); scale sizes above it are capped"
fi
ulimit -Sn "$(ulimit -Hn)"

# ---- build
say "building (release)"
cargo build --release --workspace --quiet
if ((want_engines)); then
    say "building (debug, for the engine tests)"
    cargo build --workspace --quiet || say "debug build failed: the engine section will report it"
fi
BIN=$ROOT/target/bench/bin
rm -rf "$BIN" && mkdir -p "$BIN"
cp target/release/portwake target/release/hello-guest target/release/libportwake_*.so "$BIN"/
cc -O2 -Wall -o "$BIN/bindfloor" bench/bindfloor.c

say "running the suite"
PORTWAKE_BENCH_BIN=$BIN exec python3 bench/suite.py "$@"
