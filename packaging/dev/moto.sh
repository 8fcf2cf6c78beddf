#!/usr/bin/env bash
# moto, the AWS EC2 emulator the cloud-burst tests run against (PyPI
# `moto[server,ec2]`, pinned), in a venv of its own.
#
#   moto.sh install   make the venv and install moto into it; idempotent,
#                     serialized with flock (tests may call it at once),
#                     silent when moto is already there
#   moto.sh path      print the path of `moto_server`
#
# The venv is ${NOVACRON_MOTO_VENV:-/var/tmp/novacron-moto}. Needs access to
# PyPI, and python3 with its venv module (installed from Debian's python3-venv
# when missing).
set -euo pipefail

MOTO_VERSION=5.2.5
venv="${NOVACRON_MOTO_VENV:-/var/tmp/novacron-moto}"
server="$venv/bin/moto_server"
stamp="$venv/.novacron-moto-$MOTO_VERSION"

installed() {
  [ -x "$server" ] && [ -f "$stamp" ]
}

install() {
  installed && return 0
  mkdir -p "$(dirname "$venv")"
  exec 9>"$venv.lock"
  flock 9
  # Another caller may have installed it while this one waited.
  installed && return 0
  echo "moto.sh: installing moto $MOTO_VERSION into $venv" >&2
  if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    echo "moto.sh: installing python3-venv" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null
  fi
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "moto[server,ec2]==$MOTO_VERSION" >&2
  "$server" --help >/dev/null
  touch "$stamp"
  echo "moto.sh: moto $MOTO_VERSION installed" >&2
}

case "${1:-}" in
  install) install ;;
  path) echo "$server" ;;
  *)
    echo "usage: $0 install|path" >&2
    exit 2
    ;;
esac
