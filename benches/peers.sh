# The HAProxy and nginx configurations that the HTTP/1.1 comparisons run: one thread or
# worker each, round robin over three backends, backend connections kept alive, nginx
# adding X-Forwarded-For as ballast does. Sourced by benches/compare.sh (timed) and
# benches/instructions.sh (callgrind), so both measure the same peers.
#
#   peer_configs DIR LISTEN_PORT BACKEND_PORT_1 BACKEND_PORT_2 BACKEND_PORT_3 [NGINX_MAIN]
#
# writes DIR/haproxy.cfg and DIR/nginx.conf; NGINX_MAIN goes into nginx's main context
# (instructions.sh runs nginx without its master process, `master_process off;`).
peer_configs() {
  local dir=$1 lb=$2 b1=$3 b2=$4 b3=$5 main=${6:-}
  cat > "$dir/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 9000
defaults
  mode http
  timeout connect 3s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
frontend web
  bind 127.0.0.1:$lb
  default_backend app
backend app
  balance roundrobin
  http-reuse always
  server b1 127.0.0.1:$b1
  server b2 127.0.0.1:$b2
  server b3 127.0.0.1:$b3
CONF
  cat > "$dir/nginx.conf" <<CONF
worker_processes 1; daemon off; $main error_log $dir/nginx.err; pid $dir/nginx.pid;
events { worker_connections 10000; }
http { access_log off; keepalive_requests 1000000;
  upstream app { server 127.0.0.1:$b1; server 127.0.0.1:$b2; server 127.0.0.1:$b3; keepalive 128; }
  server { listen 127.0.0.1:$lb;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_max_temp_file_size 0;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for; } } }
CONF
}
