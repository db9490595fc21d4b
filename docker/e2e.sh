#!/usr/bin/env bash
# End-to-end run of the compose blueprint (docker/compose.yml) on this machine's Docker
# engine, with docker-compose (v1): builds the image FROM scratch, scales the `app` service
# up and down under load, edits the mounted config, and checks what a user would see.
# Tears down everything it started (containers, network, the image it built, temp files).
#
#   bash docker/e2e.sh
set -euo pipefail
cd "$(dirname "$0")/.."

project="ballaste2e$$"
image="ballast:e2e-$$"
work=$(mktemp -d)
cp docker/compose/ballast.toml "$work/ballast.toml"
chmod 755 "$work"
chmod 644 "$work/ballast.toml"
export BALLAST_IMAGE="$image" BALLAST_CONFIG_DIR="$work"
# Run as users are told to: with an admin token (the HEALTHCHECK must not need it).
BALLAST_ADMIN_TOKEN="e2e-$$-$RANDOM$RANDOM"
export BALLAST_ADMIN_TOKEN
# Ephemeral host ports on loopback: nothing else on the machine is disturbed.
export BALLAST_PORT="127.0.0.1:"

dc() { docker-compose -p "$project" -f docker/compose.yml "$@"; }
loads=()
cleanup() {
  for p in "${loads[@]}"; do kill "$p" 2>/dev/null || true; done
  dc down -v --remove-orphans --timeout 5 >/dev/null 2>&1 || true
  docker image rm "$image" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
step() { echo "== $*"; }
fail() {
  echo "FAIL: $*"
  dc logs --tail 40 lb || true
  exit 1
}

# --- the image -------------------------------------------------------------------------
step "building $image (FROM scratch)"
bash docker/build-image.sh "$image"
size=$(docker image inspect -f '{{.Size}}' "$image")
[ "$size" -lt 30000000 ] || fail "image is $size bytes (limit 30 MB)"
user=$(docker image inspect -f '{{.Config.User}}' "$image")
case "${user%%:*}" in "" | 0 | root) fail "image runs as root (User=$user)" ;; esac
echo "ok: image $size bytes, user $user"

# --- up, scale 5 ------------------------------------------------------------------------
step "docker-compose up --scale app=5"
dc up -d --scale app=5 2>&1 | tail -n 3
lb=$(dc ps -q lb)
port=$(dc port lb 8080 | sed 's/.*://')
url="http://127.0.0.1:$port/"

# Polls (every 0.5 s, at most $1 seconds) until the command in $2.. succeeds.
wait_for() {
  local limit=$1
  shift
  local end=$((SECONDS + limit))
  until "$@"; do
    [ $SECONDS -lt $end ] || return 1
    sleep 0.5
  done
}
# The admin endpoint listens on the container's loopback: ask through the image's own probe.
status() {
  docker exec "$lb" /usr/local/bin/ballast probe \
    --header "Authorization: Bearer $BALLAST_ADMIN_TOKEN" --body http://127.0.0.1:9000/status
}
healthy_backends() {
  status 2>/dev/null |
    python3 -c 'import json,sys; print(sum(b["state"]=="healthy" for b in json.load(sys.stdin)["pools"]["app"]["backends"]))' 2>/dev/null || echo 0
}
has_healthy() { [ "$(healthy_backends)" -eq "$1" ]; }
container_healthy() { [ "$(docker inspect -f '{{.State.Health.Status}}' "$lb")" = healthy ]; }
# Host names of $1 sequential requests, one per line.
hosts() {
  for _ in $(seq 1 "$1"); do
    curl -fsS --max-time 5 "$url" | sed -n 's/^hello from \([^ ]*\) .*/\1/p'
  done
}

wait_for 60 container_healthy || fail "the image's HEALTHCHECK (ballast probe) never passed"
echo "ok: HEALTHCHECK passes inside the image, with an admin token set"
! docker exec "$lb" /usr/local/bin/ballast probe http://127.0.0.1:9000/status 2>/dev/null ||
  fail "/status answered without the token"
status >/dev/null || fail "/status refused the token"
echo "ok: /status needs the token and takes it"
uids=$(docker top "$lb" -eo pid,uid | tail -n +2 | awk '{print $2}' | sort -u | tr '\n' ' ')
[ "$uids" = "10001 " ] || fail "ballast runs as uid(s) $uids, expected 10001"
echo "ok: ballast runs as uid 10001"
wait_for 30 has_healthy 5 || fail "ballast did not find 5 healthy replicas: $(healthy_backends)"
list=$(hosts 50)
distinct=$(sort -u <<<"$list" | wc -l)
[ "$distinct" -eq 5 ] || fail "50 requests reached $distinct replicas, expected 5"
# Round robin: every window of 5 consecutive answers names 5 different replicas.
first5=$(head -n 5 <<<"$list" | sort -u | wc -l)
counts=$(sort <<<"$list" | uniq -c | awk '{print $1}' | sort -u | tr '\n' ' ')
[ "$first5" -eq 5 ] && [ "$counts" = "10 " ] || fail "not in rotation: first five $first5 distinct, counts $counts"
echo "ok: 50 requests, 5 replicas, 10 each, in rotation"

# --- steady load helpers ------------------------------------------------------------------
# A load loop: sequential requests until $1 exists (at most 20,000 or 180 s); writes
# "sent failed" to $2.
load() {
  local stop=$1 out=$2 sent=0 failed=0 end=$((SECONDS + 180))
  while [ ! -e "$stop" ] && [ $sent -lt 20000 ] && [ $SECONDS -lt $end ]; do
    curl -fsS --max-time 10 -o /dev/null "$url" || failed=$((failed + 1))
    sent=$((sent + 1))
  done
  echo "$sent $failed" >"$out"
}
start_load() {
  rm -f "$work/stop" "$work"/load.*
  loads=()
  for i in 1 2 3; do
    load "$work/stop" "$work/load.$i" &
    loads+=($!)
  done
}
# Stops the loops and sets $sent and $failed (not in a subshell: it waits for its children).
stop_load() {
  touch "$work/stop"
  for p in "${loads[@]}"; do wait "$p"; done
  loads=()
  read -r sent failed < <(cat "$work"/load.* | awk '{s += $1; f += $2} END {print s, f}')
}

# --- docker stop one replica under load -----------------------------------------------------
step "docker stop one replica under a steady request loop"
# awk, not head: head exits after its lines, and under pipefail the SIGPIPE that
# docker-compose may then get (status 141) ends the script (seen once, in a clean-clone
# run of .ci/run).
victim=$(dc ps -q app | awk 'NR == 1')
victim_host=$(docker inspect -f '{{.Config.Hostname}}' "$victim")
start_load
sleep 1
docker stop "$victim" >/dev/null
wait_for 20 has_healthy 4 || fail "ballast still counts $(healthy_backends) healthy replicas"
sleep 1
stop_load
[ "$failed" -eq 0 ] || fail "$failed of $sent requests failed while a replica stopped"
list=$(hosts 40)
distinct=$(sort -u <<<"$list" | wc -l)
[ "$distinct" -eq 4 ] || fail "after the stop: $distinct replicas answer, expected 4"
! grep -qx "$victim_host" <<<"$list" || fail "the stopped replica still answers"
echo "ok: $sent requests, 0 failed; then 4 replicas"

# --- scale up to 7 ------------------------------------------------------------------------
step "docker-compose up --scale app=7"
dc up -d --scale app=7 --no-recreate 2>&1 | tail -n 1
seven() { [ "$(hosts 70 | sort -u | wc -l)" -eq 7 ]; }
t0=$SECONDS
wait_for 15 seven || fail "7 replicas did not all answer within 15 s"
echo "ok: 7 replicas answer after $((SECONDS - t0)) s"

# --- scale down to 2 under load -----------------------------------------------------------
step "docker-compose up --scale app=2 under load"
start_load
sleep 1
dc up -d --scale app=2 --no-recreate 2>&1 | tail -n 1
wait_for 30 has_healthy 2 || fail "ballast counts $(healthy_backends) healthy replicas, expected 2"
sleep 1
stop_load
[ "$failed" -eq 0 ] || fail "$failed of $sent requests failed during the scale-down"
distinct=$(hosts 20 | sort -u | wc -l)
[ "$distinct" -eq 2 ] || fail "after scale-down: $distinct replicas answer, expected 2"
echo "ok: $sent requests, 0 failed; then 2 replicas"

# --- most replicas exit at once, with no lame duck -------------------------------------------
step "scale to 7, then 5 replicas killed at once under load (apps that exit on SIGTERM)"
dc up -d --scale app=7 --no-recreate 2>&1 | tail -n 1
wait_for 30 has_healthy 7 || fail "ballast counts $(healthy_backends) healthy replicas, expected 7"
start_load
sleep 1
# SIGKILL: no lame duck, no draining; the port refuses at once and DNS still names them.
killed=$(dc ps -q app | awk 'NR <= 5')
docker kill $killed >/dev/null
wait_for 30 has_healthy 2 || fail "ballast counts $(healthy_backends) healthy replicas, expected 2"
sleep 1
stop_load
[ "$failed" -eq 0 ] || fail "$failed of $sent requests failed when 5 of 7 replicas died at once"
echo "ok: $sent requests, 0 failed while 5 of 7 replicas died at once"
docker rm -f $killed >/dev/null

# --- edit the mounted config ----------------------------------------------------------------
step "editing the mounted ballast.toml (round_robin -> hash on X-User)"
sed -i 's/^algorithm = "round_robin"/algorithm = "hash"\nhash_key = "header:X-User"/' "$work/ballast.toml"
sticky() {
  local n
  n=$(for _ in $(seq 1 10); do curl -fsS --max-time 5 -H 'X-User: alice' "$url"; done |
    sed -n 's/^hello from \([^ ]*\) .*/\1/p' | sort -u | wc -l)
  [ "$n" -eq 1 ]
}
applied() { status | grep -q '"algorithm":"hash"'; }
wait_for 10 applied || fail "the edit was not applied"
sticky || fail "hash on X-User is not sticky"
echo "ok: the edit applied live; X-User: alice always reaches one replica"

step "all checks passed; tearing down"
