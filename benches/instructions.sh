#!/usr/bin/env bash
# Instructions per proxied request, counted by valgrind's callgrind: an A/B measure that the
# machine's noise does not move (wall-clock CPU time on this VM varies by 20% between
# rounds of benches/compare.sh; instruction counts repeat to well under 1%).
#
#   bash benches/instructions.sh         # ballast: plain, metrics on, access log (JSON, common)
#   BALLAST_BASELINE=/path/to/older/ballast bash benches/instructions.sh   # + that build
#   BALLAST_BIN=/path/to/ballast bash benches/instructions.sh   # that build, not a new one
#   REQUESTS=20000 bash benches/instructions.sh
#   CONNS=64 REQUESTS=12800 VARIANTS="plain nginx haproxy" bash benches/instructions.sh
#     # 64 concurrent clients, as compare.sh's wrk: an event loop's cost per request
#     # depends on how many connections each wake-up finds ready
#   ANNOTATE=40 bash benches/instructions.sh          # + each variant's top 40 functions
#   CALLGRIND_ARGS="--dump-instr=yes --compress-pos=no" KEEP_DIR=/tmp/cg \
#     bash benches/instructions.sh   # extra valgrind options (here: counts per instruction,
#     which benches/atomics.py reads to count atomic read-modify-writes per request)
#   KEEP_DIR=/tmp/cg bash benches/instructions.sh     # keep each variant's runtime-thread
#     profile there (callgrind_annotate --inclusive=no DIR/plain.callgrind)
#   VARIANTS=plain bash benches/instructions.sh       # only some of the variants
#   VARIANTS="plain threads2" bash benches/instructions.sh   # + worker_threads = 2
#   VARIANTS="plain traffic" bash benches/instructions.sh    # + issue 11's keys all set
#     (max_connections and its queue, panic_threshold, retry_on + retry_budget, request_id,
#     a rate limit no request reaches, header rules: what they cost when used)
#   VARIANTS="plain request-id rate-limit header-rules max-connections panic retry-budget"
#     bash benches/instructions.sh   # the same keys one at a time: what each costs
#   VARIANTS="plain routes header-route" bash benches/instructions.sh   # routes the requests
#     pass over: request-line matchers only, and one header matcher (fields then mapped)
#   VARIANTS="plain nginx haproxy" bash benches/instructions.sh   # + nginx and HAProxy (Debian's,
#     installed if missing), configured as in benches/compare.sh, under the same load: what
#     each proxy's user space executes per request (IPC differs: compare.sh times it)
#   VARIANTS="plain close tls h2" bash benches/instructions.sh   # + a new connection per
#     request (`Connection: close`, per connection), HTTP/1.1 keep-alive over TLS (4
#     connections), and HTTP/2 over TLS (h2load, H2_CONNS (4) connections x H2_STREAMS (10)
#     streams, per request;
#     needs h2load and openssl, installed if missing); with BALLAST_BASELINE set, the
#     baseline is measured for each of plain, close, tls and h2 asked for
#
# Each variant: ballast under callgrind (all its threads, the access-log writer included)
# in front of three `ballast demo-backend`s; 500 warm-up requests, counters zeroed, then
# REQUESTS requests over 4 (CONNS) keep-alive connections from a Python client; the instruction
# total divided by REQUESTS. Loopback only; every process started here is stopped by PID.
set -euo pipefail
cd "$(dirname "$0")/.."

REQUESTS=${REQUESTS:-10000}
CONNS=${CONNS:-4}   # client connections of the HTTP/1.1 loads (REQUESTS is split among them)
BASE_PORT=${BASE_PORT:-18600}
command -v valgrind >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null; }
case " ${VARIANTS:-} " in
  *" nginx "*|*" haproxy "*) { command -v nginx >/dev/null && command -v haproxy >/dev/null; } \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light haproxy >/dev/null; } ;;
esac
case " ${VARIANTS:-} " in
  *" h2 "*) { command -v h2load >/dev/null && command -v openssl >/dev/null; } \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client openssl >/dev/null; } ;;
esac
[ -n "${BALLAST_BIN:-}" ] || cargo build --release --quiet
BALLAST=${BALLAST_BIN:-target/release/ballast}

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

lb=$((BASE_PORT+10)); admin=$((BASE_PORT+11))
for i in 1 2 3; do
  "$BALLAST" demo-backend --bind "127.0.0.1:$((BASE_PORT+i))" >/dev/null 2>&1 & pids+=($!)
done
cat > "$work/plain.toml" <<CONF
[global]
worker_threads = 1
[listeners.web]
bind = "127.0.0.1:$lb"
pool = "app"
[pools.app]
backends = ["127.0.0.1:$((BASE_PORT+1))", "127.0.0.1:$((BASE_PORT+2))", "127.0.0.1:$((BASE_PORT+3))"]
CONF
sed -e "s/worker_threads = 1/worker_threads = 2/" "$work/plain.toml" > "$work/threads2.toml"
sed -e '/^pool = "app"/a request_id = true\nrate_limit = { requests_per_second = 1000000, burst = 1000000 }\nrequest_headers = { set = { "X-Env" = "bench", "X-Client" = "${client_ip}" }, remove = ["X-Debug"] }\nresponse_headers = { set = { "X-Request-Id" = "${request_id}" } }' \
  -e '$a max_connections = 1000\npanic_threshold = "50%"\nretry_on = ["connect_failure", "reset", "503"]\nretry_budget = "20%"' \
  "$work/plain.toml" > "$work/traffic.toml"
# The same keys one at a time (listener keys after `pool =`, pool keys at the end).
one_key() {  # $1 = name, $2 = listener line or "", $3 = pool line or ""
  sed -e "${2:+/^pool = \"app\"/a $2}" -e "${3:+\$a $3}" "$work/plain.toml" > "$work/$1.toml"
}
one_key request-id 'request_id = true' ''
one_key rate-limit 'rate_limit = { requests_per_second = 1000000, burst = 1000000 }' ''
one_key header-rules 'request_headers = { set = { "X-Env" = "bench", "X-Client" = "${client_ip}" }, remove = ["X-Debug"] }\nresponse_headers = { set = { "X-Listener" = "${listener}" } }' ''
one_key max-connections '' 'max_connections = 1000'
one_key panic '' 'panic_threshold = "50%"'
one_key retry-budget '' 'retry_on = ["connect_failure", "reset", "503"]\nretry_budget = "20%"'
# Routes the bench's requests pass over to the default: matchers on the request line only
# (the fields stay relayed as lines), and one route on a header (the listener maps them).
one_key routes 'routes = [{ path = "/robots.txt", methods = ["GET"], pool = "app" }, { path_regex = "^/users/[0-9]+$", pool = "app" }, { path_prefix = "/", query = { v = "2" }, pool = "app" }]' ''
one_key header-route 'routes = [{ headers = { "X-Canary" = "1" }, pool = "app" }]' ''
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 -subj /CN=localhost \
  -addext "subjectAltName=DNS:localhost" -keyout "$work/tls.key" -out "$work/tls.pem" 2>/dev/null
sed -e "/^pool = \"app\"/a [listeners.web.tls]\ncertificates = [{ cert = \"$work/tls.pem\", key = \"$work/tls.key\" }]" \
  "$work/plain.toml" > "$work/h2.toml"
sed -e "1i [admin]\nbind = \"127.0.0.1:$admin\"" "$work/plain.toml" > "$work/metrics.toml"
# The peers, configured as in benches/compare.sh (benches/peers.sh), one process each:
# nginx without its master.
# shellcheck source=benches/peers.sh
source benches/peers.sh
peer_configs "$work" "$lb" "$((BASE_PORT+1))" "$((BASE_PORT+2))" "$((BASE_PORT+3))" "master_process off;"
sed -e "1i [access_log]\npath = \"$work/access.log\"" "$work/plain.toml" > "$work/log.toml"
sed -e "1i [access_log]\npath = \"$work/access.log\"\nformat = \"common\"" "$work/plain.toml" > "$work/common.toml"

load() {  # $1 = number of requests; $2 = keepalive (4 connections), close, tls or h2
  case ${2:-keepalive} in
    h2)
      local answered
      answered=$(h2load -n "$1" -c "${H2_CONNS:-4}" -m "${H2_STREAMS:-10}" "https://localhost:$lb/bench" 2>&1)
      echo "$answered" | grep -q "^status codes: $1 2xx" \
        || { echo "h2load: not all $1 answered 2xx: $answered" >&2; exit 1; } ;;
    *)
      python3 - "$lb" "$1" "${2:-keepalive}" "$CONNS" <<'PY'
import http.client, ssl, sys, threading
port, n, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def run(k):
    if mode == "tls":
        insecure = ssl._create_unverified_context()
        c = http.client.HTTPSConnection("127.0.0.1", port, timeout=60, context=insecure)
    else:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for _ in range(k):
        if mode == "close":
            c.request("GET", "/bench", headers={"Connection": "close"})
        else:
            c.request("GET", "/bench")
        r = c.getresponse(); r.read()
        assert r.status == 200, r.status
        if mode == "close":
            c.close()
conns = int(sys.argv[4])
threads = [threading.Thread(target=run, args=(n // conns,)) for _ in range(conns)]
[t.start() for t in threads]; [t.join() for t in threads]
PY
      ;;
  esac
}

measure() {  # $1 = label, $2 = binary (or nginx, haproxy), $3 = config, $4 = load kind (see `load`)
  local out="$work/callgrind.$1" kind=${4:-keepalive}
  local cmd=("$2" --config "$3" --log warn)
  case $2 in
    nginx) cmd=(nginx -c "$3" -p "$work") ;;
    haproxy) cmd=(haproxy -db -f "$3") ;;
  esac
  # shellcheck disable=SC2086  # CALLGRIND_ARGS: extra valgrind options, word-split on purpose
  valgrind --tool=callgrind --separate-threads=yes ${CALLGRIND_ARGS:-} --callgrind-out-file="$out.%p" "${cmd[@]}" >/dev/null 2>&1 &
  local pid=$!
  pids+=($pid)
  local scheme=http; case $kind in h2|tls) scheme=https ;; esac
  for _ in $(seq 1 300); do curl -skf -o /dev/null "$scheme://localhost:$lb/" && break; sleep 0.2; done
  load 500 "$kind"
  callgrind_control --zero "$pid" >/dev/null
  load "$REQUESTS" "$kind"
  callgrind_control --dump="measured" "$pid" >/dev/null
  kill "$pid"; wait "$pid" 2>/dev/null || true
  # The first dump (FILE.PID.1-TT, one file per thread) holds what ran between the zeroing
  # and the dump. Thread 01 is the main thread, which runs the tokio runtime
  # (worker_threads = 1); the others are the access-log writer, jemalloc's background
  # thread and the log appender.
  local total main
  total=$(cat "$out.$pid.1-"* | awk '/^summary:/ {s += $2} END {print s}')
  main=$(awk '/^summary:/ {print $2}' "$out.$pid.1-01")
  echo "$1 $total $main" >> "$work/results"
  if [ -n "${KEEP_DIR:-}" ]; then mkdir -p "$KEEP_DIR"; cp "$out.$pid.1-01" "$KEEP_DIR/$1.callgrind"; fi
  if [ -n "${ANNOTATE:-}" ]; then  # where the instructions went (inclusive, top functions)
    { callgrind_annotate ${INCLUSIVE:+--inclusive=yes} "$out.$pid.1-01" 2>/dev/null | sed -n "1,/^$/d;p" | head -n "$ANNOTATE"; } || true
  fi
  awk -v l="$1" -v t="$total" -v m="$main" -v n="$REQUESTS" 'BEGIN {printf "%-18s %8.0f instructions per request (runtime thread %8.0f)\n", l, t / n, m / n}'
}

: > "$work/results"
if [ -n "${BALLAST_BASELINE:-}" ]; then measure baseline "$BALLAST_BASELINE" "$work/plain.toml"; fi
for variant in ${VARIANTS:-plain metrics access-log access-log-common}; do
  case $variant in
    plain) measure plain "$BALLAST" "$work/plain.toml" ;;
    close|h2|tls)
      config="$work/plain.toml"; case $variant in h2|tls) config="$work/h2.toml" ;; esac
      if [ -n "${BALLAST_BASELINE:-}" ]; then measure "baseline-$variant" "$BALLAST_BASELINE" "$config" "$variant"; fi
      measure "$variant" "$BALLAST" "$config" "$variant" ;;
    threads2) measure threads2 "$BALLAST" "$work/threads2.toml" ;;
    traffic) measure traffic "$BALLAST" "$work/traffic.toml" ;;
    request-id|rate-limit|header-rules|max-connections|panic|retry-budget|routes|header-route)
      measure "$variant" "$BALLAST" "$work/$variant.toml" ;;
    metrics) measure metrics "$BALLAST" "$work/metrics.toml" ;;
    nginx) measure nginx nginx "$work/nginx.conf" ;;
    haproxy) measure haproxy haproxy "$work/haproxy.cfg" ;;
    access-log) measure access-log "$BALLAST" "$work/log.toml" ;;
    access-log-common) measure access-log-common "$BALLAST" "$work/common.toml" ;;
  esac
done

python3 - "$work/results" "$REQUESTS" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1])]
n = int(sys.argv[2])
ref = {r[0]: r for r in rows}.get("plain", rows[0])
print(f"\ninstructions per request (close: per connection); ratio = variant / plain")
print(f"{'variant':18} {'all threads':>12} {'ratio':>6} {'runtime thread':>15} {'ratio':>6}")
for label, total, main in rows:
    print(f"{label:18} {int(total)/n:12.0f} {int(total)/int(ref[1]):6.3f} {int(main)/n:15.0f} {int(main)/int(ref[2]):6.3f}")
PY
