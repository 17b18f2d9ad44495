# shellcheck shell=bash
# Shared by tuning/apply.sh and tuning/check.sh (sourced, not run): reading the sysctl
# file and its rules, reading the kernel, and comparing the two.
#
# Rules (the comment line right above each setting in sysctl.d/90-ringpush.conf):
#   at least  every number >= the recommended one, else LOW    (target: the larger of each)
#   at most   every number <= the recommended one, else HIGH   (target: the smaller of each)
#   exactly   the same numbers, else DIFF                       (target: the recommended)
#   ports     a "low high" range holding >= as many ports as the recommended, else LOW
#             (target: the recommended range)
# A key missing from the kernel is N/A: reported, never an error.

export LC_ALL=C

TUNING_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SYSCTL_FILE=$TUNING_DIR/sysctl.d/90-ringpush.conf
# Where the kernel's settings are read (and, when it is not /proc/sys, written): tests
# point TUNING_PROC_SYS at a copy so that apply.sh can run for real without a kernel.
PROC_SYS=${TUNING_PROC_SYS:-/proc/sys}

# Filled by read_settings, one entry per setting, in file order.
KEYS=()       # the sysctl name, without a leading "-"
VALUES=()     # the recommended value, whitespace squeezed to single spaces
RULES=()      # min | max | exact | ports
OPTIONAL=()   # 1 when written "-key": the kernel may lack it

# Parses $1 (default: the shipped file). Fails on a setting without a rule line above it.
read_settings() {
  local file=${1:-$SYSCTL_FILE} line rule="" key value optional lineno=0
  KEYS=() VALUES=() RULES=() OPTIONAL=()
  while IFS= read -r line || [ -n "$line" ]; do
    lineno=$((lineno + 1))
    case $line in
      '# at least:'*) rule=min ;;
      '# at most:'*) rule=max ;;
      '# exactly:'*) rule=exact ;;
      '# ports:'*) rule=ports ;;
      '#'* | ';'* | '') ;;
      *=*)
        key=${line%%=*}
        value=${line#*=}
        key=$(squeeze "$key")
        value=$(squeeze "$value")
        optional=0
        if [ "${key#-}" != "$key" ]; then
          optional=1
          key=${key#-}
        fi
        if [ -z "$rule" ]; then
          echo "$file:$lineno: $key has no rule comment (\"# at least:\", \"# at most:\", \"# exactly:\" or \"# ports:\") above it" >&2
          return 1
        fi
        KEYS+=("$key") VALUES+=("$value") RULES+=("$rule") OPTIONAL+=("$optional")
        rule=""
        ;;
      *)
        echo "$file:$lineno: not a setting: $line" >&2
        return 1
        ;;
    esac
  done <"$file"
}

# Its arguments joined by single spaces (tabs and runs of blanks squeezed).
squeeze() {
  local -a words
  read -ra words <<<"$*"
  printf '%s' "${words[*]}"
}

# The kernel's current value of $1, squeezed; fails when the kernel has no such key or
# it cannot be read.
current_value() {
  local path=$PROC_SYS/${1//./\/} raw
  [ -r "$path" ] || return 1
  raw=$(cat "$path" 2>/dev/null) || return 1
  squeeze "$raw"
}

# Sets key $1 to value $2 in the kernel (`sysctl -w`), or in the $PROC_SYS copy; prints
# the error and fails when that is refused.
write_value() {
  if [ "$PROC_SYS" = /proc/sys ]; then
    sysctl -q -w "$1=$2" 2>&1
  else
    (printf '%s\n' "$2" >"$PROC_SYS/${1//./\/}") 2>&1
  fi
}

# True when integer $1 < integer $2, exactly, at any length (file-max can be 2^63-1).
num_lt() {
  local a=$1 b=$2
  case $a$b in *[!0-9-]*) return 2 ;; esac
  if [ "${a#-}" != "$a" ] || [ "${b#-}" != "$b" ]; then
    if [ "${a#-}" != "$a" ] && [ "${b#-}" = "$b" ]; then return 0; fi
    if [ "${a#-}" = "$a" ] && [ "${b#-}" != "$b" ]; then return 1; fi
    num_lt "${b#-}" "${a#-}"
    return
  fi
  a=${a#"${a%%[!0]*}"} b=${b#"${b%%[!0]*}"}
  if [ ${#a} -ne ${#b} ]; then
    [ ${#a} -lt ${#b} ]
  else
    [[ $a < $b ]]
  fi
}

# Compares the current value $2 with the recommended $3 under rule $1. Sets STATUS
# (OK | LOW | HIGH | DIFF) and TARGET (what apply.sh would write: never worse than now).
# shellcheck disable=SC2034 # STATUS and TARGET are the callers'
compare() {
  local rule=$1 cur=$2 rec=$3 i
  local -a c r t
  read -ra c <<<"$cur"
  read -ra r <<<"$rec"
  STATUS=OK
  TARGET=$cur
  case $rule in
    exact)
      [ "$cur" = "$rec" ] || { STATUS=DIFF TARGET=$rec; }
      return
      ;;
    ports)
      if [ ${#c[@]} -eq 2 ] && [ ${#r[@]} -eq 2 ] && ! num_lt "$((c[1] - c[0]))" "$((r[1] - r[0]))"; then
        return
      fi
      STATUS=LOW TARGET=$rec
      return
      ;;
  esac
  if [ ${#c[@]} -ne ${#r[@]} ]; then
    STATUS=DIFF TARGET=$rec
    return
  fi
  t=()
  for i in "${!r[@]}"; do
    if [ "$rule" = min ] && num_lt "${c[i]}" "${r[i]}"; then
      STATUS=LOW t+=("${r[i]}")
    elif [ "$rule" = max ] && num_lt "${r[i]}" "${c[i]}"; then
      STATUS=HIGH t+=("${r[i]}")
    else
      t+=("${c[i]}")
    fi
  done
  TARGET="${t[*]}"
}
