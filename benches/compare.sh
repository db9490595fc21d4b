#!/usr/bin/env bash
# Load comparison: ballast vs HAProxy vs nginx as round-robin HTTP/1.1 reverse proxies,
# each with one worker thread, in front of the same three backends, in one run.
#
#   bash benches/compare.sh            # 3 rounds x 10 s per proxy
#   ROUNDS=5 DURATION=20 CONNS=64 bash benches/compare.sh
#   BALLAST_BASELINE=/path/to/older/ballast bash benches/compare.sh   # + that build, same run
#   BALLAST_BIN=/path/to/ballast bash benches/compare.sh   # that build (no cargo build first)
#   OBSERVABILITY=1 bash benches/compare.sh   # + ballast with /metrics on, with an access log
#   THREADS2=1 bash benches/compare.sh   # + ballast with worker_threads = 2 on both CPUs
#   SCENARIO=idle IDLE_CLIENTS=4000 bash benches/compare.sh   # RSS per idle keep-alive client
#   SCENARIO=busy BUSY_CLIENTS=2000 bash benches/compare.sh   # RSS per stalled 1 MiB download
#     (both in two stages of N clients: per client from the start, and the second
#     stage's marginal cost, free of what the proxy keeps whatever the client count)
#   SCENARIO=close bash benches/compare.sh   # a new connection per request (Connection: close)
#   PERF=1 bash benches/compare.sh   # + a `perf record -e cpu-clock -g` of each proxy's first
#     round (kernel symbols included), summarised per proxy: the top symbols, and the
#     kernel's share; the raw profiles stay in PERF_DIR (default /tmp/ballast-perf)
#   SYSCALLS=1 bash benches/compare.sh   # + system calls and wake-ups per request of each
#     proxy in round 1 (perf stat on tracepoints: cheap enough not to move the numbers much)
#   LISTENER_EXTRA='response_buffer = "16KiB"' bash benches/compare.sh   # ballast listener keys
#   SCENARIO=h2 bash benches/compare.sh        # HTTP/2 over TLS, h2load -c64 -m10; h2-m100:
#     -c16 -m100 (both with peak RSS and new backend connections); handshake-rsa,
#     handshake-ecdsa: TLS full handshakes; tls-idle: RSS per idle TLS client. These run in
#     benches/protocols.sh (BALLAST_BASELINE works there too); SCENARIO may list several.
#
# Needs Debian's haproxy, nginx-light (or nginx) and wrk; installs them if missing (root).
# The proxy runs pinned to CPU 0; the backends (one nginx worker) and wrk share CPU 1, so
# the proxy is what saturates. Prints requests/s, p50/p99 latency and the proxy's CPU time
# per request (user+system from /proc, and user alone: the kernel's share is the same for
# every proxy), as the median over the rounds, and ratios to HAProxy.
# Everything listens on 127.0.0.1 only; every process started here is stopped by PID.
set -euo pipefail
cd "$(dirname "$0")/.."

case " ${SCENARIO:-} " in
  *" h2 "*|*" h2-m100 "*|*" handshake-"*|*" tls-"*|*" l4"*)
    SCENARIOS="$SCENARIO" exec bash benches/protocols.sh ;;
esac

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-50}
BASE_PORT=${BASE_PORT:-18500}

need() { command -v "$1" >/dev/null 2>&1; }
if ! need haproxy || ! need nginx || ! need wrk; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy nginx-light wrk >/dev/null
fi
[ -n "${BALLAST_BIN:-}" ] || cargo build --release --quiet
BALLAST=${BALLAST_BIN:-target/release/ballast}

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

b1=$((BASE_PORT+1)); b2=$((BASE_PORT+2)); b3=$((BASE_PORT+3)); lb=$((BASE_PORT+10))

# --- backends: one nginx worker, three ports, a small fixed answer -----------------------
cat > "$work/backends.conf" <<CONF
worker_processes 1; daemon off; error_log $work/backends.err; pid $work/backends.pid;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$b1; location / { return 200 "backend-1\n"; } location /big { root $work/www; } }
  server { listen 127.0.0.1:$b2; location / { return 200 "backend-2\n"; } location /big { root $work/www; } }
  server { listen 127.0.0.1:$b3; location / { return 200 "backend-3\n"; } location /big { root $work/www; } } }
CONF
mkdir -p "$work/www/big" && head -c 1048576 /dev/zero > "$work/www/big/file"   # /big/file: 1 MiB
chmod -R a+rX "$work"   # nginx workers run as nobody
taskset -c 1 nginx -c "$work/backends.conf" -p "$work" & pids+=($!)

# --- the three proxies -------------------------------------------------------------------
# benches/peers.sh: the same HAProxy and nginx as benches/instructions.sh measures.
# shellcheck source=benches/peers.sh
source benches/peers.sh
# shellcheck source=benches/syscalls.sh
source benches/syscalls.sh
peer_configs "$work" "$lb" "$b1" "$b2" "$b3"
cat > "$work/ballast.toml" <<CONF
[global]
worker_threads = 1
[listeners.web]
bind = "127.0.0.1:$lb"
pool = "app"
${LISTENER_EXTRA:-}
[pools.app]
algorithm = "round_robin"
backends = ["127.0.0.1:$b1", "127.0.0.1:$b2", "127.0.0.1:$b3"]
CONF

# The same ballast with metrics on (admin endpoint, latency histograms, one scrape a second
# while loaded), and with a JSON access log to a file (no admin).
sed -e "1i [admin]\nbind = \"127.0.0.1:$((BASE_PORT+20))\"" "$work/ballast.toml" > "$work/ballast-metrics.toml"
sed -e "1i [access_log]\npath = \"$work/access.log\"" "$work/ballast.toml" > "$work/ballast-log.toml"
# worker_threads = 2 (THREADS2=1), on both CPUs: CPU time per request against one thread's.
sed -e "s/worker_threads = 1/worker_threads = 2/" "$work/ballast.toml" > "$work/ballast-2t.toml"

wait_port() { for _ in $(seq 1 100); do curl -sf -o /dev/null "http://127.0.0.1:$1/" && return 0; sleep 0.1; done; echo "port $1 never answered" >&2; return 1; }
wait_port $b1

# CPU ticks (user+system) of a process and its children threads; and the two apart.
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
user_ticks() { awk '{print $14}' "/proc/$1/stat"; }

start_proxy() {
  case $1 in
    ballast) taskset -c 0 "$BALLAST" --config "$work/ballast.toml" --log warn & ;;
    ballast-base) taskset -c 0 "$BALLAST_BASELINE" --config "$work/ballast.toml" --log warn & ;;
    ballast-metrics) taskset -c 0 "$BALLAST" --config "$work/ballast-metrics.toml" --log warn & ;;
    ballast-log) taskset -c 0 "$BALLAST" --config "$work/ballast-log.toml" --log warn & ;;
    ballast-2t) taskset -c 0,1 "$BALLAST" --config "$work/ballast-2t.toml" --log warn & ;;
    haproxy) taskset -c 0 haproxy -db -f "$work/haproxy.cfg" & ;;
    nginx)   taskset -c 0 nginx -c "$work/nginx.conf" -p "$work" & ;;
  esac
  proxy_pid=$!
  pids+=($proxy_pid)
  wait_port $lb
}
# The process doing the work: nginx's worker is the master's child.
worker_pid() {
  if [ "$1" = nginx ]; then pgrep -P "$proxy_pid" | head -1; else echo "$proxy_pid"; fi
}
stop_proxy() { kill "$proxy_pid"; wait "$proxy_pid" 2>/dev/null || true; }

hz=$(getconf CLK_TCK)
results="$work/results"

# --- memory per client connection: idle keep-alive clients, or stalled downloads ---------
# idle: each client connects, makes one request, reads the answer and stays connected.
# busy: each requests a 1 MiB file and stops reading after the first KiB (4 KiB receive
# buffer; asyncio pauses reading past 8 KiB), so the download stays in flight.
# The proxy worker's RSS after, minus before, divided by the connections held; and after
# a second stage of as many clients, its growth divided by them (the marginal cost).
if [ "${SCENARIO:-}" = idle ] || [ "${SCENARIO:-}" = busy ]; then
  mode=$SCENARIO
  if [ "$mode" = idle ]; then
    # Per stage: two stages hold 8,000 clients, under every proxy's connection limit here.
    n=${IDLE_CLIENTS:-4000}
    # An allocator returns freed pages over seconds: the same wait applies to every proxy,
    # after each stage. ballast's jemalloc gives back the clients' freed request buffers in
    # one step 10-11 s after they were freed (dirty_decay_ms = 10 s; sampled once a second
    # in BENCHMARKS.md, issue 24 fourth pass), so a wait of 12 s read either side of that
    # step (1,010 or 1,255 B). The default waits well past it.
    settle=${IDLE_SETTLE:-20}
    what="idle keep-alive connection"
  else
    n=${BUSY_CLIENTS:-2000}
    settle=${BUSY_SETTLE:-3}
    what="busy connection (1 MiB download, client not reading)"
  fi
  rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
  cat > "$work/clients.py" <<'PY'
import asyncio, os, socket, sys
mode, port, n, ready, more, ready2, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:8]
async def one(sem, held):
    async with sem:
        if mode == "idle":
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET / HTTP/1.1\r\nHost: idle\r\n\r\n")
            head = await r.readuntil(b"\r\n\r\n")
            length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length"))
            await r.readexactly(length)
        else:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a slow reader's window
            s.setblocking(False)
            await asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", port))
            r, w = await asyncio.open_connection(sock=s, limit=4096)
            w.write(b"GET /big/file HTTP/1.1\r\nHost: busy\r\n\r\n")
            await r.readuntil(b"\r\n\r\n")
            await r.readexactly(1024)
        held.append(w)
async def wait_for(path):
    for _ in range(1200):  # at most 120 s
        if os.path.exists(path) or os.path.exists(stop):
            return
        await asyncio.sleep(0.1)
async def main():
    # Two stages of n clients: the second stage's RSS growth is the marginal cost of a
    # held client, free of anything fixed (backend connections kept for reuse, allocator
    # caches warmed by the first stage).
    held, sem = [], asyncio.Semaphore(200)
    await asyncio.gather(*(one(sem, held) for _ in range(n)))
    open(ready, "w").write(str(len(held)))
    await wait_for(more)
    await asyncio.gather(*(one(sem, held) for _ in range(n)))
    open(ready2, "w").write(str(len(held)))
    await wait_for(stop)
asyncio.run(main())
PY
  : > "$results"
  memory_proxies="ballast haproxy nginx"
  [ -n "${BALLAST_BASELINE:-}" ] && memory_proxies="ballast ballast-base haproxy nginx"
  for proxy in $memory_proxies; do
    start_proxy $proxy
    wpid=$(worker_pid $proxy)
    taskset -c 1 wrk -t1 -c50 -d2s "http://127.0.0.1:$lb/" >/dev/null   # warm-up
    sleep 1
    before=$(rss_kib "$wpid")
    rm -f "$work/ready" "$work/more" "$work/ready2" "$work/stop"
    taskset -c 1 python3 "$work/clients.py" "$mode" "$lb" "$n" "$work/ready" "$work/more" "$work/ready2" "$work/stop" & client=$!
    for _ in $(seq 1 900); do [ -f "$work/ready" ] && break; sleep 0.1; done
    sleep "$settle"
    held=$(cat "$work/ready" 2>/dev/null || echo 0)
    after=$(rss_kib "$wpid")
    touch "$work/more"
    for _ in $(seq 1 900); do [ -f "$work/ready2" ] && break; sleep 0.1; done
    sleep "$settle"
    held2=$(cat "$work/ready2" 2>/dev/null || echo 0)
    after2=$(rss_kib "$wpid")
    touch "$work/stop"; wait "$client" || true
    stop_proxy
    # From `before` (the first n clients, as measured before 2026-12-01: it includes the
    # backend connections the proxy opens for reuse and keeps, up to 200 at once), and
    # the marginal cost (the second n clients).
    per=$(awk -v a="$after" -v b="$before" -v n="$held" 'BEGIN {printf "%.0f", (a-b)*1024/(n>0?n:1)}')
    marginal=$(awk -v a="$after2" -v b="$after" -v n="$((held2 - held))" 'BEGIN {printf "%.0f", (a-b)*1024/(n>0?n:1)}')
    echo "$proxy $per $marginal" >> "$results"
    printf '%-12s %5s clients held: RSS %7s KiB -> %7s KiB, %7s bytes per connection; %5s more: -> %7s KiB, %7s bytes each (marginal)\n' "$proxy" "$held" "$before" "$after" "$per" "$((held2 - held))" "$after2" "$marginal"
  done
  awk -v what="$what" '{v[$1]=$2; m[$1]=$3} END {
    printf "\nRSS per %s: ballast %s B, HAProxy %s B, nginx %s B; ballast / HAProxy = %.2f\n", what, v["ballast"], v["haproxy"], v["nginx"], v["ballast"]/v["haproxy"]
    printf "marginal (second stage): ballast %s B, HAProxy %s B, nginx %s B; ballast / HAProxy = %.2f\n", m["ballast"], m["haproxy"], m["nginx"], m["ballast"]/m["haproxy"]
    if ("ballast-base" in v) printf "baseline build: %s B (%.2f x HAProxy), marginal %s B (%.2f x HAProxy)\n", v["ballast-base"], v["ballast-base"]/v["haproxy"], m["ballast-base"], m["ballast-base"]/m["haproxy"]}' "$results"
  exit 0
fi

# --- connection per request: every request on a new client connection -------------------
wrk_args=()
if [ "${SCENARIO:-}" = close ]; then
  wrk_args=(-H "Connection: close")
fi
: > "$results"
proxies="ballast haproxy nginx"
if [ -n "${THREADS2:-}" ]; then proxies="ballast-2t $proxies"; fi
if [ -n "${BALLAST_BASELINE:-}" ]; then proxies="ballast-base $proxies"; fi
if [ -n "${OBSERVABILITY:-}" ]; then
  proxies="ballast ballast-metrics ballast-log haproxy nginx"
  if [ -n "${BALLAST_BASELINE:-}" ]; then proxies="ballast-base $proxies"; fi
fi
for round in $(seq 1 "$ROUNDS"); do
  for proxy in $proxies; do
    start_proxy $proxy
    wpid=$(worker_pid $proxy)
    taskset -c 1 wrk -t1 -c"$CONNS" -d2s "http://127.0.0.1:$lb/" >/dev/null   # warm-up
    scraper=""
    if [ "$proxy" = ballast-metrics ]; then
      # Prometheus' part: one scrape a second (bounded by the run's length).
      ( for _ in $(seq 1 "$DURATION"); do curl -s -o /dev/null "http://127.0.0.1:$((BASE_PORT+20))/metrics"; sleep 1; done ) &
      scraper=$!
    fi
    recorder=""
    if [ -n "${PERF:-}" ] && [ "$round" = 1 ]; then
      mkdir -p "${PERF_DIR:-/tmp/ballast-perf}"
      perf record -q -e cpu-clock -g -p "$wpid" -o "${PERF_DIR:-/tmp/ballast-perf}/$proxy.data" \
        -- sleep "$DURATION" >/dev/null 2>&1 & recorder=$!
    fi
    if [ -n "${SYSCALLS:-}" ] && [ "$round" = 1 ]; then
      syscalls_record "$wpid" "$work/syscalls.$proxy" "$DURATION" & recorder=$!
    fi
    t0=$(cpu_ticks "$wpid"); u0=$(user_ticks "$wpid")
    out=$(taskset -c 1 wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "${wrk_args[@]}" "http://127.0.0.1:$lb/")
    t1=$(cpu_ticks "$wpid"); u1=$(user_ticks "$wpid")
    if [ -n "$scraper" ]; then wait "$scraper" || true; fi
    if [ -n "$recorder" ]; then wait "$recorder" || true; fi
    stop_proxy
    reqs=$(awk '/requests in/ {print $1}' <<<"$out")
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    p50=$(awk '$1=="50%" {print $2}' <<<"$out")
    p99=$(awk '$1=="99%" {print $2}' <<<"$out")
    errors=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
    cpu_us=$(awk -v d=$((t1-t0)) -v hz="$hz" -v n="$reqs" 'BEGIN {printf "%.2f", d/hz*1e6/n}')
    user_us=$(awk -v d=$((u1-u0)) -v hz="$hz" -v n="$reqs" 'BEGIN {printf "%.2f", d/hz*1e6/n}')
    echo "$proxy $round $rps $p50 $p99 $cpu_us $user_us" >> "$results"
    if [ -f "$work/syscalls.$proxy" ]; then
      syscalls_report "$work/syscalls.$proxy" "$reqs" "$proxy" >> "$work/syscalls"
    fi
    printf 'round %s %-8s %10s req/s  p50 %-8s p99 %-8s cpu/req %6s us (user %s) %s\n' "$round" "$proxy" "$rps" "$p50" "$p99" "$cpu_us" "$user_us" "$errors"
  done
done

python3 - "$results" <<'PY'
import statistics, sys
def ms(v):
    for unit, f in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
        if v.endswith(unit):
            return float(v[: -len(unit)]) * f
    return float(v)
rows = {}
for line in open(sys.argv[1]):
    p, _, rps, p50, p99, cpu, user = line.split()
    r = rows.setdefault(p, {"rps": [], "p50": [], "p99": [], "cpu": [], "user": []})
    r["rps"].append(float(rps)); r["p50"].append(ms(p50)); r["p99"].append(ms(p99)); r["cpu"].append(float(cpu))
    r["user"].append(float(user))
med = {p: {k: statistics.median(v) for k, v in r.items()} for p, r in rows.items()}
h = med["haproxy"]
print(f"\nmedian of {len(rows['haproxy']['rps'])} rounds; ratio = proxy / haproxy (req/s: higher is better; latency, cpu: lower is better)")
# user: the proxy's own code; the rest of cpu is the kernel's (system time).
print(f"{'proxy':12} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'cpu us/req':>10} {'user':>6} | {'req/s':>6} {'p50':>6} {'p99':>6} {'cpu':>6} {'user':>6}")
for p in ("ballast", "ballast-base", "ballast-2t", "ballast-metrics", "ballast-log", "haproxy", "nginx"):
    if p not in med:
        continue
    m = med[p]
    print(f"{p:12} {m['rps']:10.0f} {m['p50']:8.3f} {m['p99']:8.3f} {m['cpu']:10.2f} {m['user']:6.2f} | "
          f"{m['rps']/h['rps']:6.2f} {m['p50']/h['p50']:6.2f} {m['p99']/h['p99']:6.2f} {m['cpu']/h['cpu']:6.2f} "
          f"{m['user']/h['user']:6.2f}")
PY

if [ -f "$work/syscalls" ]; then
  echo; echo "== system calls and wake-ups per request (round 1; sys_enter = every call; unit = request) =="
  cat "$work/syscalls"
fi

if [ -n "${PERF:-}" ]; then
  for proxy in $proxies; do
    data="${PERF_DIR:-/tmp/ballast-perf}/$proxy.data"
    [ -f "$data" ] || continue
    echo; echo "== $proxy: top symbols (self time, cpu-clock samples) =="
    perf report -i "$data" --stdio --no-children --sort sym -g none --percent-limit 1.2 2>/dev/null \
      | grep -v '^#' | grep -v '^$' | head -40
    # [k] marks kernel symbols in perf's output.
    perf report -i "$data" --stdio --no-children --sort sym -g none 2>/dev/null \
      | awk '/\[k\]/ {k+=$1} /\[\.\]/ {u+=$1} END {printf "kernel %.1f%%, user %.1f%% of samples\n", k, u}'
  done
fi

