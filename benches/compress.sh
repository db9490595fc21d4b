#!/usr/bin/env bash
# Response compression: the proxy's CPU time per MiB of response it compresses, ballast
# (gzip, br, zstd) next to nginx's gzip module, on the same backend and the same text, in
# one run.
#
#   bash benches/compress.sh                 # 3 rounds x 8 s per proxy and algorithm
#   ROUNDS=5 DURATION=10 bash benches/compress.sh
#   BALLAST_BIN=/path/to/ballast bash benches/compress.sh   # that build (no cargo build)
#
# The body is 1 MiB of this repository's own text (README, BENCHMARKS.md, the Rust
# sources), served by one nginx worker as text/plain. Each proxy has one worker thread,
# pinned to CPU 0; the backend and wrk (4 connections, Accept-Encoding: gzip / br / zstd)
# share CPU 1. Levels as deployed: ballast gzip 6, brotli 4, zstd 3; nginx gzip_comp_level
# 6 (nginx's default is 1: a line with it at 1 is printed too). Prints, as medians over the
# rounds: responses/s, CPU ms per MiB of uncompressed body (user+system from /proc), and
# the compressed size as a share of the original; and ratios of ballast's gzip to nginx's.
# Loopback only; every process started here is stopped by PID.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
BASE_PORT=${BASE_PORT:-18700}

need() { command -v "$1" >/dev/null 2>&1; }
if ! need nginx || ! need wrk; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light wrk >/dev/null
fi
[ -n "${BALLAST_BIN:-}" ] || cargo build --release --quiet
BALLAST=${BALLAST_BIN:-target/release/ballast}

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

backend=$((BASE_PORT+1)); lb=$((BASE_PORT+10))
mkdir -p "$work/www"
# (`head` closes the pipe early: the writers' SIGPIPE is expected.)
find README.md BENCHMARKS.md src -type f \( -name '*.md' -o -name '*.rs' \) -print0 | sort -z \
  | xargs -0 cat 2>/dev/null | head -c 1048576 > "$work/www/page.txt" || true
size=$(stat -c %s "$work/www/page.txt")
[ "$size" -eq 1048576 ] || { echo "not enough text for 1 MiB ($size bytes)" >&2; exit 1; }
cat > "$work/backend.conf" <<CONF
worker_processes 1; daemon off; error_log $work/backend.err; pid $work/backend.pid;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000; types { text/plain txt; }
  server { listen 127.0.0.1:$backend; root $work/www; } }
CONF
chmod -R a+rX "$work"
taskset -c 1 nginx -c "$work/backend.conf" -p "$work" & pids+=($!)

nginx_conf() { # $1: gzip_comp_level
  cat > "$work/nginx-$1.conf" <<CONF
# One process doing the work (no master), so /proc of the PID started is the worker's.
master_process off; daemon off; error_log $work/nginx.err; pid $work/nginx-$1.pid;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000;
  upstream b { server 127.0.0.1:$backend; keepalive 32; }
  gzip on; gzip_comp_level $1; gzip_types text/plain; gzip_proxied any; gzip_min_length 1024;
  server { listen 127.0.0.1:$lb;
    location / { proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
CONF
}
ballast_conf() { # $1: algorithm
  cat > "$work/ballast-$1.toml" <<CONF
[global]
worker_threads = 1
[log]
level = "warn"
[listeners.web]
bind = "127.0.0.1:$lb"
pool = "b"
compress = { types = ["text/plain"], algorithms = ["$1"] }
[pools.b]
backends = ["127.0.0.1:$backend"]
CONF
}

wait_port() {
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "port $1 did not open" >&2; exit 1
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# One measured run: prints "responses/s ms-per-MiB compressed-share".
measure() { # $1: pid of the proxy, $2: Accept-Encoding
  local before after out reqs bytes secs
  # Warm-up, and a check that the answer is compressed as asked.
  curl -s -o /dev/null -H "Accept-Encoding: $2" -D "$work/head" "http://127.0.0.1:$lb/page.txt"
  grep -qi "content-encoding: $2" "$work/head" || { echo "not compressed with $2:" >&2; cat "$work/head" >&2; exit 1; }
  before=$(cpu_ticks "$1")
  out=$(taskset -c 1 wrk -t1 -c4 -d"${DURATION}s" -H "Accept-Encoding: $2" "http://127.0.0.1:$lb/page.txt")
  after=$(cpu_ticks "$1")
  reqs=$(echo "$out" | awk '/requests in/ {print $1}')
  bytes=$(echo "$out" | awk '/requests in/ {v=$5; sub(/,$/,"",v); print v}')
  secs=$(echo "$out" | awk '/requests in/ {v=$4; sub(/s,$/,"",v); print v}')
  python3 - "$reqs" "$bytes" "$secs" "$before" "$after" "$(getconf CLK_TCK)" <<'PY'
import sys
reqs, size, secs, before, after, hz = sys.argv[1:]
units = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}
num = float(size.rstrip("KMGB")); unit = size[len(size.rstrip("KMGB")):] or "B"
reqs = int(reqs); secs = float(secs)
cpu_ms = (int(after) - int(before)) * 1000 / int(hz)
print(f"{reqs / secs:.1f} {cpu_ms / reqs:.3f} {num * units[unit] / (reqs * (1 << 20)):.4f}")
PY
}

declare -A results
run_proxy() { # $1: label, $2: Accept-Encoding, $3...: command
  local label=$1 enc=$2; shift 2
  taskset -c 0 "$@" > "$work/$label.log" 2>&1 & local pid=$!
  pids+=("$pid")
  wait_port "$lb"
  results[$label]+="$(measure "$pid" "$enc")"$'\n'
  kill "$pid"; wait "$pid" 2>/dev/null || true
  while (exec 3<>"/dev/tcp/127.0.0.1/$lb") 2>/dev/null; do sleep 0.05; done
}

labels=("nginx gzip 6" "ballast gzip 6" "ballast br 4" "ballast zstd 3" "nginx gzip 1")
for alg in gzip br zstd; do ballast_conf "$alg"; done
nginx_conf 6; nginx_conf 1
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round/$ROUNDS" >&2
  run_proxy "nginx gzip 6" gzip nginx -c "$work/nginx-6.conf" -p "$work"
  run_proxy "ballast gzip 6" gzip "$BALLAST" --config "$work/ballast-gzip.toml"
  run_proxy "ballast br 4" br "$BALLAST" --config "$work/ballast-br.toml"
  run_proxy "ballast zstd 3" zstd "$BALLAST" --config "$work/ballast-zstd.toml"
  run_proxy "nginx gzip 1" gzip nginx -c "$work/nginx-1.conf" -p "$work"
done

median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
printf '\n%-16s %12s %14s %12s\n' "proxy" "responses/s" "CPU ms/MiB" "size/orig"
declare -A cpu
for label in "${labels[@]}"; do
  rows=${results[$label]}
  rps=$(echo -n "$rows" | awk '{print $1}' | median)
  ms=$(echo -n "$rows" | awk '{print $2}' | median)
  share=$(echo -n "$rows" | awk '{print $3}' | median)
  cpu[$label]=$ms
  printf '%-16s %12s %14s %12s\n' "$label" "$rps" "$ms" "$share"
done
python3 -c "import sys; print(f'\nballast gzip 6 / nginx gzip 6, CPU per MiB: {float(sys.argv[1]) / float(sys.argv[2]):.2f}x')" \
  "${cpu[ballast gzip 6]}" "${cpu[nginx gzip 6]}"
