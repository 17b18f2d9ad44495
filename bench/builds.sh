#!/usr/bin/env bash
# The same ringpush-bench scenarios against several ringpush builds, taking turns within
# each repetition (so a slow drift of the machine touches them all alike), then one table.
# For before/after figures of a change: build the old commit's binary elsewhere
# (`git worktree add /tmp/old COMMIT && CARGO_TARGET_DIR=/tmp/old-target cargo build
# --release -p ringpush`) and pass both. Needs a quiet machine; about 2.5 minutes per build
# and repetition.
#
#   bench/builds.sh [--reps N] BIN...     # e.g. bench/builds.sh /tmp/old-target/release/ringpush target/release/ringpush
set -euo pipefail
cd "$(dirname "$0")/.."
reps=3
if [ "${1:-}" = --reps ]; then reps=$2; shift 2; fi
[ $# -gt 0 ] || { sed -n '2,9p' "$0"; exit 2; }
bench=target/release/ringpush-bench
out=target/builds.jsonl
: > "$out"
run() { # BIN LABEL REP CASE ARGS...
  local bin=$1 label=$2 rep=$3 case=$4 json
  shift 4
  json=$("$bench" "$@" --server-bin "$bin" --json 2> /dev/null)
  printf '{"bin":"%s","rep":%d,"case":"%s","r":%s}\n' "$label" "$rep" "$case" "$json" >> "$out"
}
for rep in $(seq "$reps"); do
  for bin in "$@"; do
    label=$bin
    run "$bin" "$label" "$rep" "echo 64B x100 p16" echo --size 64 --conns 100 --pipeline 16 --duration 5
    run "$bin" "$label" "$rep" "echo 1KiB x100 p1" echo --size 1024 --conns 100 --pipeline 1 --duration 5
    run "$bin" "$label" "$rep" "im saturation" im --duration 10
    run "$bin" "$label" "$rep" "im rate 2000" im --rate 2000 --duration 10
    run "$bin" "$label" "$rep" "idle 10000" idle --conns 10000
    echo "rep $rep: $bin done" >&2
  done
done
python3 - "$out" "$@" <<'PY'
import json, sys, collections
rows = [json.loads(line) for line in open(sys.argv[1])]
bins = sys.argv[2:]
figures = collections.defaultdict(list)
for r in rows:
    case, x = r["case"], r["r"]
    def put(name, value):
        figures[(case, name, r["bin"])].append(value)
    if case.startswith("echo"):
        put("round trips/s", x["round_trips_per_sec"])
        put("server µs/msg", x["server_cpu_us_per_msg"])
        put("p99 µs", x["latency"]["p99_us"])
    elif case.startswith("im"):
        p = x["phases"][0]
        if case == "im saturation":
            put("deliveries/s", p["deliveries_per_sec"])
        put("server µs/delivery", p["server_cpu_us_per_delivery"])
        if case != "im saturation":
            put("deliver p50 ms", p["deliver_latency"]["p50_us"] / 1000)
            put("deliver p99 ms", p["deliver_latency"]["p99_us"] / 1000)
    else:
        put("bytes/conn", x["bytes_per_conn"])
rows_seen = []
for case, name, _ in figures:
    if (case, name) not in rows_seen:
        rows_seen.append((case, name))
print("| case | figure | " + " | ".join(bins) + " |")
print("|" + "---|" * (2 + len(bins)))
for case, name in rows_seen:
    cells = [" / ".join(f"{v:.4g}" for v in figures.get((case, name, b), [])) or "-" for b in bins]
    print(f"| {case} | {name} | " + " | ".join(cells) + " |")
PY
