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
GUEST_FORMAT=1
# Modules the guest loads if the kernel has them as modules (=m). Their
# dependencies are added automatically; built-in ones (=y) are skipped.
GUEST_MODULES=(virtio_pci virtio_blk virtio_scsi virtio_net virtio_balloon sd_mod button evdev)

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
usage: $0 install | start | stop | libvirtd-pid | guest DIR
  install       install qemu-system-x86 (qemu-utils pinned to 1:7.2), libvirt-daemon-system,
                libvirt-clients, libvirt-dev, busybox-static, genisoimage if missing
  start         start virtlogd and libvirtd if not running (pids in $RUN_DIR),
                wait for $SOCK, warm up the QEMU probe, print "$URI"
  stop          stop the libvirtd and virtlogd that 'start' started (by pid)
  libvirtd-pid  print the pid of the running libvirtd
  guest DIR     build a tiny bootable guest: DIR/vmlinuz and DIR/initrd.img
EOF
}

# ---------------------------------------------------------------- install --

pkg_installed() {
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = installed ]
}

cmd_install() {
  need_root install
  local pkgs=(qemu-system-x86 libvirt-daemon-system libvirt-clients libvirt-dev busybox-static genisoimage)
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

read_pid() { [ -r "$1" ] && tr -dc '0-9' <"$1" || true; }

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
  virtlogd -d -p "$RUN_DIR/virtlogd.pid" </dev/null >&2 9>&- || die "virtlogd failed to start"
  wait_for 15 test -S "$LIBVIRT_RUN/virtlogd-sock" ||
    die "virtlogd did not create $LIBVIRT_RUN/virtlogd-sock within 15 s"
  log "start: virtlogd running (pid $(read_pid "$RUN_DIR/virtlogd.pid"))"
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
    libvirtd -d -p "$RUN_DIR/libvirtd.pid" </dev/null >&2 9>&- || die "libvirtd failed to start (see /var/log/libvirt/)"
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
  "$bb" --list | grep -qx cpio || die "guest: $bb has no cpio applet"
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
  kver=$(basename "$(ls -d "$tmp"/k/lib/modules/*/ | head -1)")
  [ -n "$kver" ] && [ -s "$tmp/k/boot/vmlinuz-$kver" ] || die "guest: no kernel image in $kpkg"
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
  -h|--help|help) usage ;;
  *) usage; die "unknown subcommand '$cmd'" ;;
esac
