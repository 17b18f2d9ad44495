#!/usr/bin/env bash
# Runs the bench scenarios at their headline sizes and writes bench/RESULTS.md with what
# each printed, plus the machine it ran on. The README's figures come from this file.
#   usage: bench/report.sh            (takes a few minutes; needs nothing else running)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace -q
bench=target/release/ringpush-bench
out=bench/RESULTS.md
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT

run() {
  echo "### \`ringpush-bench $*\`" >> "$tmp"
  echo >> "$tmp"
  echo '```' >> "$tmp"
  "$bench" "$@" >> "$tmp" 2>&1 || echo "(exit $?)" >> "$tmp"
  echo '```' >> "$tmp"
  echo >> "$tmp"
}

{
  echo "# Bench results"
  echo
  echo "Written by \`bench/report.sh\` on $(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD)."
  echo "Machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')),"
  echo "$(free -g | awk '/Mem:/{print $2}') GiB, kernel $(uname -r). Server pinned to CPU 0 with"
  echo "\`shards = 1\`, load generator on CPU 1; everything on loopback, so the client's"
  echo "receive work is charged to the server's \`send\` (see bench/README.md)."
  echo
} > "$tmp"
run idle --conns 10000
run idle --conns 19000
run idle --path echo --burst 65536 --conns 10000
run im --duration 10
run fanout --members 10000 --messages 20
run fanout --members 10000 --messages 20 --burst
mv "$tmp" "$out"
trap - EXIT
echo "wrote $out"
