#!/usr/bin/env bash
# Installs what building and testing NovaCron needs on Debian 12, and nothing
# that is already there. Idempotent; needs root (or sudo) only when
# something is missing.
set -euo pipefail

need=()
pkg-config --exists libvirt 2>/dev/null || need+=(libvirt-dev pkg-config)
command -v virsh >/dev/null 2>&1 || need+=(libvirt-clients)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v genisoimage >/dev/null 2>&1 || need+=(genisoimage)
# curl: the HTTPS tests call the API as an operator would.
command -v curl >/dev/null 2>&1 || need+=(curl ca-certificates)
# Prometheus and promtool: the exposition is checked and scraped for real.
command -v promtool >/dev/null 2>&1 || need+=(prometheus)

if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# moto, the EC2 emulator the cloud-burst tests run against (a venv of its own).
bash "$(dirname "${BASH_SOURCE[0]}")/moto.sh" install
