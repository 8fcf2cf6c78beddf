#!/usr/bin/env bash
# Real libvirt + QEMU test bed for NovaCron on Debian 12 (root, no systemd as
# PID 1). See packaging/dev/README.md for what was measured on such a machine.
#
#   testbed.sh install        install qemu-system-x86, libvirt, busybox-static,
#                             genisoimage (only what is missing)
#   testbed.sh start          start virtlogd + libvirtd if not running, wait for
#                             them, warm the QEMU capability probe; prints the URI
#   testbed.sh stop           stop the virtlogd/libvirtd that `start` started
#   testbed.sh libvirtd-pid   print the PID of the running libvirtd
#   testbed.sh guest DIR      build DIR/vmlinuz + DIR/initrd.img (tiny guest)
#   testbed.sh hosts-up N     N (1-8) libvirt hosts in network namespaces
#                             ncb-h1..ncb-hN (10.231.0.1..N), one bridge;
#                             prints "name<TAB>ip<TAB>local_uri<TAB>migration_uri"
#   testbed.sh hosts-up N --ha  the same, plus what HA tests need: a server
#                             namespace ncb-srv (10.231.0.254) on the bridge and
#                             a directory pool shared by all hosts; prints two
#                             more lines: "server-ns<TAB>ncb-srv<TAB>10.231.0.254"
#                             and "shared-pool<TAB>PATH"; each host runs libvirt
#                             with the lockd lock manager (its own virtlockd)
#   testbed.sh host-kill NAME     SIGKILL every process of host NAME (by pid)
#   testbed.sh host-revive NAME   boot a killed host again (its /run emptied,
#                             its libvirt definitions and disks kept)
#   testbed.sh host-power NAME on|off|status   the host's power as a BMC
#                             sees it (off = host-kill, on = host-revive;
#                             status exits 0 on, 2 off); see fence-testbed
#   testbed.sh link-cut NAME [down|drop]   cut host NAME's link (veth0 down,
#                             or an nft DROP of all but loopback inside it)
#   testbed.sh link-restore NAME  undo link-cut
#   testbed.sh hosts-down     stop them all (domains, daemons, QEMUs), delete
#                             the namespaces and their state
#
# Idempotent and non-interactive; messages go to stderr, results to stdout.
set -euo pipefail

URI=qemu:///system
RUN_DIR=${NOVACRON_TESTBED_RUN_DIR:-/run/novacron-testbed}
LIBVIRT_RUN=/run/libvirt
SOCK=$LIBVIRT_RUN/libvirt-sock
WAIT_SECS=60
# Bump when the guest's layout or /init changes in a way the script hash
# would not catch (the stamp also includes the hash of this file).
GUEST_FORMAT=2
# Modules the guest loads if the kernel has them as modules (=m). Their
# dependencies are added automatically; built-in ones (=y) are skipped.
GUEST_MODULES=(virtio_pci virtio_blk virtio_scsi virtio_net virtio_balloon sd_mod button evdev)
# Several hosts on one machine (hosts-up / hosts-down).
HOSTS_DIR=${NOVACRON_TESTBED_HOSTS_DIR:-$RUN_DIR/hosts}
HOSTS_LIB_DIR=${NOVACRON_TESTBED_HOSTS_LIB_DIR:-/var/lib/novacron-testbed/hosts}
HOST_PREFIX=ncb-h
BRIDGE_NS=ncb-br
HOST_NET=10.231.0
MAX_HOSTS=8
# For HA tests (hosts-up N --ha): a namespace of its own on the bridge for
# the server, and a directory every host sees at the same path.
SERVER_NS=ncb-srv
SERVER_IP=$HOST_NET.254
SHARED_DIR=${NOVACRON_TESTBED_SHARED_DIR:-/var/lib/novacron-testbed/shared}
# The nft table link-cut adds inside a host.
CUT_TABLE=ncb_cut
ROOT_NETNS=

log() { printf 'testbed: %s\n' "$*" >&2; }
die() { printf 'testbed: error: %s\n' "$*" >&2; exit 1; }
need_root() { [ "$(id -u)" -eq 0 ] || die "'$1' must run as root"; }
need_cmd() { command -v "$1" >/dev/null 2>&1 || die "'$1' not found; run: $0 install"; }

self_path() {
  local p=${BASH_SOURCE[0]}
  [ -e "$p" ] || die "cannot locate this script ($p)"
  readlink -f -- "$p"
}

usage() {
  cat >&2 <<EOF
usage: $0 install | start | stop | libvirtd-pid | guest DIR | hosts-up N [--ha] | hosts-down
          | host-kill NAME | host-revive NAME | host-power NAME on|off|status
          | link-cut NAME [down|drop] | link-restore NAME
  install       install qemu-system-x86 (qemu-utils pinned to 1:7.2), libvirt-daemon-system,
                libvirt-clients, libvirt-dev, busybox-static, genisoimage, iproute2, nftables if missing
  start         start virtlogd and libvirtd if not running (pids in $RUN_DIR),
                wait for $SOCK, warm up the QEMU probe, print "$URI"
  stop          stop the libvirtd and virtlogd that 'start' started (by pid)
  libvirtd-pid  print the pid of the running libvirtd
  guest DIR     build a tiny bootable guest: DIR/vmlinuz and DIR/initrd.img
  hosts-up N    make sure hosts ncb-h1..ncb-hN (N 1-$MAX_HOSTS) are up: network namespaces on
                a bridge (namespace $BRIDGE_NS), $HOST_NET.1..N/24, each with its own
                virtlogd + libvirtd (state in $HOSTS_DIR/NAME, /var/lib/libvirt
                in $HOSTS_LIB_DIR/NAME/lib); prints one line per host:
                NAME<TAB>IP<TAB>qemu+unix:///system?socket=PATH<TAB>qemu+tcp://IP/system
  hosts-up N --ha
                the same, plus for HA tests: a namespace $SERVER_NS with $SERVER_IP/24 on the
                bridge (run the server there with 'ip netns exec $SERVER_NS'; agents run in
                their host's namespace with 'ip netns exec NAME'), and a directory pool
                $SHARED_DIR that every host sees at the same path (o+x parents,
                owned by libvirt-qemu; override with NOVACRON_TESTBED_SHARED_DIR); after
                the host lines it prints "server-ns<TAB>$SERVER_NS<TAB>$SERVER_IP" and
                "shared-pool<TAB>$SHARED_DIR"; each host's qemu.conf has lock_manager = "lockd"
                and its own virtlockd runs before its libvirtd (disk locks held outside QEMU,
                on the disk files themselves); a host up without --ha is recreated with it
                (and the other way round)
  host-kill NAME
                SIGKILL every process in host NAME's network namespace ('ip netns pids',
                each checked to live there): libvirtd, virtlogd, QEMUs, an agent run
                there; waits until none is left. The namespace and state stay.
  host-revive NAME
                boot a killed host again: its /run/libvirt emptied (as a reboot does),
                its /etc/libvirt (persistent domains) and /var/lib/libvirt kept, its
                daemons started; refuses while any process of it still runs
  host-power NAME on|off|status
                the host's power as a BMC sees it: 'off' = host-kill (no error when already
                off), 'on' = host-revive (no error when already on), 'status' prints on/off
                and exits 0 (on: some process of the host runs) or 2 (off)
  link-cut NAME [down|drop]
                cut host NAME off the bridge: 'down' (default) sets its veth0 down;
                'drop' adds an nft table $CUT_TABLE inside it dropping every packet
                in and out but loopback (the link stays up, packets vanish)
  link-restore NAME
                undo link-cut (veth0 up, the nft table deleted); no error if not cut
  hosts-down    destroy their domains, stop their daemons and QEMUs (by pid),
                delete the namespaces ($SERVER_NS too) and the state (the shared
                pool too)
EOF
}

# ---------------------------------------------------------------- install --

pkg_installed() {
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = installed ]
}

cmd_install() {
  need_root install
  local pkgs=(qemu-system-x86 libvirt-daemon-system libvirt-clients libvirt-dev busybox-static genisoimage iproute2 nftables)
  local missing=() p qv
  for p in "${pkgs[@]}"; do pkg_installed "$p" || missing+=("$p"); done
  # Debian 12's qemu-system-x86 (7.2) cannot coexist with the newer qemu-utils
  # from backports that some images ship: pin qemu-utils to 1:7.2.
  qv=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
  case "$qv" in 1:7.2*) ;; *) missing+=(qemu-utils) ;; esac
  if [ ${#missing[@]} -eq 0 ]; then
    log "install: all packages already present"
    return 0
  fi
  log "install: missing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq </dev/null >&2 || die "apt-get update failed"
  local v
  v=$(apt-cache show qemu-utils | awk '/^Version: 1:7\.2/{print $2; exit}')
  [ -n "$v" ] || die "no qemu-utils 1:7.2 version in the apt sources (Debian 12 bookworm needed)"
  local args=("qemu-utils=$v")
  for p in "${missing[@]}"; do [ "$p" = qemu-utils ] || args+=("$p"); done
  log "install: apt-get install ${args[*]}"
  if ! apt-get install -y -q --allow-downgrades \
      -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
      "${args[@]}" </dev/null >&2; then
    # A postinst that tries to start a service without systemd may fail;
    # let dpkg finish configuring and judge by what is installed.
    log "install: apt-get reported an error; checking what got installed"
    dpkg --configure -a </dev/null >&2 || true
  fi
  local still=()
  for p in "${pkgs[@]}"; do pkg_installed "$p" || still+=("$p"); done
  [ ${#still[@]} -eq 0 ] || die "install: still missing after apt-get: ${still[*]}"
  for c in virsh libvirtd virtlogd qemu-system-x86_64 qemu-img genisoimage; do need_cmd "$c"; done
  [ -x /bin/busybox ] || die "install: /bin/busybox (busybox-static) missing"
  log "install: done (libvirt $(libvirtd --version | awk '{print $NF}'), $(qemu-system-x86_64 --version | head -1))"
}

# ------------------------------------------------------------ daemons -------

read_pid() { if [ -r "$1" ]; then tr -dc '0-9' <"$1" || true; fi; }

# pid_alive PID NAME: PID is a live (non-zombie) process whose comm is NAME.
pid_alive() {
  local pid=$1 name=$2 st
  [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" = "$name" ] || return 1
  st=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)
  [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

# daemon_pid NAME: print the pid of a running NAME (ours first, then the
# daemon's default pid file, then whoever listens on its socket).
daemon_pid() {
  local name=$1 f p sock
  for f in "$RUN_DIR/$name.pid" "/run/$name.pid"; do
    p=$(read_pid "$f")
    if pid_alive "$p" "$name"; then echo "$p"; return 0; fi
  done
  case $name in
    libvirtd) sock=$SOCK ;;
    virtlogd) sock=$LIBVIRT_RUN/virtlogd-sock ;;
    *) return 1 ;;
  esac
  if [ -S "$sock" ] && command -v ss >/dev/null 2>&1; then
    p=$(ss -xlpn 2>/dev/null | awk -v s="$sock" '$5 == s' | grep -o 'pid=[0-9]*' | head -1 | tr -dc '0-9' || true)
    if pid_alive "$p" "$name"; then echo "$p"; return 0; fi
  fi
  return 1
}

# Serialise concurrent start/stop calls (parallel tests).
take_lock() {
  exec 9>"$RUN_DIR/lock"
  flock -w 120 9 || die "could not lock $RUN_DIR/lock within 120 s"
}

virsh_ok() { timeout 10 virsh -c "$URI" uri >/dev/null 2>&1; }

wait_for() { # wait_for SECONDS COMMAND...: poll COMMAND until true or timeout
  local secs=$1; shift
  local end=$((SECONDS + secs))
  until "$@"; do
    [ $SECONDS -lt $end ] || return 1
    sleep 0.2
  done
}

start_virtlogd() {
  local p
  if p=$(daemon_pid virtlogd); then
    log "start: virtlogd already running (pid $p)"
    return 0
  fi
  rm -f "$RUN_DIR/virtlogd.pid" "$LIBVIRT_RUN/virtlogd-sock" "$LIBVIRT_RUN/virtlogd-admin-sock"
  log "start: starting virtlogd"
  bare virtlogd -d -p "$RUN_DIR/virtlogd.pid" </dev/null >&2 || die "virtlogd failed to start"
  wait_for 15 test -S "$LIBVIRT_RUN/virtlogd-sock" ||
    die "virtlogd did not create $LIBVIRT_RUN/virtlogd-sock within 15 s"
  log "start: virtlogd running (pid $(read_pid "$RUN_DIR/virtlogd.pid"))"
}

# Runs a daemon with no descriptor but stdin/out/err inherited: a daemon
# that kept a caller's lock file or output pipe open would hold that lock,
# or keep a test runner waiting for EOF, for as long as it lives.
bare() {
  (
    for fd in /proc/$BASHPID/fd/*; do
      fd=${fd##*/}
      [ "$fd" -gt 2 ] 2>/dev/null && eval "exec $fd>&-" 2>/dev/null
    done
    exec "$@"
  )
}

start_libvirtd() {
  local p
  if p=$(daemon_pid libvirtd); then
    log "start: libvirtd already running (pid $p)"
  elif virsh_ok; then
    log "start: something already answers on $URI (pid unknown); using it"
  else
    # Nothing alive: whatever is left (after a kill -9) is stale. Keep
    # $LIBVIRT_RUN/qemu/: it is how a new libvirtd finds running guests.
    rm -f "$RUN_DIR/libvirtd.pid" "$SOCK" "$SOCK-ro" "$LIBVIRT_RUN/libvirt-admin-sock"
    log "start: starting libvirtd"
    bare libvirtd -d -p "$RUN_DIR/libvirtd.pid" </dev/null >&2 || die "libvirtd failed to start (see /var/log/libvirt/)"
    log "start: libvirtd running (pid $(read_pid "$RUN_DIR/libvirtd.pid"))"
  fi
  wait_for $WAIT_SECS test -S "$SOCK" ||
    die "$SOCK did not appear within $WAIT_SECS s"
  wait_for $WAIT_SECS virsh_ok ||
    die "'virsh -c $URI uri' did not answer within $WAIT_SECS s"
}

cmd_start() {
  need_root start
  for c in virsh libvirtd virtlogd qemu-system-x86_64; do need_cmd "$c"; done
  mkdir -p "$RUN_DIR" "$LIBVIRT_RUN"
  take_lock
  start_virtlogd
  start_libvirtd
  # The first QEMU call on a new daemon pays the capability probe (8-10 s);
  # pay it here, not inside a test's timeout.
  local t0
  t0=$(date +%s%N)
  timeout 120 virsh -c "$URI" capabilities >/dev/null ||
    die "'virsh capabilities' failed"
  timeout 120 virsh -c "$URI" domcapabilities --virttype qemu --arch x86_64 >/dev/null ||
    die "'virsh domcapabilities --virttype qemu' failed (is qemu-system-x86 installed?)"
  log "start: QEMU capabilities ready ($((($(date +%s%N) - t0) / 1000000)) ms)"
  echo "$URI"
}

stop_one() {
  local name=$1 f=$RUN_DIR/$1.pid p
  p=$(read_pid "$f")
  if ! pid_alive "$p" "$name"; then
    [ -e "$f" ] && log "stop: $name (pid ${p:-?}) not running; removing stale pid file"
    rm -f "$f"
    return 0
  fi
  log "stop: stopping $name (pid $p)"
  kill -TERM "$p" 2>/dev/null || true
  local end=$((SECONDS + 20))
  while pid_alive "$p" "$name" && [ $SECONDS -lt $end ]; do sleep 0.2; done
  if pid_alive "$p" "$name"; then
    log "stop: $name (pid $p) ignored SIGTERM for 20 s; sending SIGKILL"
    kill -KILL "$p" 2>/dev/null || true
  fi
  rm -f "$f"
}

cmd_stop() {
  need_root stop
  mkdir -p "$RUN_DIR"
  take_lock
  stop_one libvirtd
  stop_one virtlogd
  local p
  if p=$(daemon_pid libvirtd); then
    log "stop: a libvirtd this script did not start is still running (pid $p); left alone"
  fi
  log "stop: done (running QEMU guests, if any, keep running)"
}

cmd_libvirtd_pid() {
  local p
  p=$(daemon_pid libvirtd) || die "libvirtd is not running; run: $0 start"
  echo "$p"
}

# ------------------------------------------------------------- hosts --------
#
# Several libvirt "hosts" on this one machine (see "Several hosts on one
# machine" in the README). Host i is the network namespace ncb-hi with
# address 10.231.0.i/24 on its veth "veth0"; the other end, named ncb-hi, is a
# port of bridge br0 in the namespace ncb-br. Each host runs its own virtlogd
# and libvirtd inside private mount + UTS namespaces, with bind mounts over
# /run/libvirt, /var/lib/libvirt, /etc/libvirt, /var/log/libvirt and
# /var/cache/libvirt. Every process of a host lives in its network namespace,
# whose id (net:[inode]) is recorded so that pids are never trusted blindly.

hosts_dir_abs() {
  local d
  d=$(readlink -m -- "$HOSTS_DIR")
  case $d in
    /*/*) ;;
    *) die "NOVACRON_TESTBED_HOSTS_DIR ($HOSTS_DIR) must be an absolute path below /" ;;
  esac
  printf '%s\n' "$d"
}

host_name() { echo "$HOST_PREFIX$1"; }
host_ip() { echo "$HOST_NET.$1"; }
host_base() { echo "$HOSTS_DIR/$1"; }
host_lib() { echo "$HOSTS_LIB_DIR/$1/lib"; }
host_sock() { echo "$HOSTS_DIR/$1/run/libvirt-sock"; }
host_local_uri() { echo "qemu+unix:///system?socket=$(host_sock "$1")"; }
host_mig_uri() { echo "qemu+tcp://$1/system"; }

netns_exists() { [ -e "/run/netns/$1" ] && ip netns list 2>/dev/null | awk '{print $1}' | grep -x -- "$1" >/dev/null; }
netns_id() { stat -L -c 'net:[%i]' "/run/netns/$1" 2>/dev/null; }

proc_running() {
  local st
  [ -n "$1" ] && [ -r "/proc/$1/stat" ] || return 1
  st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null || true)
  [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

# pid_is PID COMM_GLOB NSID: a live PID whose comm matches the glob and that
# lives in the network namespace NSID (never the root one).
pid_is() {
  local pid=$1 pat=$2 nsid=$3 comm ns
  [ -n "$nsid" ] && [ "$nsid" != "$ROOT_NETNS" ] || return 1
  proc_running "$pid" || return 1
  comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
  # shellcheck disable=SC2254
  case $comm in $pat) ;; *) return 1 ;; esac
  ns=$(readlink "/proc/$pid/ns/net" 2>/dev/null || true)
  [ "$ns" = "$nsid" ]
}

# kill_wait PID SECS CHECK...: SIGTERM, wait up to SECS while CHECK holds,
# then SIGKILL and wait up to 5 s more.
kill_wait() {
  local pid=$1 secs=$2; shift 2
  kill -TERM "$pid" 2>/dev/null || true
  local end=$((SECONDS + secs))
  while "$@" && [ $SECONDS -lt $end ]; do sleep 0.1; done
  if "$@"; then
    log "hosts: pid $pid ignored SIGTERM for $secs s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    end=$((SECONDS + 5))
    while "$@" && [ $SECONDS -lt $end ]; do sleep 0.1; done
  fi
  ! "$@" || log "hosts: warning: pid $pid still alive after SIGKILL"
}

host_virsh_ok() { timeout 10 virsh -q -c "$(host_local_uri "$1")" uri >/dev/null 2>&1; }

# Take the hosts lock on fd 9 (separate from start/stop's lock).
take_hosts_lock() {
  mkdir -p "$(dirname "$HOSTS_DIR")"
  exec 9>"$HOSTS_DIR.lock"
  flock -w 300 9 || die "could not lock $HOSTS_DIR.lock within 300 s"
}

bridge_ok() {
  netns_exists "$BRIDGE_NS" && ip -n "$BRIDGE_NS" link show br0 >/dev/null 2>&1
}

ensure_bridge() {
  bridge_ok && return 0
  log "hosts: creating bridge namespace $BRIDGE_NS"
  netns_exists "$BRIDGE_NS" || ip netns add "$BRIDGE_NS"
  ip -n "$BRIDGE_NS" link set lo up
  ip -n "$BRIDGE_NS" link show br0 >/dev/null 2>&1 ||
    ip -n "$BRIDGE_NS" link add br0 type bridge
  ip -n "$BRIDGE_NS" link set br0 up
}

# host_link_ok NAME IP: veth0 in NAME carries IP/24 and its peer is on br0.
# A link that is merely down (a fault test cut it) still counts as present.
host_link_ok() {
  ip -n "$1" -o -4 addr show dev veth0 2>/dev/null | grep " inet $2/24 " >/dev/null &&
    ip -n "$BRIDGE_NS" -o link show "$1" 2>/dev/null | grep ' master br0 ' >/dev/null
}

link_admin_up() { ip -n "$1" -o link show "$2" 2>/dev/null | grep '[<,]UP[,>]' >/dev/null; }

create_link() {
  local name=$1 ip=$2
  ip -n "$BRIDGE_NS" link del "$name" 2>/dev/null || true
  ip -n "$name" link del veth0 2>/dev/null || true
  ip link add veth0 netns "$name" type veth peer name "$name" netns "$BRIDGE_NS"
  ip -n "$BRIDGE_NS" link set "$name" master br0
  ip -n "$BRIDGE_NS" link set "$name" up
  ip -n "$name" addr add "$ip/24" dev veth0
  ip -n "$name" link set veth0 up
  ip -n "$name" link set lo up
}

# host_healthy NAME: its namespace, both daemons (by pid, in that namespace)
# and its libvirtd socket answer.
host_healthy() {
  local name=$1 b nsid
  b=$(host_base "$name")
  [ -d "$b" ] && netns_exists "$name" || return 1
  nsid=$(cat "$b/netns" 2>/dev/null || true)
  [ -n "$nsid" ] && [ "$(netns_id "$name")" = "$nsid" ] || return 1
  pid_is "$(read_pid "$b/libvirtd.pid")" libvirtd "$nsid" || return 1
  pid_is "$(read_pid "$b/virtlogd.pid")" virtlogd "$nsid" || return 1
  if [ -e "$b/ha" ]; then pid_is "$(read_pid "$b/virtlockd.pid")" virtlockd "$nsid" || return 1; fi
  [ -S "$b/run/libvirt-sock" ] && host_virsh_ok "$name"
}

# set_conf FILE KEY VALUE: drop active KEY lines (also a multi-line [ ... ]
# value), append "KEY = VALUE".
set_conf() {
  local f=$1 k=$2 v=$3
  awk -v k="$k" '
    skip { if ($0 ~ /\]/) skip = 0; next }
    $0 ~ "^[ \t]*" k "[ \t]*=" { if ($0 ~ /\[/ && $0 !~ /\]/) skip = 1; next }
    { print }' "$f" >"$f.new"
  printf '%s = %s\n' "$k" "$v" >>"$f.new"
  chmod --reference="$f" "$f.new"
  mv -f "$f.new" "$f"
}

# no_mounts_under DIR: refuse to delete a tree something is mounted in.
no_mounts_under() {
  ! awk -v d="$1/" 'index($5 "/", d) == 1 {found = 1} END {exit !found}' /proc/self/mountinfo
}

# cleanup_host NAME: destroy its domains, stop its daemons and QEMUs (by pid,
# each checked to live in the host's network namespace), delete the namespace,
# the veth and the state. No error when nothing is there.
cleanup_host() {
  local name=$1 b lib nsid p f n uri dom
  b=$(host_base "$name")
  lib=$HOSTS_LIB_DIR/$name
  nsid=$(cat "$b/netns" 2>/dev/null || true)
  [ -n "$nsid" ] || nsid=$(netns_id "$name" || true)
  if [ -S "$b/run/libvirt-sock" ] && pid_is "$(read_pid "$b/libvirtd.pid")" libvirtd "$nsid" &&
     host_virsh_ok "$name"; then
    uri=$(host_local_uri "$name")
    while read -r dom; do
      [ -n "$dom" ] || continue
      log "hosts: $name: destroying domain $dom"
      timeout 60 virsh -q -c "$uri" destroy "$dom" </dev/null >/dev/null 2>&1 ||
        log "hosts: $name: destroy $dom failed; its QEMU is killed below"
    done < <(timeout 20 virsh -q -c "$uri" list --name 2>/dev/null || true)
  fi
  for n in libvirtd virtlogd virtlockd; do
    p=$(read_pid "$b/$n.pid")
    if pid_is "$p" "$n" "$nsid"; then
      log "hosts: $name: stopping $n (pid $p)"
      kill_wait "$p" 20 pid_is "$p" "$n" "$nsid"
    fi
  done
  for f in "$b"/run/qemu/*.pid; do
    # driver.pid is libvirtd's own lock file, not a QEMU's.
    if [ ! -e "$f" ] || [ "${f##*/}" = driver.pid ]; then continue; fi
    p=$(read_pid "$f")
    if pid_is "$p" 'qemu-system-*' "$nsid"; then
      log "hosts: $name: killing QEMU pid $p ($(basename "$f" .pid))"
      kill_wait "$p" 10 pid_is "$p" 'qemu-system-*' "$nsid"
    fi
  done
  # Anything else still in the namespace was started by or for this host.
  if netns_exists "$name"; then
    for p in $(ip netns pids "$name" 2>/dev/null || true); do
      proc_running "$p" || continue
      [ "$(readlink "/proc/$p/ns/net" 2>/dev/null || true)" = "$nsid" ] || continue
      log "hosts: $name: killing leftover pid $p ($(cat "/proc/$p/comm" 2>/dev/null || echo '?'))"
      kill_wait "$p" 5 proc_running "$p"
    done
  fi
  ip -n "$BRIDGE_NS" link del "$name" 2>/dev/null || true
  if netns_exists "$name"; then
    ip netns del "$name" || log "hosts: warning: 'ip netns del $name' failed"
  fi
  for f in "$b" "$lib"; do
    [ -e "$f" ] || continue
    no_mounts_under "$f" || die "hosts: something is mounted under $f; not deleting it"
    rm -rf -- "$f"
  done
}

# prepare_host NAME IP HA: fresh state dirs and a private /etc/libvirt; with
# HA=1 also the lockd lock manager (marker file "ha" in the host dir).
prepare_host() {
  local name=$1 ip=$2 ha=$3 b lib
  b=$(host_base "$name")
  lib=$(host_lib "$name")
  mkdir -p "$HOSTS_DIR" "$HOSTS_LIB_DIR/$name"
  # QEMU runs as libvirt-qemu: every parent of what it opens needs o+x.
  chmod 755 "$HOSTS_DIR" "$HOSTS_LIB_DIR" "$HOSTS_LIB_DIR/$name"
  mkdir -m 755 "$b" "$b/run" "$b/etc" "$b/log" "$b/cache" "$lib"
  mkdir -m 711 "$lib/images" "$lib/boot"
  cp -a /etc/libvirt/. "$b/etc/"
  # Nothing of the main daemon's domains, pools or secrets.
  rm -f "$b"/etc/qemu/*.xml "$b"/etc/qemu/autostart/* "$b"/etc/storage/*.xml \
        "$b"/etc/storage/autostart/* "$b"/etc/secrets/*
  local uuid
  uuid=$(cat /proc/sys/kernel/random/uuid)
  set_conf "$b/etc/libvirtd.conf" listen_tls 0
  set_conf "$b/etc/libvirtd.conf" listen_tcp 1
  set_conf "$b/etc/libvirtd.conf" listen_addr "\"$ip\""
  set_conf "$b/etc/libvirtd.conf" auth_tcp '"none"'
  set_conf "$b/etc/libvirtd.conf" host_uuid "\"$uuid\""
  set_conf "$b/etc/qemu.conf" cgroup_controllers '[ ]'
  set_conf "$b/etc/qemu.conf" migration_host "\"$ip\""
  if [ "$ha" -eq 1 ]; then
    # Disk locks held by virtlockd on the disk files themselves (the
    # defaults of qemu-lockd.conf: automatic leases, no lockspace dir), so
    # two hosts that share a pool cannot run one disk twice.
    set_conf "$b/etc/qemu.conf" lock_manager '"lockd"'
    : >"$b/ha"
  fi
  # Reuse the main daemon's QEMU capability cache (libvirt re-validates it
  # and re-probes if stale): saves the 8-10 s probe per host.
  if compgen -G '/var/cache/libvirt/qemu/capabilities/*.xml' >/dev/null; then
    mkdir -p "$b/cache/qemu/capabilities"
    cp -p /var/cache/libvirt/qemu/capabilities/*.xml "$b/cache/qemu/capabilities/" 2>/dev/null || true
  fi
  echo "$ip" >"$b/ip"
  echo "$uuid" >"$b/uuid"
}

# host_is_ha NAME: the host was prepared for HA (lockd, virtlockd).
host_is_ha() { [ -e "$(host_base "$1")/ha" ]; }

# launch_host NAME IP: namespace, link and daemons; does not wait.
launch_host() {
  local name=$1 ip=$2 b
  b=$(host_base "$name")
  ip netns add "$name"
  netns_id "$name" >"$b/netns"
  create_link "$name" "$ip"
  log "hosts: $name: starting virtlogd + libvirtd ($ip, state $b)"
  start_host_daemons "$name"
}

# start_host_daemons NAME: virtlogd (+ virtlockd for an HA host) + libvirtd
# in NAME's namespace, inside private mount + UTS namespaces; does not wait.
start_host_daemons() {
  local name=$1 b lib lockd=0
  b=$(host_base "$name")
  lib=$(host_lib "$name")
  if host_is_ha "$name"; then lockd=1; fi
  # shellcheck disable=SC2016
  bare ip netns exec "$name" unshare --mount --uts --propagation private -- bash -c '
    set -e
    hostname "$1"
    mount --bind "$2/run" /run/libvirt
    mount --bind "$3" /var/lib/libvirt
    mount --bind "$2/etc" /etc/libvirt
    mount --bind "$2/log" /var/log/libvirt
    mount --bind "$2/cache" /var/cache/libvirt
    virtlogd -d -p "$2/virtlogd.pid"
    if [ "$4" = 1 ]; then
      virtlockd -d -p "$2/virtlockd.pid"
      i=0
      until [ -S /run/libvirt/virtlockd-sock ]; do
        i=$((i + 1)); [ $i -lt 150 ] || { echo "virtlockd made no socket in 15 s" >&2; exit 1; }
        sleep 0.1
      done
    fi
    libvirtd -d --listen -p "$2/libvirtd.pid"' novacron-host "$name" "$b" "$lib" "$lockd" \
    </dev/null >>"$b/daemons.log" 2>&1 ||
    { cat "$b/daemons.log" >&2; die "hosts: $name: starting its daemons failed"; }
}

# wait_host NAME: until its libvirtd answers; then warm the QEMU probe.
wait_host() {
  local name=$1 b uri
  b=$(host_base "$name")
  uri=$(host_local_uri "$name")
  wait_for $WAIT_SECS test -S "$b/run/libvirt-sock" ||
    die "hosts: $name: $b/run/libvirt-sock did not appear within $WAIT_SECS s (see $b/daemons.log, $b/log/libvirtd.log)"
  wait_for $WAIT_SECS host_virsh_ok "$name" ||
    die "hosts: $name: 'virsh -c $uri uri' did not answer within $WAIT_SECS s (see $b/log/libvirtd.log)"
  timeout 120 virsh -q -c "$uri" capabilities >/dev/null ||
    die "hosts: $name: 'virsh capabilities' failed"
  timeout 120 virsh -q -c "$uri" domcapabilities --virttype qemu --arch x86_64 >/dev/null ||
    die "hosts: $name: 'virsh domcapabilities --virttype qemu' failed"
  host_healthy "$name" || die "hosts: $name: not healthy after start (see $b/daemons.log)"
}

# Host names this script may have left behind (dirs and namespaces).
known_hosts() {
  {
    local d
    for d in "$HOSTS_DIR/$HOST_PREFIX"* "$HOSTS_LIB_DIR/$HOST_PREFIX"*; do
      [ -d "$d" ] && basename "$d"
    done
    ip netns list 2>/dev/null | awk '{print $1}'
  } | grep -E "^${HOST_PREFIX}[0-9]+\$" | sort -u -V || true
}

hosts_check_env() {
  need_root "$1"
  for c in ip flock; do need_cmd "$c"; done
  HOSTS_DIR=$(hosts_dir_abs)
  HOSTS_LIB_DIR=$(readlink -m -- "$HOSTS_LIB_DIR")
  case $HOSTS_LIB_DIR in
    /*/*) ;;
    *) die "NOVACRON_TESTBED_HOSTS_LIB_DIR ($HOSTS_LIB_DIR) must be an absolute path below /" ;;
  esac
  # The socket path goes into a URI unescaped and into sun_path (108 bytes).
  case "$HOSTS_DIR$HOSTS_LIB_DIR" in
    *[!A-Za-z0-9/._-]*) die "state paths may only contain [A-Za-z0-9/._-]: $HOSTS_DIR $HOSTS_LIB_DIR" ;;
  esac
  [ ${#HOSTS_DIR} -le 80 ] || die "NOVACRON_TESTBED_HOSTS_DIR is too long for a unix socket path"
  ROOT_NETNS=$(readlink /proc/self/ns/net)
}

cmd_hosts_up() {
  local n=${1:-} ha=0
  case ${2:-} in
    '') ;;
    --ha) ha=1 ;;
    *) usage; die "hosts-up: unknown option '${2}'" ;;
  esac
  [ $# -le 2 ] || { usage; die "hosts-up: too many arguments"; }
  case $n in ''|*[!0-9]*) usage; die "hosts-up: N (1-$MAX_HOSTS) missing or not a number" ;; esac
  n=$((10#$n))
  if [ "$n" -lt 1 ] || [ "$n" -gt $MAX_HOSTS ]; then die "hosts-up: N must be 1-$MAX_HOSTS (got $n)"; fi
  hosts_check_env hosts-up
  for c in unshare virsh libvirtd virtlogd qemu-system-x86_64; do need_cmd "$c"; done
  local d
  mkdir -p /run/libvirt
  for d in /run/libvirt /var/lib/libvirt /etc/libvirt /var/log/libvirt /var/cache/libvirt; do
    [ -d "$d" ] || die "hosts-up: $d missing (bind mount target); run: $0 install"
  done
  take_hosts_lock
  local t0=$SECONDS i name ip started=()
  ensure_bridge
  if [ $ha -eq 1 ]; then
    ensure_server_ns
    ensure_shared_dir
  fi
  for ((i = 1; i <= n; i++)); do
    name=$(host_name "$i")
    ip=$(host_ip "$i")
    local was_ha=0
    if host_is_ha "$name"; then was_ha=1; fi
    if [ $was_ha -ne $ha ] && host_healthy "$name"; then
      log "hosts: $name: up, but $([ $ha -eq 1 ] && echo without || echo with) the HA lock manager; recreating it"
      cleanup_host "$name"
    fi
    if host_healthy "$name"; then
      if ! host_link_ok "$name" "$ip"; then
        log "hosts: $name: daemons healthy but its link is gone; recreating veth0"
        create_link "$name" "$ip"
      fi
      if ! link_admin_up "$name" veth0 || ! link_admin_up "$BRIDGE_NS" "$name"; then
        log "hosts: $name: note: its link is set down (a fault test?); left as it is"
      fi
      log "hosts: $name: already up ($ip)"
      continue
    fi
    if [ -e "$(host_base "$name")" ] || netns_exists "$name" || [ -e "$HOSTS_LIB_DIR/$name" ]; then
      log "hosts: $name: half-up or stale; cleaning it"
    fi
    cleanup_host "$name"
    prepare_host "$name" "$ip" "$ha"
    launch_host "$name" "$ip"
    started+=("$name")
  done
  # Wait for (and warm) the new hosts in parallel: the first QEMU probe
  # costs 8-10 s per host when the capability cache cannot be reused.
  local pids=() rc=0 k
  for name in "${started[@]}"; do
    wait_host "$name" &
    pids+=($!)
  done
  for k in "${!pids[@]}"; do
    wait "${pids[$k]}" || rc=1
  done
  [ $rc -eq 0 ] || die "hosts-up: some hosts did not come up (see above)"
  [ ${#started[@]} -eq 0 ] || log "hosts: started ${started[*]} in $((SECONDS - t0)) s"
  for name in $(known_hosts); do
    i=${name#"$HOST_PREFIX"}
    [ "$i" -le "$n" ] || log "hosts: $name is beyond N=$n; left as it is (hosts-down removes it)"
  done
  for ((i = 1; i <= n; i++)); do
    name=$(host_name "$i")
    printf '%s\t%s\t%s\t%s\n' "$name" "$(host_ip "$i")" "$(host_local_uri "$name")" "$(host_mig_uri "$(host_ip "$i")")"
  done
  if [ $ha -eq 1 ]; then
    printf 'server-ns\t%s\t%s\n' "$SERVER_NS" "$SERVER_IP"
    printf 'shared-pool\t%s\n' "$SHARED_DIR"
  fi
}

cmd_hosts_down() {
  hosts_check_env hosts-down
  take_hosts_lock
  local name any=0
  for name in $(known_hosts); do
    any=1
    cleanup_host "$name"
    log "hosts: $name: removed"
  done
  if netns_exists "$SERVER_NS"; then
    any=1
    cleanup_server_ns
    log "hosts: $SERVER_NS: removed"
  fi
  if [ -d "$SHARED_DIR" ]; then
    any=1
    no_mounts_under "$SHARED_DIR" || die "hosts: something is mounted under $SHARED_DIR; not deleting it"
    rm -rf -- "$SHARED_DIR"
    log "hosts: shared pool $SHARED_DIR: removed"
  fi
  if netns_exists "$BRIDGE_NS"; then
    any=1
    local p
    for p in $(ip netns pids "$BRIDGE_NS" 2>/dev/null || true); do
      proc_running "$p" && kill_wait "$p" 5 proc_running "$p"
    done
    ip netns del "$BRIDGE_NS" || log "hosts: warning: 'ip netns del $BRIDGE_NS' failed"
    log "hosts: $BRIDGE_NS: removed"
  fi
  # Only empty dirs go; anything else in them is not ours.
  rmdir "$HOSTS_DIR" "$HOSTS_LIB_DIR" 2>/dev/null || true
  rmdir "$(dirname "$HOSTS_LIB_DIR")" 2>/dev/null || true
  [ $any -eq 1 ] || log "hosts: nothing was up"
}

# ---------------------------------------------------------------- HA --------
#
# What HA tests need on top of the hosts: the server in a namespace of its
# own on the bridge (agents inside their hosts' namespaces reach it there,
# and lose it when their link is cut), a pool directory that every host
# sees at the same path, and faults: a host losing every process at once,
# a host's link cut and restored.

# netns_live_pids NS NSID: the live processes in NS that live in the network
# namespace NSID (never the root one).
netns_live_pids() {
  local p
  [ -n "$2" ] && [ "$2" != "$ROOT_NETNS" ] || return 0
  for p in $(ip netns pids "$1" 2>/dev/null || true); do
    proc_running "$p" || continue
    [ "$(readlink "/proc/$p/ns/net" 2>/dev/null || true)" = "$2" ] || continue
    echo "$p"
  done
}

netns_empty() { [ -z "$(netns_live_pids "$1" "$2")" ]; }

ensure_server_ns() {
  if netns_exists "$SERVER_NS" && host_link_ok "$SERVER_NS" "$SERVER_IP"; then
    return 0
  fi
  log "hosts: creating server namespace $SERVER_NS ($SERVER_IP)"
  netns_exists "$SERVER_NS" || ip netns add "$SERVER_NS"
  create_link "$SERVER_NS" "$SERVER_IP"
}

cleanup_server_ns() {
  local nsid p
  nsid=$(netns_id "$SERVER_NS" || true)
  for p in $(netns_live_pids "$SERVER_NS" "$nsid"); do
    log "hosts: $SERVER_NS: stopping leftover pid $p ($(cat "/proc/$p/comm" 2>/dev/null || echo '?'))"
    kill_wait "$p" 5 proc_running "$p"
  done
  ip -n "$BRIDGE_NS" link del "$SERVER_NS" 2>/dev/null || true
  ip netns del "$SERVER_NS" || log "hosts: warning: 'ip netns del $SERVER_NS' failed"
}

# The shared pool: QEMU runs as libvirt-qemu, so every parent needs o+x and
# the directory itself belongs to libvirt-qemu.
ensure_shared_dir() {
  case $SHARED_DIR in
    /*/*) ;;
    *) die "NOVACRON_TESTBED_SHARED_DIR ($SHARED_DIR) must be an absolute path below /" ;;
  esac
  case $SHARED_DIR in
    *[!A-Za-z0-9/._-]*) die "NOVACRON_TESTBED_SHARED_DIR may only contain [A-Za-z0-9/._-]: $SHARED_DIR" ;;
  esac
  local d
  for d in /run/libvirt /var/lib/libvirt /etc/libvirt /var/log/libvirt /var/cache/libvirt; do
    case "$SHARED_DIR/" in "$d"/*) die "the shared pool cannot live under $d (each host bind-mounts its own)" ;; esac
  done
  mkdir -p "$(dirname "$SHARED_DIR")"
  d=$(dirname "$SHARED_DIR")
  while [ "$d" != / ]; do
    [ $((8#$(stat -c '%a' "$d") & 1)) -eq 1 ] ||
      die "the shared pool's parent $d lacks o+x (QEMU, as libvirt-qemu, could not reach the pool)"
    d=$(dirname "$d")
  done
  mkdir -p "$SHARED_DIR"
  chown libvirt-qemu:kvm "$SHARED_DIR" ||
    die "cannot chown $SHARED_DIR to libvirt-qemu:kvm (is libvirt installed?)"
  chmod 0775 "$SHARED_DIR"
}

# ha_host NAME: NAME is one of our hosts and exists; sets B and NSID.
ha_host() {
  local name=$1
  case $name in "$HOST_PREFIX"[0-9]*) ;; *) die "not a test-bed host: '$name' (expected ${HOST_PREFIX}N)" ;; esac
  B=$(host_base "$name")
  [ -d "$B" ] && netns_exists "$name" || die "host $name is not up (run: $0 hosts-up N)"
  NSID=$(cat "$B/netns" 2>/dev/null || true)
  [ -n "$NSID" ] && [ "$NSID" != "$ROOT_NETNS" ] && [ "$(netns_id "$name")" = "$NSID" ] ||
    die "host $name: its namespace id does not match $B/netns; refusing"
}

cmd_host_kill() {
  local name=${1:-}
  [ -n "$name" ] || { usage; die "host-kill: NAME missing"; }
  hosts_check_env host-kill
  ha_host "$name"
  local round p total=0
  # A dying process may have forked a child meanwhile: go round until
  # nothing is left.
  for round in 1 2 3 4 5; do
    for p in $(netns_live_pids "$name" "$NSID"); do
      log "host-kill: $name: kill -KILL $p ($(cat "/proc/$p/comm" 2>/dev/null || echo '?'))"
      kill -KILL "$p" 2>/dev/null || true
      total=$((total + 1))
    done
    wait_for 5 netns_empty "$name" "$NSID" && break
    log "host-kill: $name: round $round left processes behind; again"
  done
  netns_empty "$name" "$NSID" ||
    die "host-kill: $name still has processes: $(netns_live_pids "$name" "$NSID" | tr '\n' ' ')"
  log "host-kill: $name: $total processes killed; none left"
}

cmd_host_revive() {
  local name=${1:-}
  [ -n "$name" ] || { usage; die "host-revive: NAME missing"; }
  hosts_check_env host-revive
  for c in unshare libvirtd virtlogd virtlockd virsh; do need_cmd "$c"; done
  take_hosts_lock
  ha_host "$name"
  netns_empty "$name" "$NSID" ||
    die "host-revive: $name still has processes ($(netns_live_pids "$name" "$NSID" | tr '\n' ' ')); run host-kill first"
  # A reboot empties /run: sockets, pid files, QEMU status files.
  no_mounts_under "$B/run" || die "host-revive: something is mounted under $B/run"
  find "$B/run" -mindepth 1 -delete
  rm -f "$B/libvirtd.pid" "$B/virtlogd.pid" "$B/virtlockd.pid"
  log "host-revive: $name: starting its daemons again"
  start_host_daemons "$name"
  wait_host "$name"
  log "host-revive: $name: up"
}

# host-power NAME on|off|status: the host's power as a BMC would report and
# switch it (packaging/dev/fence-testbed wraps this with fence agent exit
# codes and faults): on = some process of the host runs.
cmd_host_power() {
  local name=${1:-} action=${2:-}
  [ -n "$name" ] || { usage; die "host-power: NAME missing"; }
  hosts_check_env host-power
  ha_host "$name"
  case $action in
    status)
      if netns_empty "$name" "$NSID"; then echo off; exit 2; fi
      echo on ;;
    off)
      if netns_empty "$name" "$NSID"; then log "host-power: $name: already off"; return 0; fi
      cmd_host_kill "$name" ;;
    on)
      if ! netns_empty "$name" "$NSID"; then log "host-power: $name: already on"; return 0; fi
      cmd_host_revive "$name" ;;
    *) usage; die "host-power: action must be on, off or status (got '$action')" ;;
  esac
}

cut_rules() {
  cat <<EOF
table inet $CUT_TABLE {
  chain in { type filter hook input priority -300; policy drop; iif "lo" accept; }
  chain out { type filter hook output priority -300; policy drop; oif "lo" accept; }
}
EOF
}

cmd_link_cut() {
  local name=${1:-} how=${2:-down}
  [ -n "$name" ] || { usage; die "link-cut: NAME missing"; }
  hosts_check_env link-cut
  ha_host "$name"
  case $how in
    down) ip -n "$name" link set veth0 down ;;
    drop)
      need_cmd nft
      ip netns exec "$name" nft list table inet "$CUT_TABLE" >/dev/null 2>&1 ||
        cut_rules | ip netns exec "$name" nft -f - ;;
    *) usage; die "link-cut: how must be 'down' or 'drop' (got '$how')" ;;
  esac
  log "link-cut: $name: cut ($how)"
}

cmd_link_restore() {
  local name=${1:-}
  [ -n "$name" ] || { usage; die "link-restore: NAME missing"; }
  hosts_check_env link-restore
  ha_host "$name"
  if command -v nft >/dev/null 2>&1 && ip netns exec "$name" nft list table inet "$CUT_TABLE" >/dev/null 2>&1; then
    ip netns exec "$name" nft delete table inet "$CUT_TABLE"
  fi
  ip -n "$name" link set veth0 up
  log "link-restore: $name: restored"
}

# -------------------------------------------------------------- guest -------

# The guest's /init (busybox sh). Marker lines go to the serial console.
guest_init() {
  cat <<'EOF'
#!/bin/sh
# NovaCron test guest init (built by packaging/dev/testbed.sh).
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
# Marker lines end in a bare "\n"; keep kernel chatter off the console.
stty -onlcr 2>/dev/null
echo 3 >/proc/sys/kernel/printk

while read -r m args; do
  [ -n "$m" ] || continue
  insmod "/lib/modules/$m.ko" $args 2>/dev/null || echo "novacron-guest: insmod $m failed"
done </lib/modules/load-order

cmdline=" $(cat /proc/cmdline) "

# Graceful shutdown: the ACPI power button (virsh shutdown --mode acpi)
# shows up as an input device named "Power Button"; any event on it
# powers the guest off.
poweroff_now() {
  echo NOVACRON-GUEST-POWEROFF
  sleep 1
  sync
  poweroff -f
}
buttons=0
for ev in /sys/class/input/event*; do
  [ -e "$ev/device/name" ] || continue
  [ "$(cat "$ev/device/name")" = "Power Button" ] || continue
  dev=/dev/input/${ev##*/}
  [ -c "$dev" ] || continue
  ( dd if="$dev" of=/dev/null bs=24 count=1 2>/dev/null; poweroff_now ) &
  buttons=$((buttons + 1))
done
[ "$buttons" -gt 0 ] || echo "NOVACRON-GUEST-WARNING no ACPI power button found"

# novacron.burn=N: N busy loops (one per vCPU to saturate) for metrics tests.
burn=0
case "$cmdline" in *" novacron.burn="*)
  burn=${cmdline##* novacron.burn=}; burn=${burn%% *}
  case "$burn" in ''|*[!0-9]*) burn=1 ;; esac ;;
esac
i=0
while [ "$i" -lt "$burn" ]; do
  ( while :; do :; done ) &
  i=$((i + 1))
done
[ "$burn" -eq 0 ] || echo "NOVACRON-GUEST-BURN $burn"

disks=""
for b in /sys/block/*; do
  n=${b##*/}
  case "$n" in loop*|ram*|zram*|dm-*|md*|nbd*) continue ;; esac
  [ -e "$b" ] && disks="$disks $n"
done
echo "NOVACRON-GUEST-DISKS$disks"

# novacron.stamp=1: every 100 ms a stamp on the first disk, the proof that
# no two copies of the guest ever ran at once (packaging/dev/README.md,
# "Stamps"). Slot i is the 512-byte sector STAMP_BASE + i; a stamp is one
# text line, zero-padded to the sector:
#   NCSTAMP1 boot=ID host=H epoch=E ctr=N up_ms=U wall_ms=W crc=C
# (ID the kernel's boot id, H and E the SMBIOS system serial and sku the
# agent sets to the host id and the VM's epoch, "unknown" if absent; N
# counts from 0 per boot; U the guest's uptime, W its wall clock; C the
# CRC-32 of everything before " crc=", so a torn write shows). A boot
# starts after the last used slot (the used slots are a prefix: found by
# bisection).
STAMP_BASE=8
stamp_field() {
  v=$(tr -cd 'A-Za-z0-9._:-' <"$1" 2>/dev/null | head -c 64)
  [ -n "$v" ] || v=unknown
  echo "$v"
}
stamp_used() {
  [ "$(dd if="$1" bs=512 skip=$((STAMP_BASE + $2)) count=1 iflag=direct 2>/dev/null | head -c 8)" = NCSTAMP1 ]
}
uptime_ms() {
  read -r up _ </proc/uptime
  cs=${up#*.}
  cs=${cs#0}
  up_ms=$((${up%.*} * 1000 + cs * 10))
}
stamper() {
  dev=/dev/$1
  boot=$(stamp_field /proc/sys/kernel/random/boot_id)
  host=$(stamp_field /sys/class/dmi/id/product_serial)
  epoch=$(stamp_field /sys/class/dmi/id/product_sku)
  sectors=$(cat "/sys/block/$1/size" 2>/dev/null || echo 0)
  slots=$((sectors - STAMP_BASE))
  if [ "$slots" -le 0 ]; then
    echo "NOVACRON-GUEST-STAMP-ERROR $1 has no room for stamps"
    return
  fi
  lo=0
  hi=$slots
  while [ "$lo" -lt "$hi" ]; do
    mid=$(((lo + hi) / 2))
    if stamp_used "$dev" "$mid"; then lo=$((mid + 1)); else hi=$mid; fi
  done
  slot=$lo
  t=$(adjtimex 2>/dev/null)
  s=${t##*tv_sec:}
  s=${s%%time.tv_usec*}
  us=${t##*tv_usec:}
  us=${us%%return*}
  s=$(echo "$s" | tr -cd 0-9)
  us=$(echo "$us" | tr -cd 0-9 | sed 's/^0*//')
  uptime_ms
  wall0=$((${s:-0} * 1000 + ${us:-0} / 1000 - up_ms))
  echo "NOVACRON-GUEST-STAMPS dev=$1 from=$slot boot=$boot host=$host epoch=$epoch"
  ctr=0
  next=$up_ms
  while [ "$slot" -lt "$slots" ]; do
    uptime_ms
    body="NCSTAMP1 boot=$boot host=$host epoch=$epoch ctr=$ctr up_ms=$up_ms wall_ms=$((wall0 + up_ms))"
    crc=$(printf '%s' "$body" | crc32)
    printf '%s crc=%s\n' "$body" "$crc" |
      dd of="$dev" bs=512 seek=$((STAMP_BASE + slot)) count=1 iflag=fullblock oflag=direct \
        conv=sync,notrunc,fsync 2>/dev/null ||
      echo "NOVACRON-GUEST-STAMP-ERROR write of slot $slot failed"
    slot=$((slot + 1))
    ctr=$((ctr + 1))
    next=$((next + 100))
    uptime_ms
    d=$((next - up_ms))
    if [ "$d" -gt 0 ]; then
      usleep $((d * 1000))
    elif [ "$d" -lt -1000 ]; then
      next=$up_ms
    fi
  done
  echo "NOVACRON-GUEST-STAMP-ERROR $1 is full after $slot slots"
}
case "$cmdline" in *" novacron.stamp=1 "*)
  first=${disks# }
  first=${first%% *}
  if [ -n "$first" ]; then
    stamper "$first" &
  else
    echo "NOVACRON-GUEST-STAMP-ERROR no disk to stamp"
  fi ;;
esac

echo NOVACRON-GUEST-BOOTED

# PID 1 must never exit.
while :; do sleep 3600; done
EOF
}

# module_path KROOT KVER NAME: path of NAME.ko (dash/underscore agnostic).
module_path() {
  local pat
  pat=$(printf '%s' "$3" | sed 's/[-_]/[-_]/g')
  find "$1/lib/modules/$2" -name "$pat.ko" -print -quit
}

module_builtin() {
  local pat
  pat=$(printf '%s' "$3" | sed 's/[-_]/[-_]/g')
  grep -q "/$pat\.ko\$" "$1/lib/modules/$2/modules.builtin" 2>/dev/null
}

# resolve_module KROOT KVER NAME: append NAME (after its deps) to ORDER.
resolve_module() {
  local kroot=$1 kver=$2 name=${3//-/_} f deps d
  case " ${ORDER[*]:-} ${SEEN[*]:-} " in *" $name "*) return 0 ;; esac
  SEEN+=("$name")
  if module_builtin "$kroot" "$kver" "$name"; then
    BUILTIN+=("$name")
    return 0
  fi
  f=$(module_path "$kroot" "$kver" "$name")
  if [ -z "$f" ]; then
    log "guest: module $name is neither built in nor shipped; skipped"
    return 0
  fi
  deps=$(tr '\0' '\n' <"$f" | sed -n 's/^depends=//p' | head -1 | tr ',' ' ')
  for d in $deps; do resolve_module "$kroot" "$kver" "$d"; done
  ORDER+=("$name")
  MODFILES+=("$f")
}

cmd_guest() {
  local dir=${1:-}
  [ -n "$dir" ] || { usage; die "guest: DIR missing"; }
  local bb=/bin/busybox
  [ -x "$bb" ] || die "guest: $bb missing (package busybox-static); run: $0 install"
  "$bb" --list | grep -x cpio >/dev/null || die "guest: $bb has no cpio applet"
  for c in apt-get apt-cache dpkg-deb gzip sha256sum; do need_cmd "$c"; done

  local stamp
  stamp="format=$GUEST_FORMAT script=$(sha256sum "$(self_path)" | cut -d' ' -f1)"
  if [ -s "$dir/vmlinuz" ] && [ -s "$dir/initrd.img" ] &&
     [ "$(cat "$dir/.novacron-guest-stamp" 2>/dev/null || true)" = "$stamp" ]; then
    log "guest: $dir is up to date (kernel $(cat "$dir/kernel-version" 2>/dev/null || echo '?'))"
    return 0
  fi

  local kpkg
  kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
         awk '/Depends: linux-image-[0-9].*-cloud-amd64$/{print $2; exit}' || true)
  if [ -z "$kpkg" ] && [ "$(id -u)" -eq 0 ]; then
    log "guest: apt lists lack linux-image-cloud-amd64; running apt-get update"
    apt-get update -qq </dev/null >&2 || die "apt-get update failed"
    kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
           awk '/Depends: linux-image-[0-9].*-cloud-amd64$/{print $2; exit}' || true)
  fi
  [ -n "$kpkg" ] || die "guest: cannot resolve linux-image-cloud-amd64 to a versioned package (apt-get update?)"

  local tmp
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/novacron-guest.XXXXXX")
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" EXIT
  chmod 755 "$tmp"
  log "guest: downloading $kpkg"
  (cd "$tmp" && apt-get download -q "$kpkg" </dev/null >&2 2>"$tmp/download.log") || {
    cat "$tmp/download.log" >&2; die "guest: apt-get download $kpkg failed"; }
  dpkg-deb -x "$tmp"/"$kpkg"_*.deb "$tmp/k" || die "guest: dpkg-deb -x failed"
  local kver
  kver=$(find "$tmp/k/lib/modules" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' 2>/dev/null | sort | head -1)
  if [ -z "$kver" ] || [ ! -s "$tmp/k/boot/vmlinuz-$kver" ]; then die "guest: no kernel image in $kpkg"; fi
  local cfg=$tmp/k/boot/config-$kver sym
  for sym in VIRTIO_PCI VIRTIO_BLK ACPI_BUTTON INPUT_EVDEV; do
    log "guest: kernel $kver: CONFIG_$sym=$(sed -n "s/^CONFIG_$sym=//p" "$cfg" 2>/dev/null | head -1)"
  done

  local root=$tmp/root
  mkdir -p "$root"/{bin,dev,proc,sys,tmp,root,etc,lib/modules}
  cp "$bb" "$root/bin/busybox"
  local a
  for a in $("$bb" --list); do
    [ "$a" = busybox ] || ln -s busybox "$root/bin/$a"
  done
  ln -s bin "$root/sbin"

  ORDER=() SEEN=() BUILTIN=() MODFILES=()
  local m
  for m in "${GUEST_MODULES[@]}"; do resolve_module "$tmp/k" "$kver" "$m"; done
  local i
  : >"$root/lib/modules/load-order"
  for i in "${!ORDER[@]}"; do
    cp "${MODFILES[$i]}" "$root/lib/modules/${ORDER[$i]}.ko"
    case ${ORDER[$i]} in
      scsi_mod) echo "scsi_mod scan=sync" ;; # disks exist once insmod returns
      *) echo "${ORDER[$i]}" ;;
    esac >>"$root/lib/modules/load-order"
  done
  log "guest: modules loaded by /init: ${ORDER[*]:-none}"
  [ ${#BUILTIN[@]} -eq 0 ] || log "guest: built in: ${BUILTIN[*]}"

  guest_init >"$root/init"
  chmod 755 "$root/init"
  if [ "$(id -u)" -eq 0 ]; then
    mknod -m 600 "$root/dev/console" c 5 1
    mknod -m 666 "$root/dev/null" c 1 3
  fi

  (cd "$root" && find . | LC_ALL=C sort | "$bb" cpio -o -H newc 2>/dev/null | gzip -9 >"$tmp/initrd.img") ||
    die "guest: building the initramfs failed"

  mkdir -p "$dir"
  chmod 755 "$dir"
  rm -f "$dir/.novacron-guest-stamp"
  install -m 644 "$tmp/k/boot/vmlinuz-$kver" "$dir/vmlinuz.new"
  install -m 644 "$tmp/initrd.img" "$dir/initrd.img.new"
  mv -f "$dir/vmlinuz.new" "$dir/vmlinuz"
  mv -f "$dir/initrd.img.new" "$dir/initrd.img"
  echo "$kver" >"$dir/kernel-version"
  echo "$stamp" >"$dir/.novacron-guest-stamp"
  log "guest: built $dir/vmlinuz ($kver) and $dir/initrd.img ($(du -k "$dir/initrd.img" | cut -f1) KiB)"
}

# ---------------------------------------------------------------- main ------

[ $# -ge 1 ] || { usage; exit 2; }
cmd=$1; shift
case $cmd in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  libvirtd-pid) cmd_libvirtd_pid ;;
  guest) cmd_guest "$@" ;;
  hosts-up) cmd_hosts_up "$@" ;;
  hosts-down) cmd_hosts_down ;;
  host-kill) cmd_host_kill "$@" ;;
  host-revive) cmd_host_revive "$@" ;;
  host-power) cmd_host_power "$@" ;;
  link-cut) cmd_link_cut "$@" ;;
  link-restore) cmd_link_restore "$@" ;;
  -h|--help|help) usage ;;
  *) usage; die "unknown subcommand '$cmd'" ;;
esac
