# System calls and wake-ups per request (or handshake, or unit) of a proxy, counted with
# `perf stat` on tracepoints in the proxy's own context: its calls, and the wake-ups it
# causes (a send waking the reader on the other end is billed to the sender on loopback).
# Cheap enough not to move the timed numbers much. Sourced by benches/compare.sh and
# benches/protocols.sh (`SYSCALLS=1`).
#
#   syscalls_record PID OUT SECONDS &   # in the background, while the load runs
#   syscalls_report OUT UNITS LABEL     # one line: LABEL per unit: call count ...; removes OUT

syscalls_record() {
  perf stat -x, -e raw_syscalls:sys_enter,syscalls:sys_enter_read,syscalls:sys_enter_recvfrom,syscalls:sys_enter_write,syscalls:sys_enter_sendto,syscalls:sys_enter_writev,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_epoll_ctl,syscalls:sys_enter_futex,sched:sched_wakeup \
    -p "$1" -o "$2" -- sleep "$3" >/dev/null 2>&1
}

syscalls_report() {
  awk -F, -v n="$2" -v p="$3" '$1 ~ /^[0-9]+$/ {sub(/^.*:(sys_enter_)?/, "", $3); v[$3]=$1/n; o[++k]=$3}
    END {printf "%s per unit:", p; for (i=1;i<=k;i++) printf " %s %.3f", o[i], v[o[i]]; printf "\n"}' "$1"
  rm -f "$1"
}
