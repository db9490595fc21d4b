#!/usr/bin/env bash
# Protocol load comparison: ballast vs HAProxy vs nginx, one worker each, same backends, in
# one run. Scenarios:
#   handshake-ecdsa  TLS full handshakes (openssl s_time -new, 4 clients), ECDSA P-256:
#                    handshakes/s and proxy CPU per handshake
#   handshake-rsa    the same with an RSA-2048 certificate
#   tls-keepalive    TLS, keep-alive: req/s and proxy CPU per request
#   h2               HTTP/2 over TLS (h2load, 10 streams per connection): req/s
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
#
# Needs Debian's haproxy, nginx-light + libnginx-mod-stream, wrk, nghttp2-client (h2load),
# iperf3 and openssl; installs them if missing (root). The proxy runs pinned to CPU 0, the
# backends and the load generator share CPU 1. Medians over rounds, ratios to HAProxy.
# Everything listens on 127.0.0.1; every process started here is stopped by PID.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
CONNS=${CONNS:-50}
BASE_PORT=${BASE_PORT:-18600}
SCENARIOS=${SCENARIOS:-"handshake-ecdsa handshake-rsa tls-keepalive h2 l4 l4-small"}

need() { command -v "$1" >/dev/null 2>&1; }
if ! need haproxy || ! need nginx || ! need wrk || ! need h2load || ! need iperf3 \
  || ! need redis-server || [ ! -e /usr/lib/nginx/modules/ngx_stream_module.so ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy nginx-light libnginx-mod-stream \
    wrk nghttp2-client iperf3 openssl redis-server redis-tools >/dev/null
fi
cargo build --release --quiet
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
run_load() {
  case $1 in
    handshake-*)
      # Full handshakes: `s_time -new` never resumes a session (wrk would). Four clients
      # in parallel; each connection also fetches / over HTTP/1.0.
      for i in 1 2 3 4; do
        taskset -c 1 openssl s_time -connect "127.0.0.1:$lb" -new -time "$DURATION" -www / \
          > "$work/stime.$i" 2>&1 &
      done
      wait
      n=$(cat "$work"/stime.* | awk '/connections in .* real seconds/ {s+=$1} END {print s+0}')
      echo "$(awk -v n="$n" -v d="$DURATION" 'BEGIN {printf "%.1f", n/d}') $n" ;;
    tls-keepalive)
      out=$(taskset -c 1 wrk -t1 -c"$CONNS" -d"${DURATION}s" "https://localhost:$lb/")
      echo "$(awk '/Requests\/sec/ {print $2}' <<<"$out") $(awk '/requests in/ {print $1}' <<<"$out")" ;;
    h2)
      out=$(taskset -c 1 h2load -c "$CONNS" -m 10 -D "$DURATION" "https://localhost:$lb/" 2>&1)
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

for scenario in $SCENARIOS; do
  case $scenario in
    handshake-ecdsa|tls-keepalive|h2) write_configs ecdsa ;;
    handshake-rsa) write_configs rsa ;;
    l4) write_configs tcp $iperf_port ;;
    l4-small) write_configs tcp $redis_port ;;
  esac
  proxies="ballast haproxy nginx"
  case $scenario in l4*) proxies="ballast ballast-splice haproxy haproxy-splice nginx" ;; esac
  for round in $(seq 1 "$ROUNDS"); do
    for proxy in $proxies; do
      start_proxy $proxy
      wpid=$(worker_pid $proxy)
      case $scenario in l4*) ;; *) taskset -c 1 wrk -t1 -c8 -d1s "https://localhost:$lb/" >/dev/null 2>&1 || true ;; esac
      t0=$(cpu_ticks "$wpid")
      read -r rate units < <(run_load "$scenario")
      t1=$(cpu_ticks "$wpid")
      stop_proxy
      cpu=$(awk -v d=$((t1-t0)) -v hz="$hz" -v n="$units" 'BEGIN { if (n > 0) printf "%.9f", d/hz/n; else print "nan" }')
      echo "$scenario $proxy $round $rate $cpu" >> "$results"
      printf '%-16s round %s %-15s rate %12s  cpu s/unit %s\n' "$scenario" "$round" "$proxy" "$rate" "$cpu"
    done
  done
done

python3 - "$results" <<'PY'
import statistics, sys
rows = {}
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
        print(f"  {p:15} {m['rate']:12.2f} {cpu_s} | rate x{m['rate']/h['rate']:.2f}  cpu x{(cpu/hcpu if hcpu else float('nan')):.2f}")
PY
