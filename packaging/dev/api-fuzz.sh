#!/usr/bin/env bash
# OpenAPI-driven fuzz of the web API: starts a real server and one agent on
# a libvirt test-driver host (loopback only, in a temporary directory), then
# runs schemathesis against /v1/openapi.json with an admin token for a
# bounded number of cases per operation. It fails on any 5xx, any response
# that does not match its schema, and any schema-valid request refused for a
# reason the schema does not state.
#
#   bash packaging/dev/api-fuzz.sh            # 25 cases per operation
#   API_FUZZ_CASES=200 bash packaging/dev/api-fuzz.sh
#
# schemathesis comes from PyPI into a virtualenv kept outside the clone
# (NOVACRON_FUZZ_VENV, default /var/tmp/novacron-schemathesis), reused when
# present. Needs python3 with venv, curl, and the debug binaries (built here).
set -euo pipefail
cd "$(dirname "$0")/../.."
root="$(pwd)"

cases="${API_FUZZ_CASES:-25}"
venv="${NOVACRON_FUZZ_VENV:-/var/tmp/novacron-schemathesis}"
target="${CARGO_TARGET_DIR:-target}"

need=()
command -v curl >/dev/null 2>&1 || need+=(curl)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if [ ! -x "$venv/bin/schemathesis" ]; then
  echo "== installing schemathesis into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q 'schemathesis>=4,<5'
fi

cargo build --locked -q -p novacron-server -p novacron-agent --bins
server_bin="$target/debug/novacron-server"
agent_bin="$target/debug/novacron-agent"

work="$(mktemp -d /tmp/novacron-api-fuzz.XXXXXX)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
api_port="$(free_port)"
quic_port="$(free_port)"
api="https://127.0.0.1:$api_port"

cat >"$work/server.toml" <<EOF
data_dir = "$work/server"
[api]
listen = "127.0.0.1:$api_port"
rate_limit = 0.0
[quic]
listen = "127.0.0.1:$quic_port"
EOF
"$server_bin" -c "$work/server.toml" init >/dev/null
token="$(cat "$work/server/admin.token")"
# The API is HTTPS with the fleet CA's server certificate: verify it.
ca="$work/server/ca.pem"
fingerprint="$("$server_bin" -c "$work/server.toml" ca fingerprint)"
"$server_bin" -c "$work/server.toml" run 2>"$work/server.log" &
pids+=($!)
for _ in $(seq 100); do
  curl -sf --cacert "$ca" "$api/healthz" >/dev/null && break
  sleep 0.1
done
curl -sf --cacert "$ca" "$api/healthz" >/dev/null || { cat "$work/server.log" >&2; exit 1; }

# One agent on a libvirt test-driver host, so host routes have a live host.
mkdir -p "$work/host"
cat >"$work/host/node.xml" <<EOF
<node>
  <cpu><mhz>2400</mhz><model>x86_64</model><active>8</active><nodes>1</nodes>
    <sockets>1</sockets><cores>8</cores><threads>1</threads></cpu>
  <memory>16777216</memory>
</node>
EOF
cat >"$work/host/agent.toml" <<EOF
data_dir = "$work/host/data"
libvirt_uri = "test://$work/host/node.xml"
hostname = "fuzz-host"
[vms]
storage_path = "$work/host/pool"
console_log_dir = "$work/host"
EOF
join="$("$server_bin" -c "$work/server.toml" token create --ttl 10m)"
"$agent_bin" -c "$work/host/agent.toml" join --server "127.0.0.1:$quic_port" --token "$join" \
  --ca-fingerprint "${fingerprint#sha256:}" --server-name localhost >/dev/null
"$agent_bin" -c "$work/host/agent.toml" run 2>"$work/agent.log" &
pids+=($!)
for _ in $(seq 100); do
  curl -sf --cacert "$ca" -H "Authorization: Bearer $token" "$api/v1/hosts" | grep '"connected":true' >/dev/null && break
  sleep 0.1
done
# Fuzzing without the live host would skip what the host routes do.
curl -sf --cacert "$ca" -H "Authorization: Bearer $token" "$api/v1/hosts" | grep '"connected":true' >/dev/null ||
  { echo "== the test-driver agent did not connect; its log:" >&2; cat "$work/agent.log" >&2; exit 1; }

echo "== schemathesis: $cases cases per operation against $api" >&2
# The two event streams never end (they are read by the e2e tests instead);
# revoking the one host would only make every later host call a 404.
status=0
# Run from the temporary directory: schemathesis keeps its cache there.
# One connection per request: the server closes a keep-alive connection
# idle for its header timeout (10 s), and schemathesis, pausing longer than
# that to generate cases on a loaded machine, would send its next request
# into that close and report the EOF as a network error.
(cd "$work" && "$venv/bin/schemathesis" --config-file "$root/packaging/dev/api-fuzz.toml" run "$api/v1/openapi.json" \
  --header "Authorization: Bearer $token" \
  --header "Connection: close" \
  --tls-verify "$ca" \
  --checks all \
  --max-examples "$cases" \
  --request-timeout 70 \
  --exclude-operation-id streamEvents \
  --exclude-operation-id streamMetrics \
  --exclude-operation-id revokeHost \
  --no-color \
  --seed 1) || status=$?
if [ "$status" -ne 0 ]; then
  echo "== API fuzz failed; server log tail:" >&2
  tail -n 30 "$work/server.log" >&2
fi
exit "$status"
