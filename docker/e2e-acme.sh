#!/usr/bin/env bash
# End-to-end run of README's compose ACME setup (docker/compose.yml + docker/compose.acme.yml)
# against pebble, the ACME test CA, on this machine: the image FROM scratch, its named
# volume for storage, the published ports. Checks that the certificate is issued into the
# volume as the image's user, served on the published HTTPS port, that port 80 redirects
# everything but the CA's challenge, and that a recreated container serves the stored
# certificate without a new order. Tears down what it started (containers, network,
# volume, image, pebble, temp files); pebble listens only on this project's network gateway
# and on loopback.
#
#   bash docker/e2e-acme.sh
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in pebble pebble-challtestsrv openssl python3 curl; do
  if ! command -v "$tool" >/dev/null; then
    echo "SKIPPED: docker/e2e-acme.sh needs $tool (.ci/run installs Debian's pebble, openssl, curl)"
    exit 0
  fi
done

project="ballastacme$$"
image="ballast:e2e-acme-$$"
work=$(mktemp -d)
chmod 755 "$work"
domain="acme.e2e.test"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
http_port=$(free_port)
https_port=$(free_port)
export BALLAST_IMAGE="$image" BALLAST_CONFIG_DIR="$work" BALLAST_PORT="127.0.0.1:"
export BALLAST_HTTP_PORT="127.0.0.1:$http_port" BALLAST_HTTPS_PORT="127.0.0.1:$https_port"
export BALLAST_ADMIN_TOKEN="e2e-$$-$RANDOM$RANDOM" BALLAST_DOMAIN="$domain" BALLAST_ACME_EMAIL="ops@e2e.test"

dc() { docker-compose -p "$project" -f docker/compose.yml -f docker/compose.acme.yml "$@"; }
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  dc down -v --remove-orphans --timeout 5 >/dev/null 2>&1 || true
  docker image rm "$image" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
step() { echo "== $*"; }
fail() {
  echo "FAIL: $*"
  dc logs --tail 40 lb || true
  [ -f "$work/pebble.log" ] && tail -n 20 "$work/pebble.log"
  exit 1
}
wait_for() {
  local limit=$1
  shift
  local end=$((SECONDS + limit))
  until "$@"; do
    [ $SECONDS -lt $end ] || return 1
    sleep 0.5
  done
}

step "building $image (FROM scratch)"
bash docker/build-image.sh "$image"

step "the compose network, then pebble on its gateway"
dc up --no-start 2>&1 | tail -n 2
gw=$(docker network inspect "${project}_default" -f '{{range .IPAM.Config}}{{.Gateway}}{{end}}')
[ -n "$gw" ] || fail "no gateway address for ${project}_default"
# pebble's own HTTPS: a test CA and a certificate for the gateway's address.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=e2e-ca \
  -keyout "$work/ca.key" -out "$work/acme-ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=pebble \
  -keyout "$work/pebble.key" -out "$work/pebble.csr" 2>/dev/null
printf 'subjectAltName=IP:%s\n' "$gw" >"$work/san.ext"
openssl x509 -req -in "$work/pebble.csr" -CA "$work/acme-ca.pem" -CAkey "$work/ca.key" -CAcreateserial \
  -days 1 -extfile "$work/san.ext" -out "$work/pebble.pem" 2>/dev/null
chmod 644 "$work/acme-ca.pem"
dir_port=$(free_port)
dns_port=$(free_port)
cat >"$work/pebble.json" <<JSON
{"pebble": {"listenAddress": "$gw:$dir_port", "managementListenAddress": "127.0.0.1:$(free_port)",
 "certificate": "$work/pebble.pem", "privateKey": "$work/pebble.key",
 "httpPort": $http_port, "tlsPort": $https_port, "ocspResponderURL": "",
 "externalAccountBindingRequired": false}}
JSON
pebble-challtestsrv -defaultIPv4 127.0.0.1 -defaultIPv6 "" -dns01 "127.0.0.1:$dns_port" \
  -http01 "" -https01 "" -tlsalpn01 "" -management "127.0.0.1:$(free_port)" >"$work/dns.log" 2>&1 &
pids+=($!)
PEBBLE_VA_NOSLEEP=1 PEBBLE_WFE_NONCEREJECT=0 PEBBLE_AUTHZREUSE=0 \
  pebble -config "$work/pebble.json" -dnsserver "127.0.0.1:$dns_port" >"$work/pebble.log" 2>&1 &
pids+=($!)
listening() { python3 -c "import socket,sys; socket.create_connection(('$gw', $dir_port), 1)" 2>/dev/null; }
wait_for 20 listening || fail "pebble did not start"

# The shipped config, as README has users run it, pointed at pebble: the directory, its
# CA, and a short first retry (the first attempt may race pebble's start).
sed -e 's|^# directory = .*|directory = "https://'"$gw:$dir_port"'/dir"\ndirectory_ca = "/etc/ballast/acme-ca.pem"\nretry_after = "1s"|' \
  docker/compose-acme/ballast.toml >"$work/ballast.toml"
chmod 644 "$work/ballast.toml"
grep -q "^directory = \"https://$gw" "$work/ballast.toml" || fail "could not point the config at pebble"

step "docker-compose up (compose.yml + compose.acme.yml)"
dc up -d --scale app=2 2>&1 | tail -n 2
lb=$(dc ps -q lb)
status() {
  docker exec "$lb" /usr/local/bin/ballast probe \
    --header "Authorization: Bearer $BALLAST_ADMIN_TOKEN" --body http://127.0.0.1:9000/status
}
issued() {
  status 2>/dev/null | python3 -c 'import json,sys; r=json.load(sys.stdin)["listeners"]["https"]["tls"]["acme"]["renewal"]; sys.exit(0 if r and r.get("last_result") == "issued" else 1)'
}
wait_for 60 issued || fail "no certificate issued: $(status 2>/dev/null | head -c 2000)"
orders() { grep -c "POST /order-plz" "$work/pebble.log" || true; }
[ "$(orders)" -eq 1 ] || fail "$(orders) orders placed, expected 1"
served() {
  openssl s_client -connect "127.0.0.1:$https_port" -servername "$domain" </dev/null 2>/dev/null |
    openssl x509 -noout -issuer -ext subjectAltName 2>/dev/null
}
serving() { served | grep -q "DNS:$domain"; }
wait_for 10 serving || fail "the published HTTPS port does not serve the certificate: $(served)"
served | grep -q "Pebble" || fail "not pebble's certificate: $(served)"
echo "ok: issued by pebble into the volume, served on the published HTTPS port"
code=$(curl -s -o /dev/null -w '%{http_code}' --resolve "$domain:$https_port:127.0.0.1" -k "https://$domain:$https_port/")
[ "$code" = 200 ] || fail "HTTPS request answered $code"
code=$(curl -s -o /dev/null -w '%{http_code}' -H "Host: $domain" "http://127.0.0.1:$http_port/")
case "$code" in 301 | 308) ;; *) fail "port 80 answered $code, expected a redirect" ;; esac
echo "ok: HTTPS answers 200 through ballast; port 80 redirects"

step "recreating the lb container: the stored certificate serves, no new order"
dc up -d --force-recreate --no-deps lb 2>&1 | tail -n 1
lb=$(dc ps -q lb)
wait_for 30 serving || fail "the recreated container does not serve the stored certificate"
[ "$(orders)" -eq 1 ] || fail "the recreated container ordered again ($(orders) orders)"
echo "ok: the named volume kept the certificate; 1 order in all"

step "all checks passed; tearing down"
