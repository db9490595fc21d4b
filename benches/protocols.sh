#!/usr/bin/env bash
# Protocol load comparison: ballast vs HAProxy vs nginx, one worker each, same backends, in
# one run. Scenarios:
#   handshake-ecdsa  TLS full handshakes (openssl s_time -new, 4 clients), ECDSA P-256:
#                    handshakes/s and proxy CPU per handshake
#   handshake-rsa    the same with an RSA-2048 certificate
#   handshake-resume the same as handshake-ecdsa, resumed (s_time -reuse: each client's
#                    connections after its first resume its session with a ticket)
#   tls-keepalive    TLS, keep-alive: req/s and proxy CPU per request
#   h2               HTTP/2 over TLS, h2load -c64 -m10 (H2_CONNS, H2_STREAMS): req/s, proxy
#                    CPU per request, the proxy's peak RSS, and the connections the proxy
#                    opened to the backends during the measured run (0 once warm is ideal)
#   h2-m100          the same with -c16 -m100 (H2_M100_CONNS, H2_M100_STREAMS)
#   tls-idle         memory per idle TLS client: TLS_IDLE_CLIENTS (2,000) clients each make
#                    one HTTP/1.1 request over TLS and stay connected; the proxy worker's
#                    RSS growth divided by them
#   l4               TCP mode, iperf3 bulk transfer: Gbit/s and proxy CPU s/GB
#                    (plus ballast with `splice = true` and HAProxy with `option splice-auto`)
#   l4-small         TCP mode, many small exchanges: redis-benchmark PING over 50
#                    connections (closed loop, so req/s is the inverse of latency)
#
#   bash benches/protocols.sh                       # every scenario, 3 rounds x 8 s
#   SCENARIOS="h2 l4" ROUNDS=5 DURATION=10 bash benches/protocols.sh
#   BALLAST_POOL="max_idle_per_backend = 512" SCENARIOS=h2 bash benches/protocols.sh
#                                                   # extra keys for ballast's HTTP pool
#   BALLAST_BIN=/path/to/other/ballast SCENARIOS=tls-keepalive bash benches/protocols.sh
#                                                   # another build (runs are separate)
#   BALLAST_BASELINE=/path/to/older/ballast bash benches/protocols.sh
#                                                   # + that build as ballast-base, same run
#   SYSCALLS=1 SCENARIOS=h2 bash benches/protocols.sh
#                                                   # + system calls and wake-ups per unit
#                                                   # of each proxy (perf stat, round 1)
#
# Needs Debian's haproxy, nginx-light + libnginx-mod-stream, wrk, nghttp2-client (h2load),
# iperf3 and openssl; installs them if missing (root). The proxy runs pinned to CPU 0, the
# backends and the load generator share CPU 1. Medians over rounds, ratios to HAProxy.
# Everything listens on 127.0.0.1; every process started here is stopped by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benches/syscalls.sh
source benches/syscalls.sh

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
CONNS=${CONNS:-50}
BASE_PORT=${BASE_PORT:-18600}
SCENARIOS=${SCENARIOS:-"handshake-ecdsa handshake-rsa tls-keepalive h2 h2-m100 tls-idle l4 l4-small"}

need() { command -v "$1" >/dev/null 2>&1; }
if ! need haproxy || ! need nginx || ! need wrk || ! need h2load || ! need iperf3 \
  || ! need redis-server || [ ! -e /usr/lib/nginx/modules/ngx_stream_module.so ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy nginx-light libnginx-mod-stream \
    wrk nghttp2-client iperf3 openssl redis-server redis-tools >/dev/null
fi
[ -n "${BALLAST_BIN:-}" ] || cargo build --release --quiet
BALLAST=${BALLAST_BIN:-$PWD/target/release/ballast}

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

b1=$((BASE_PORT+1)); b2=$((BASE_PORT+2)); b3=$((BASE_PORT+3)); lb=$((BASE_PORT+10))
iperf_port=$((BASE_PORT+20)); redis_port=$((BASE_PORT+21))

# --- certificates ------------------------------------------------------------------------
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost -keyout "$work/ecdsa.key" -out "$work/ecdsa.pem" 2>/dev/null
openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost -keyout "$work/rsa.key" -out "$work/rsa.pem" 2>/dev/null
cat "$work/ecdsa.pem" "$work/ecdsa.key" > "$work/ecdsa.haproxy.pem"
cat "$work/rsa.pem" "$work/rsa.key" > "$work/rsa.haproxy.pem"

# --- backends: one nginx worker, three ports; iperf3 for L4 -------------------------------
cat > "$work/backends.conf" <<CONF
worker_processes 1; daemon off; error_log $work/backends.err; pid $work/backends.pid;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$b1; location / { return 200 "backend-1\n"; } }
  server { listen 127.0.0.1:$((BASE_PORT+4)); location / { stub_status; } }
  server { listen 127.0.0.1:$b2; location / { return 200 "backend-2\n"; } }
  server { listen 127.0.0.1:$b3; location / { return 200 "backend-3\n"; } } }
CONF
taskset -c 1 nginx -c "$work/backends.conf" -p "$work" & pids+=($!)
taskset -c 1 iperf3 -s -B 127.0.0.1 -p $iperf_port >/dev/null 2>&1 & pids+=($!)
taskset -c 1 redis-server --bind 127.0.0.1 --port $redis_port --save "" --appendonly no \
  --dir "$work" >/dev/null 2>&1 & pids+=($!)

# --- proxy configs per scenario ------------------------------------------------------------
# $1 = cert kind (ecdsa|rsa), or "tcp" with $2 = the backend port.
write_configs() {
  local kind=$1 tcp_port=${2:-}
  if [ "$kind" = tcp ]; then
    cat > "$work/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 4096
defaults
  mode tcp
  timeout connect 3s
  timeout client 60s
  timeout server 60s
frontend l4
  bind 127.0.0.1:$lb
  default_backend iperf
backend iperf
  server s1 127.0.0.1:$tcp_port
CONF
    sed 's/^defaults$/defaults\n  option splice-auto/' "$work/haproxy.cfg" > "$work/haproxy-splice.cfg"
    cat > "$work/nginx.conf" <<CONF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1; daemon off; error_log $work/nginx.err; pid $work/nginx.pid;
events { worker_connections 10000; }
stream { upstream iperf { server 127.0.0.1:$tcp_port; }
  server { listen 127.0.0.1:$lb; proxy_pass iperf; } }
CONF
    cat > "$work/ballast.toml" <<CONF
[global]
worker_threads = 1
[listeners.l4]
bind = "127.0.0.1:$lb"
pool = "iperf"
mode = "tcp"
[pools.iperf]
backends = ["127.0.0.1:$tcp_port"]
CONF
    sed 's/^mode = "tcp"$/mode = "tcp"\nsplice = true/' "$work/ballast.toml" > "$work/ballast-splice.toml"
    return
  fi
  cat > "$work/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 4096
  tune.ssl.default-dh-param 2048
defaults
  mode http
  timeout connect 3s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
frontend web
  bind 127.0.0.1:$lb ssl crt $work/$kind.haproxy.pem alpn h2,http/1.1
  default_backend app
backend app
  balance roundrobin
  http-reuse always
  server b1 127.0.0.1:$b1
  server b2 127.0.0.1:$b2
  server b3 127.0.0.1:$b3
CONF
  cat > "$work/nginx.conf" <<CONF
worker_processes 1; daemon off; error_log $work/nginx.err; pid $work/nginx.pid;
events { worker_connections 10000; }
http { access_log off; keepalive_requests 1000000;
  upstream app { server 127.0.0.1:$b1; server 127.0.0.1:$b2; server 127.0.0.1:$b3; keepalive 128; }
  server { listen 127.0.0.1:$lb ssl http2;
    ssl_certificate $work/$kind.pem; ssl_certificate_key $work/$kind.key;
    ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache shared:SSL:10m;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for; } } }
CONF
  cat > "$work/ballast.toml" <<CONF
[global]
worker_threads = 1
[listeners.web]
bind = "127.0.0.1:$lb"
pool = "app"
[listeners.web.tls]
certificates = [{ cert = "$work/$kind.pem", key = "$work/$kind.key" }]
[pools.app]
algorithm = "round_robin"
backends = ["127.0.0.1:$b1", "127.0.0.1:$b2", "127.0.0.1:$b3"]
${BALLAST_POOL:-}
CONF
}

wait_port() {
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "port $1 never opened" >&2
  return 1
}
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

start_proxy() {
  case $1 in
    ballast) taskset -c 0 "$BALLAST" --config "$work/ballast.toml" --log warn & ;;
    ballast-base) taskset -c 0 "$BALLAST_BASELINE" --config "$work/ballast.toml" --log warn & ;;
    ballast-splice) taskset -c 0 "$BALLAST" --config "$work/ballast-splice.toml" --log warn & ;;
    haproxy) taskset -c 0 haproxy -db -f "$work/haproxy.cfg" & ;;
    haproxy-splice) taskset -c 0 haproxy -db -f "$work/haproxy-splice.cfg" & ;;
    nginx) taskset -c 0 nginx -c "$work/nginx.conf" -p "$work" & ;;
  esac
  proxy_pid=$!
  pids+=($proxy_pid)
  wait_port $lb
}
worker_pid() { if [ "$1" = nginx ]; then pgrep -P "$proxy_pid" | head -1; else echo "$proxy_pid"; fi; }
stop_proxy() { kill "$proxy_pid"; wait "$proxy_pid" 2>/dev/null || true; }

wait_port $b1
wait_port $iperf_port
wait_port $redis_port
results="$work/results"
: > "$results"

# Runs the load for scenario $1 against the proxy; prints "<rate> <work units>" where the
# rate is what the scenario reports (req/s or Gbit/s) and work units divide the CPU time
# (requests, or GB).
# Connections the backends accepted so far (nginx's stub_status, on a port of its own).
backend_accepts() { curl -s "http://127.0.0.1:$((BASE_PORT+4))/" | awk 'NR==3 {print $1}'; }
peak_rss_kib() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

run_load() {
  case $1 in
    handshake-*)
      # Full handshakes: `s_time -new` never resumes a session (wrk would); `-reuse` does.
      # Four clients in parallel; each connection also fetches / over HTTP/1.0.
      how=-new; [ "$1" = handshake-resume ] && how=-reuse
      for i in 1 2 3 4; do
        taskset -c 1 openssl s_time -connect "127.0.0.1:$lb" "$how" -time "$DURATION" -www / \
          > "$work/stime.$i" 2>&1 &
      done
      wait
      n=$(cat "$work"/stime.* | awk '/connections in .* real seconds/ {s+=$1} END {print s+0}')
      echo "$(awk -v n="$n" -v d="$DURATION" 'BEGIN {printf "%.1f", n/d}') $n" ;;
    tls-keepalive)
      out=$(taskset -c 1 wrk -t1 -c"$CONNS" -d"${DURATION}s" "https://localhost:$lb/")
      echo "$(awk '/Requests\/sec/ {print $2}' <<<"$out") $(awk '/requests in/ {print $1}' <<<"$out")" ;;
    h2|h2-m100)
      if [ "$1" = h2 ]; then c=${H2_CONNS:-64} m=${H2_STREAMS:-10}; else c=${H2_M100_CONNS:-16} m=${H2_M100_STREAMS:-100}; fi
      out=$(taskset -c 1 h2load -c "$c" -m "$m" -D "$DURATION" "https://localhost:$lb/" 2>&1)
      ok=$(awk '/^requests:/ {print $8}' <<<"$out")
      echo "$(awk '/^finished in/ {print $4}' <<<"$out") $ok" ;;
    l4-small)
      n=$((DURATION * 25000))
      out=$(taskset -c 1 redis-benchmark -p "$lb" -t ping_mbulk -n "$n" -c 50 --csv 2>/dev/null)
      echo "$(awk -F'"' '/PING_MBULK/ {print $4}' <<<"$out") $n" ;;
    l4)
      out=$(taskset -c 1 iperf3 -c 127.0.0.1 -p "$lb" -t "$DURATION" -J)
      python3 -c 'import json,sys; e=json.load(sys.stdin)["end"]["sum_received"]; print("%.3f %.3f" % (e["bits_per_second"]/1e9, e["bytes"]/1e9))' <<<"$out" ;;
  esac
}

cat > "$work/tls_clients.py" <<'PY'
# Holds n TLS clients, each after one HTTP/1.1 request, until the stop file appears.
import asyncio, os, ssl, sys
port, n, ready, stop = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols(["http/1.1"])
async def one(sem, held):
    async with sem:
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
        w.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head = await r.readuntil(b"\r\n\r\n")
        length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length"))
        await r.readexactly(length)
        held.append(w)
async def main():
    held, sem = [], asyncio.Semaphore(100)
    await asyncio.gather(*(one(sem, held) for _ in range(n)))
    open(ready, "w").write(str(len(held)))
    for _ in range(1200):  # at most 120 s
        if os.path.exists(stop):
            return
        await asyncio.sleep(0.1)
asyncio.run(main())
PY

base_proxy=""
[ -n "${BALLAST_BASELINE:-}" ] && base_proxy=ballast-base
extras="$work/extras"
: > "$extras"

for scenario in $SCENARIOS; do
  if [ "$scenario" = tls-idle ]; then
    write_configs ecdsa
    n=${TLS_IDLE_CLIENTS:-2000}
    for proxy in ballast $base_proxy haproxy nginx; do
      start_proxy $proxy
      wpid=$(worker_pid $proxy)
      taskset -c 1 wrk -t1 -c50 -d2s "https://localhost:$lb/" >/dev/null 2>&1 || true   # warm-up
      sleep 1
      before=$(rss_kib "$wpid")
      rm -f "$work/ready" "$work/stop"
      ( ulimit -n "$(ulimit -Hn)" 2>/dev/null || true; taskset -c 1 python3 "$work/tls_clients.py" "$lb" "$n" "$work/ready" "$work/stop" ) & client=$!
      for _ in $(seq 1 1200); do [ -f "$work/ready" ] && break; sleep 0.1; done
      # Past jemalloc's return of the handshakes' freed pages (10-11 s after them; compare.sh
      # and BENCHMARKS.md, issue 24 fourth pass); the same wait for every proxy.
      sleep "${IDLE_SETTLE:-20}"
      held=$(cat "$work/ready" 2>/dev/null || echo 0)
      after=$(rss_kib "$wpid")
      touch "$work/stop"; wait "$client" || true
      stop_proxy
      per=$(awk -v a="$after" -v b="$before" -v n="$held" 'BEGIN {printf "%.0f", (a-b)*1024/(n>0?n:1)}')
      echo "tls-idle $proxy $per" >> "$extras"
      printf '%-16s %-15s %5s TLS clients held: RSS %7s KiB -> %7s KiB, %6s bytes each\n' tls-idle "$proxy" "$held" "$before" "$after" "$per"
    done
    continue
  fi
  case $scenario in
    handshake-ecdsa|handshake-resume|tls-keepalive|h2|h2-m100) write_configs ecdsa ;;
    handshake-rsa) write_configs rsa ;;
    l4) write_configs tcp $iperf_port ;;
    l4-small) write_configs tcp $redis_port ;;
  esac
  proxies="ballast $base_proxy haproxy nginx"
  case $scenario in l4*) proxies="ballast $base_proxy ballast-splice haproxy haproxy-splice nginx" ;; esac
  for round in $(seq 1 "$ROUNDS"); do
    for proxy in $proxies; do
      start_proxy $proxy
      wpid=$(worker_pid $proxy)
      # Warm-up in the measured shape, so that "new backend connections" counts churn, not
      # the first opening of what the load needs.
      case $scenario in
        l4*) ;;
        h2) taskset -c 1 h2load -c "${H2_CONNS:-64}" -m "${H2_STREAMS:-10}" -D 2 "https://localhost:$lb/" >/dev/null 2>&1 || true ;;
        h2-m100) taskset -c 1 h2load -c "${H2_M100_CONNS:-16}" -m "${H2_M100_STREAMS:-100}" -D 2 "https://localhost:$lb/" >/dev/null 2>&1 || true ;;
        *) taskset -c 1 wrk -t1 -c8 -d1s "https://localhost:$lb/" >/dev/null 2>&1 || true ;;
      esac
      recorder=""
      if [ -n "${SYSCALLS:-}" ] && [ "$round" = 1 ]; then
        syscalls_record "$wpid" "$work/syscalls.$proxy" "$DURATION" & recorder=$!
      fi
      t0=$(cpu_ticks "$wpid"); a0=$(backend_accepts)
      read -r rate units < <(run_load "$scenario")
      t1=$(cpu_ticks "$wpid"); a1=$(backend_accepts)
      if [ -n "$recorder" ]; then
        wait "$recorder" || true
        syscalls_report "$work/syscalls.$proxy" "$units" "$scenario $proxy"
      fi
      case $scenario in h2*)
        echo "$scenario $proxy $round $(peak_rss_kib "$wpid") $((a1 - a0))" >> "$extras"
        printf '%-16s round %s %-15s peak RSS %s KiB, new backend connections %s\n' "$scenario" "$round" "$proxy" "$(peak_rss_kib "$wpid")" "$((a1 - a0))" ;;
      esac
      stop_proxy
      cpu=$(awk -v d=$((t1-t0)) -v hz="$hz" -v n="$units" 'BEGIN { if (n > 0) printf "%.9f", d/hz/n; else print "nan" }')
      echo "$scenario $proxy $round $rate $cpu" >> "$results"
      printf '%-16s round %s %-15s rate %12s  cpu s/unit %s\n' "$scenario" "$round" "$proxy" "$rate" "$cpu"
    done
  done
done

python3 - "$results" "$extras" <<'PY'
import statistics, sys
rows = {}
extra = {}
for line in open(sys.argv[2]):
    f = line.split()
    extra.setdefault(f[0], {}).setdefault(f[1], []).append([float(x) for x in f[2:]])
for line in open(sys.argv[1]):
    s, p, _, rate, cpu = line.split()
    r = rows.setdefault(s, {}).setdefault(p, {"rate": [], "cpu": []})
    r["rate"].append(float(rate)); r["cpu"].append(float(cpu))
unit = {"l4": ("Gbit/s", "CPU s/GB"), "h2": ("req/s", "CPU s/req")}
print("\nmedians; ratio = proxy / haproxy (rate: higher is better; cpu: lower is better)")
for s, by_proxy in rows.items():
    rate_u, cpu_u = unit.get(s, ("req/s", "CPU s/req"))
    h = {k: statistics.median(v) for k, v in by_proxy["haproxy"].items()}
    print(f"\n{s}  ({rate_u}, {cpu_u}; {len(by_proxy['haproxy']['rate'])} rounds)")
    for p, r in by_proxy.items():
        m = {k: statistics.median(v) for k, v in r.items()}
        cpu = m["cpu"] * (1e6 if cpu_u.endswith("req") else 1)
        hcpu = h["cpu"] * (1e6 if cpu_u.endswith("req") else 1)
        cpu_s = f"{cpu:10.2f}{' us' if cpu_u.endswith('req') else ' s '}"
        more = ""
        if s in extra and p in extra[s]:
            rss = statistics.median(r[1] for r in extra[s][p]) / 1024
            new = [int(r[2]) for r in extra[s][p]]
            more = f" | peak RSS {rss:6.1f} MiB, new backend connections {min(new)}-{max(new)}"
        print(f"  {p:15} {m['rate']:12.2f} {cpu_s} | rate x{m['rate']/h['rate']:.2f}  cpu x{(cpu/hcpu if hcpu else float('nan')):.2f}{more}")
if "tls-idle" in extra:
    t = {p: v[0][0] for p, v in extra["tls-idle"].items()}
    print("\ntls-idle (bytes of RSS per idle TLS client; ratio to haproxy)")
    for p, v in t.items():
        print(f"  {p:15} {v:8.0f} B  x{v / t['haproxy']:.2f}")
PY
