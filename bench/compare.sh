#!/usr/bin/env bash
# Side by side, in one run: ringpush against the servers a team would pick instead
# (bench/peers/: tokio-tungstenite twice, fastwebsockets, the Node ws package, and a plain
# TCP echo as the ceiling), then ringpush's own scenarios. Writes bench/RESULTS.md and the
# summary block of README.md. Needs a quiet machine: nothing else running.
#
#   bench/compare.sh                 # the full run (about 35 minutes on 2 cores)
#   bench/compare.sh --quick         # everything with tiny durations, to check the script
#                                    # (about 2 minutes; writes target/compare/RESULTS.md only)
#   options: --reps N (default 3)  --servers "ringpush node-ws ..."  --parts "echo idle upgrades alone"
#            --out FILE (default bench/RESULTS.md, and then README.md's summary block is
#            rewritten too; with --quick target/compare/RESULTS.md)
#
# Each run starts its server afresh, pinned with taskset to CPU 0 (ringpush with
# shards = 1), and the load generator on CPU 1; servers take turns within each
# repetition, so a slow drift of the machine touches them all alike. Every figure comes
# from `ringpush-bench ... --json`; `ringpush-bench tabulate` makes the tables and checks
# the goals. Logs: target/compare/ (runs.jsonl, bench.log, one log per server start).
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
reps=""
servers="ringpush tungstenite tungstenite-4k fastwebsockets node-ws tcp"
parts="echo idle upgrades alone"
out=""
while [ $# -gt 0 ]; do
  case $1 in
    --quick) quick=1 ;;
    --reps) reps=$2; shift ;;
    --servers) servers=$2; shift ;;
    --parts) parts=$2; shift ;;
    --out) out=$2; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "compare.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
work=target/compare
mkdir -p "$work"
runs=$work/runs.jsonl
blog=$work/bench.log
: > "$runs"
: > "$blog"

# Sizes as the published suites use them, plus the issue's goal cases (64 B and 512 B x
# 100 connections, pipeline 16). "size conns pipeline".
echo_cases=(
  "20 100 16" "64 100 16" "512 100 16" "512 500 16" "1024 100 16" "1024 500 16" "16384 200 16"
  "20 100 1" "64 100 1" "512 100 1" "512 500 1" "1024 100 1" "1024 500 1" "16384 200 1"
)
if [ "$quick" = 1 ]; then
  reps=${reps:-1}
  dur=0.2 warm=0.1 idle_conns=1000 storm=1000
  out=${out:-$work/RESULTS.md}
else
  reps=${reps:-3}
  dur=5 warm=1 idle_conns=19000 storm=19000
  out=${out:-bench/RESULTS.md}
fi

# RINGPUSH_* variables would override the generated configuration.
for v in $(compgen -e | grep '^RINGPUSH_' || true); do unset "$v"; done

for tool in taskset node npm; do
  command -v "$tool" > /dev/null || {
    echo "compare.sh: needs $tool (Debian: apt-get install util-linux nodejs npm)" >&2
    exit 2
  }
done
echo "compare.sh: building ringpush, the bench and the peers"
cargo build --release --workspace -q
# --locked: the peers' versions are the ones in bench/peers/Cargo.lock and package-lock.json.
cargo build --release -q --locked --manifest-path bench/peers/Cargo.toml
npm ci --prefix bench/peers/node --no-audit --no-fund --loglevel=error > /dev/null
bench=target/release/ringpush-bench
peers=bench/peers/target/release

cat > "$work/ringpush.toml" <<'EOF'
# bench/compare.sh: one shard, /echo on, everything else at its default.
node_id = "compare"
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shards = 1
api_key = "bench-api-key"

[auth]
secret = "compare-secret"

[diagnostics]
echo = true
EOF

# The version of crate $1 in lock file $2.
lockver() { awk -v n="$1" '$0 == "name = \"" n "\"" { getline; gsub(/version = |"/, ""); print; exit }' "$2"; }

pid="" addr="" admin=""
start_server() {
  local name=$1 log=$work/server-$1.log
  local cmd
  case $name in
    ringpush) cmd=(target/release/ringpush serve --config "$work/ringpush.toml") ;;
    tungstenite) cmd=("$peers/peer-tungstenite") ;;
    tungstenite-4k) cmd=("$peers/peer-tungstenite" --read-buffer 4096) ;;
    fastwebsockets) cmd=("$peers/peer-fastwebsockets") ;;
    node-ws) cmd=(node bench/peers/node/server.js) ;;
    tcp) cmd=("$peers/peer-tcp") ;;
    *) echo "compare.sh: unknown server $name" >&2; exit 2 ;;
  esac
  # Emptied here, not by the redirection below: that one runs in the background and could
  # come after the first look for the listening line, which would find the last run's.
  : > "$log"
  RUST_LOG=${RUST_LOG:-warn,ringpush::server=info} taskset -c "$SERVER_CPU" "${cmd[@]}" >> "$log" 2>&1 &
  pid=$!
  addr="" admin=""
  for _ in $(seq 300); do
    # ringpush: "listening client=ADDR admin=ADDR ..."; the peers: "listening ADDR".
    addr=$(grep -m1 -o 'listening \(client=\)\?[0-9.:]*' "$log" | sed 's/.*[ =]//' || true)
    [ -n "$addr" ] && break
    kill -0 "$pid" 2> /dev/null || break
    sleep 0.05
  done
  if [ -z "$addr" ]; then
    echo "compare.sh: $name did not start; its log:" >&2
    tail -5 "$log" >&2
    stop_server
    return 1
  fi
  admin=$(grep -m1 -o 'admin=[0-9.:]*' "$log" | cut -d= -f2 || true)
}

stop_server() {
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2> /dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2> /dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2> /dev/null || true
  wait "$pid" 2> /dev/null || true
  pid=""
}
trap stop_server EXIT

total=0 done_runs=0 failed_runs=0
# One run: start SERVER, run `ringpush-bench ARGS... --url --pid --json` against it, stop it,
# and append the JSON line (or the failure) to runs.jsonl.
run_case() {
  local group=$1 case=$2 server=$3 rep=$4
  shift 4
  done_runs=$((done_runs + 1))
  printf '[%d/%d] %-9s %-34s %-15s rep %d: ' "$done_runs" "$total" "$group" "$case" "$server" "$rep"
  local flags=() json="" started=$SECONDS
  if ! start_server "$server"; then
    printf '{"group":"%s","case":"%s","server":"%s","rep":%d,"error":"server did not start"}\n' \
      "$group" "$case" "$server" "$rep" >> "$runs"
    failed_runs=$((failed_runs + 1))
    echo "server did not start"
    return 0
  fi
  flags=(--url "ws://$addr" --pid "$pid" --pin-client "$CLIENT_CPU" --json)
  [ "$server" = tcp ] && flags+=(--raw)
  [ -n "$admin" ] && flags+=(--admin "$admin")
  echo "=== $group | $case | $server | rep $rep: $bench $* ${flags[*]}" >> "$blog"
  if json=$(taskset -c "$CLIENT_CPU" "$bench" "$@" "${flags[@]}" 2>> "$blog"); then
    printf '{"group":"%s","case":"%s","server":"%s","rep":%d,"result":%s}\n' \
      "$group" "$case" "$server" "$rep" "$json" >> "$runs"
    echo "ok ($((SECONDS - started)) s)"
  else
    printf '{"group":"%s","case":"%s","server":"%s","rep":%d,"error":"exit %d"}\n' \
      "$group" "$case" "$server" "$rep" "$?" >> "$runs"
    failed_runs=$((failed_runs + 1))
    echo "FAILED (see $blog)"
  fi
  stop_server
}

size_label() { if [ "$1" -ge 1024 ] && [ $(($1 % 1024)) = 0 ]; then echo "$(($1 / 1024)) KiB"; else echo "$1 B"; fi; }
has() { case " $1 " in *" $2 "*) return 0 ;; esac; return 1; }

n_servers=$(wc -w <<< "$servers")
has "$parts" echo && total=$((total + reps * n_servers * ${#echo_cases[@]}))
has "$parts" idle && total=$((total + reps * n_servers))
has "$parts" upgrades && total=$((total + reps * n_servers))

node_ws=$(node -p "require('./bench/peers/node/node_modules/ws/package.json').version")
tokio=$(lockver tokio bench/peers/Cargo.lock)
versions() {
  printf '"ringpush":"ringpush %s on glommio %s, tungstenite %s; shards = 1, /echo, default config; %s",' \
    "$(lockver ringpush Cargo.lock)" "$(lockver glommio Cargo.lock)" "$(lockver tungstenite Cargo.lock)" \
    "$(rustc --version | cut -d' ' -f1-2)"
  printf '"tungstenite":"tokio-tungstenite %s on tokio %s, current-thread runtime, default WebSocketConfig (128 KiB read buffer)",' \
    "$(lockver tokio-tungstenite bench/peers/Cargo.lock)" "$tokio"
  printf '"tungstenite-4k":"the same with read_buffer_size = 4 KiB",'
  printf '"fastwebsockets":"fastwebsockets %s (upgrade through hyper %s) on tokio %s, current-thread runtime",' \
    "$(lockver fastwebsockets bench/peers/Cargo.lock)" "$(lockver hyper bench/peers/Cargo.lock)" "$tokio"
  printf '"node-ws":"ws %s on Node %s, defaults",' "$node_ws" "$(node --version)"
  printf '"tcp":"plain TCP echo on tokio %s: no WebSocket at all, the ceiling"' "$tokio"
}
commit="$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src bench || echo '+changes')"
printf '{"meta":{"date":"%s","commit":"%s","quick":%s,"reps":%d,"cpus":"%s","cpu":"%s","mem_gib":"%s","kernel":"%s","versions":{%s}}}\n' \
  "$(date -u +%Y-%m-%d)" "$commit" "$([ "$quick" = 1 ] && echo true || echo false)" "$reps" "$(nproc)" \
  "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')" \
  "$(free -g | awk '/Mem:/{print $2}')" "$(uname -r)" "$(versions)" > "$runs"

began=$SECONDS
for rep in $(seq "$reps"); do
  if has "$parts" echo; then
    for c in "${echo_cases[@]}"; do
      read -r size conns depth <<< "$c"
      label="$(size_label "$size") x $conns conns, pipeline $depth"
      for s in $servers; do
        run_case echo "$label" "$s" "$rep" echo --size "$size" --conns "$conns" --pipeline "$depth" \
          --duration "$dur" --warmup "$warm"
      done
    done
  fi
  if has "$parts" idle; then
    for s in $servers; do
      run_case idle "$idle_conns idle connections on /echo" "$s" "$rep" idle --path echo --conns "$idle_conns" \
        --client-pings
    done
  fi
  if has "$parts" upgrades; then
    for s in $servers; do
      run_case upgrades "/echo, 64 in flight; storm of $storm" "$s" "$rep" upgrades --duration "$dur" \
        --warmup "$warm" --storm "$storm"
    done
  fi
done
stop_server

# ringpush's own scenarios (the bench starts the server itself), as they print.
alone=$work/alone.md
: > "$alone"
alone_run() {
  echo "ringpush alone: ringpush-bench $*"
  {
    echo "### \`ringpush-bench $*\`"
    echo
    echo '```'
    "$bench" "$@" 2>&1 || echo "(exit $?)"
    echo '```'
    echo
  } >> "$alone"
}
# The same, for a scenario whose figures also go into the tables: its human report goes
# to the alone section, its JSON line into runs.jsonl (group: the scenario).
alone_json() {
  echo "ringpush alone: ringpush-bench $* --json"
  local json
  {
    echo "### \`ringpush-bench $*\`"
    echo
    echo '```'
  } >> "$alone"
  if json=$("$bench" "$@" --json 2>> "$alone"); then
    printf '{"group":"%s","case":"%s","server":"ringpush","rep":1,"result":%s}\n' "$1" "$*" "$json" >> "$runs"
  else
    echo "(exit $?)" >> "$alone"
  fi
  printf '```\n\n' >> "$alone"
}
if has "$parts" alone; then
  if [ "$quick" = 1 ]; then
    alone_run idle --conns 500 --procs 1
    alone_run idle --path echo --burst 65536 --conns 300 --procs 1
    alone_json im --conns 200 --convs 20 --duration 1
    alone_json im --conns 200 --convs 20 --rate 500 --duration 1
    alone_json fanout --members 300 --messages 3
    alone_json floor --conns 300 --rounds 3
  else
    alone_run idle --conns 10000
    alone_run idle --conns 19000
    alone_run idle --path echo --burst 65536 --conns 10000
    alone_json im --duration 10
    # Latency where each message is its own write (little to coalesce), for comparison.
    alone_json im --rate 2000 --duration 10
    alone_json im --rate 4000 --duration 10
    alone_json fanout --members 10000 --messages 20
    alone_json fanout --members 10000 --messages 20 --burst
    # The kernel's floor under fanout's CPU per delivery: the same writes, no server.
    alone_json floor --conns 10000 --rounds 20
    alone_json floor --conns 10000 --rounds 20 --burst
  fi
fi

# README.md's summary comes from full runs written to bench/RESULTS.md only.
readme=()
[ "$quick" = 0 ] && [ "$out" = bench/RESULTS.md ] && readme=(--readme README.md)
{
  echo "# Bench results"
  echo
  echo "Everything below is written by \`bench/compare.sh\`$([ "$quick" = 1 ] && echo ' --quick (tiny durations: checks the script, the figures mean nothing)'); do not edit by hand."
  echo "How each figure is measured: \`bench/README.md\`. In short: every server runs on one"
  echo "thread pinned to CPU 0, the load generator (\`ringpush-bench\`, epoll client processes"
  echo "speaking RFC 6455 themselves, every echo checked byte for byte) on CPU 1, all on"
  echo "loopback. Server CPU is read from \`/proc/PID/task/*/schedstat\` at both ends of each"
  echo "window (\`utime+stime\` of \`/proc/PID/stat\` is in the JSON beside it); it includes"
  echo "the kernel's work in the server's system calls, which on loopback also carries the"
  echo "receiving client's TCP processing. Echo messages are binary; echo windows are"
  echo "${dur} s after ${warm} s of warm-up. Idle and upgrades use \`/echo\` on every server"
  echo "(ringpush's \`/ws\` needs a token per client and greets it; its figures are in"
  echo "\"ringpush alone\" below), and the clients send the pings (no peer sends any)."
  echo
  "$bench" tabulate --runs "$runs" "${readme[@]}"
  if [ -s "$alone" ]; then
    echo "## ringpush alone"
    echo
    echo "Its own scenarios at their headline sizes, as \`ringpush-bench\` prints them"
    echo "(server on CPU 0 with \`shards = 1\`, clients on CPU 1; see \`bench/README.md\`)."
    echo
    cat "$alone"
  fi
} > "$out.tmp"
mv "$out.tmp" "$out"
echo "compare.sh: wrote $out$([ ${#readme[@]} = 0 ] || echo ' and the summary block of README.md')" \
  "in $(((SECONDS - began) / 60)) min $(((SECONDS - began) % 60)) s; $failed_runs of $total side-by-side runs failed"
