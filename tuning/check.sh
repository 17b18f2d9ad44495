#!/usr/bin/env bash
# Compares this host with tuning/sysctl.d/90-ringpush.conf, and a running ringpush's
# limits with ringpush.service. Changes nothing; any user can run it.
#
#   tuning/check.sh [--pid PID]
#
# One line per setting: `key current recommended STATUS`, where STATUS is
#   OK    the rule above the setting holds
#   LOW   below a floor ("at least"; for a triple such as tcp_mem: any of its three
#         numbers below the recommended one; for ip_local_port_range: fewer ports)
#   HIGH  above a ceiling ("at most"; for tcp_rmem/tcp_wmem: any of the three numbers)
#   DIFF  not the one accepted value ("exactly")
#   N/A   the kernel has no such key (e.g. nf_conntrack not loaded): not a failure
# Then, for the ringpush process (--pid PID, else every `pgrep -x ringpush`), its soft
# `Max open files` (LOW below LimitNOFILE=1048576) and `Max locked memory` (OK when
# unlimited or at least 2 MiB per io_uring executor, one per CPU plus one: glommio
# registers a little over 1.5 MiB each; the service sets unlimited) from /proc/PID/limits.
#
# Exit status: 0 when every line is OK or N/A, 1 when any is LOW, HIGH or DIFF,
# 2 on a usage error or when the --pid process does not exist.
set -euo pipefail

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# What ringpush.service sets, and what glommio registers per executor (a 512 KiB buffer
# with each of its three rings, plus a little), rounded up.
RECOMMENDED_NOFILE=1048576
MEMLOCK_PER_EXECUTOR=$((2 * 1024 * 1024))

usage() {
  echo "usage: $0 [--pid PID]" >&2
  exit 2
}

pids=()
pid_given=0
while [ $# -gt 0 ]; do
  case $1 in
    --pid)
      [ $# -ge 2 ] || usage
      case $2 in '' | *[!0-9]*) usage ;; esac
      pids=("$2")
      pid_given=1
      shift 2
      ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' && exit 0 ;;
    *) usage ;;
  esac
done

if [ $pid_given -eq 1 ] && [ ! -r "/proc/${pids[0]}/limits" ]; then
  echo "no process ${pids[0]} (or /proc/${pids[0]}/limits is unreadable)" >&2
  exit 2
fi

read_settings "$SYSCTL_FILE"
failed=0
row() { printf '%-32s %-26s %-26s %s\n' "$@"; }

row key current recommended status
for i in "${!KEYS[@]}"; do
  key=${KEYS[i]} rec=${VALUES[i]}
  if ! cur=$(current_value "$key"); then
    row "$key" "-" "$rec" "N/A"
    continue
  fi
  compare "${RULES[i]}" "$cur" "$rec"
  row "$key" "$cur" "$rec" "$STATUS"
  [ "$STATUS" = OK ] || failed=1
done

# The process part.
if [ $pid_given -eq 0 ] && command -v pgrep >/dev/null; then
  mapfile -t pids < <(pgrep -x ringpush || true)
fi
if [ ${#pids[@]} -eq 0 ]; then
  echo "no running ringpush (pgrep -x ringpush); its limits were not checked"
fi
cpus=$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
memlock_min=$(((cpus + 1) * MEMLOCK_PER_EXECUTOR))
for pid in "${pids[@]}"; do
  if ! limits=$(cat "/proc/$pid/limits" 2>/dev/null); then
    echo "ringpush $pid exited before its limits were read"
    continue
  fi
  # "Max open files   20000   20000   files": the soft limit is the 4th field.
  nofile=$(awk '/^Max open files/ { print $4 }' <<<"$limits")
  memlock=$(awk '/^Max locked memory/ { print $4 }' <<<"$limits")
  status=OK
  if [ "$nofile" != unlimited ] && num_lt "$nofile" "$RECOMMENDED_NOFILE"; then
    status=LOW failed=1
  fi
  row "pid $pid Max open files" "$nofile" "$RECOMMENDED_NOFILE" "$status"
  status=OK
  if [ "$memlock" != unlimited ] && num_lt "$memlock" "$memlock_min"; then
    status=LOW failed=1
  fi
  row "pid $pid Max locked memory" "$memlock" "unlimited (>= $memlock_min)" "$status"
done

exit $failed
