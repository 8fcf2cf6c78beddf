# The two commands of the README, and the checks CI runs.
CARGO ?= cargo
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)

.PHONY: deps testbed demo bench-ha bench-burst test lint fuzz sim

GUEST_DIR ?= /var/tmp/novacron-guest

deps:
	@bash packaging/dev/deps.sh

## Real libvirtd + QEMU and a tiny guest for the real-hypervisor tests (root).
testbed:
	@bash packaging/dev/testbed.sh install
	@bash packaging/dev/testbed.sh start >/dev/null
	@bash packaging/dev/testbed.sh guest $(GUEST_DIR)

## Runs a server and three agents on libvirt test-driver hosts until Ctrl-C.
demo: deps
	$(CARGO) build --release --locked --bins
	$(TARGET_DIR)/release/novacron-server demo $(DEMO_ARGS)

## HA failover figures on the real test bed (root): host loss -> the HA
## guest running on another host, 20 trials per guard (lease wait, hardware
## hook, disk lock), median and p99 per phase; then a 60 s server outage
## (guests stopped, stamp pauses).
bench-ha: deps testbed
	$(CARGO) build --release --locked -p novacron-server -p novacron-agent -p novacron-bench --bins
	for g in lease hook lock; do \
	  $(TARGET_DIR)/release/ha-failover --guest-dir $(GUEST_DIR) --guard $$g $(BENCH_HA_ARGS) || exit 1; \
	done
	$(TARGET_DIR)/release/ha-failover --guest-dir $(GUEST_DIR) --outage 60s

## Cloud-burst figures against moto (a local EC2 emulator; installed into a
## venv the first time, from PyPI): N burstable VMs (default 50) on a fleet
## with no hosts, create -> decided -> RunInstances -> running in the API,
## median and p99, and launches per second; BENCH_BURST_ARGS="--vms 200" or
## "--proxy-throttle 5" (about every 5th RunInstances throttled).
bench-burst: deps
	$(CARGO) build --release --locked -p novacron-bench --bin burst
	$(TARGET_DIR)/release/burst $(BENCH_BURST_ARGS)

## Unit, property and end-to-end tests (the e2e tests start real processes,
## and drive a real libvirtd with QEMU guests: run as root).
test: deps testbed
	$(CARGO) build --locked --workspace --bins
	NOVACRON_GUEST_DIR=$(GUEST_DIR) $(CARGO) test --locked --workspace

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

fuzz:
	bash shared/fuzz/run.sh $(or $(FUZZ_SECONDS),30)

## The deterministic HA simulation over many seeds (no root, no libvirt).
sim:
	$(CARGO) run --locked --release -p novacron-sim --bin ha-sim -- --seeds $(or $(SEEDS),100000)
