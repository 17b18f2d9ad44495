#!/usr/bin/env bash
# Brings this host's kernel settings up to tuning/sysctl.d/90-ringpush.conf, now and at
# every boot. Idempotent: a second run finds nothing to change.
#
#   tuning/apply.sh --dry-run        print what would change; change nothing (any user)
#   tuning/apply.sh [--dest FILE]    as root: write FILE (default
#                                    /etc/sysctl.d/90-ringpush.conf), then `sysctl -w`
#                                    every setting that is not already good enough
#
# One line per setting: `key: current -> new` for a change, `key: current (ok)` when the
# setting already satisfies its rule, or a note when the kernel has no such key (e.g.
# nf_conntrack not loaded). Values are never made worse: a floor already exceeded
# (fs.file-max is often 2^63-1) is kept, and triples move number by number
# (tcp_mem 1048576 9000000 9500000 under the floors 1048576 2097152 3145728 stays as it is).
# The file written holds those same values, so the next boot does not undo them.
#
# Settings the kernel refuses (read-only /proc/sys in a container, a key that lives in
# another network namespace) are reported as "cannot apply" and the rest still go on.
# Exit status: 0 when everything is (now) good, 1 when some setting could not be
# applied, 2 on a usage error or when not run as root without --dry-run.
set -euo pipefail

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  echo "usage: $0 [--dry-run] [--dest FILE]" >&2
  exit 2
}

dry_run=0
dest=/etc/sysctl.d/90-ringpush.conf
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run | -n)
      dry_run=1
      shift
      ;;
    --dest)
      { [ $# -ge 2 ] && [ -n "$2" ]; } || usage
      dest=$2
      shift 2
      ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' && exit 0 ;;
    *) usage ;;
  esac
done

if [ $dry_run -eq 0 ] && [ "$PROC_SYS" = /proc/sys ] && [ "$(id -u)" -ne 0 ]; then
  echo "$0: writing $dest and sysctl -w need root; use --dry-run to see what would change" >&2
  exit 2
fi

read_settings "$SYSCTL_FILE"

# What each setting should become, and which ones to write now.
declare -A new_value
to_change=()
for i in "${!KEYS[@]}"; do
  key=${KEYS[i]} rec=${VALUES[i]}
  if ! cur=$(current_value "$key"); then
    if [ "${OPTIONAL[i]}" = 1 ]; then
      echo "$key: not in this kernel (module not loaded or kernel too old), skipped"
    else
      echo "$key: not in this kernel, skipped (still written to $dest)"
    fi
    new_value[$key]=$rec
    continue
  fi
  compare "${RULES[i]}" "$cur" "$rec"
  new_value[$key]=$TARGET
  if [ "$STATUS" = OK ]; then
    echo "$key: $cur (ok)"
  else
    echo "$key: $cur -> $TARGET"
    to_change+=("$key")
  fi
done

# The file to install: the shipped one with each value replaced by what it becomes here.
render() {
  local line key prefix
  while IFS= read -r line || [ -n "$line" ]; do
    case $line in
      '#'* | ';'* | '') printf '%s\n' "$line" ;;
      *)
        key=$(squeeze "${line%%=*}")
        prefix=${key%%[!-]*}
        printf '%s%s = %s\n' "$prefix" "${key#-}" "${new_value[${key#-}]}"
        ;;
    esac
  done <"$SYSCTL_FILE"
}
rendered=$(render)

if [ -f "$dest" ] && [ "$(cat "$dest")" = "$rendered" ]; then
  file_note="$dest is up to date"
  write_file=0
else
  file_note="$dest would be written"
  write_file=1
fi

if [ $dry_run -eq 1 ]; then
  echo "dry run: ${#to_change[@]} of ${#KEYS[@]} settings would change now; $file_note; nothing was changed"
  exit 0
fi

if [ $write_file -eq 1 ]; then
  mkdir -p "$(dirname "$dest")"
  tmp=$(mktemp "$dest.XXXXXX")
  printf '%s\n' "$rendered" >"$tmp"
  chmod 0644 "$tmp"
  mv -f "$tmp" "$dest"
  echo "wrote $dest"
else
  echo "$dest is up to date"
fi

failed=0
for key in "${to_change[@]}"; do
  value=${new_value[$key]}
  if ! err=$(write_value "$key" "$value"); then
    echo "$key: cannot apply ($(squeeze "$err")); read-only /proc/sys (a container?) or another namespace"
    failed=1
    continue
  fi
  now=$(current_value "$key" || echo "?")
  if [ "$now" = "$value" ]; then
    echo "$key: applied $value"
  else
    echo "$key: written, but the kernel reports $now instead of $value"
    failed=1
  fi
done

if [ $failed -eq 1 ]; then
  echo "some settings could not be applied now; $dest applies them at the next boot where the kernel allows"
fi
exit $failed
