#!/usr/bin/env bash
# moto, the AWS EC2 emulator the cloud-burst tests run against (PyPI
# `moto[server,ec2]`, pinned), in a venv of its own.
#
#   moto.sh install   make the venv and install moto into it; idempotent,
#                     serialized with flock (tests may call it at once),
#                     silent when moto is already there
#   moto.sh path      print the path of `moto_server`
#
# The venv is ${NOVACRON_MOTO_VENV:-/var/tmp/novacron-moto}. Needs python3
# with the venv module (Debian: python3-venv) and access to PyPI.
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
