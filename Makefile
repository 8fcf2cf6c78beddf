# The two commands of the README, and the checks CI runs.
CARGO ?= cargo
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)

.PHONY: deps demo test lint fuzz

deps:
	@bash packaging/dev/deps.sh

## Runs a server and three agents on libvirt test-driver hosts until Ctrl-C.
demo: deps
	$(CARGO) build --release --locked --bins
	$(TARGET_DIR)/release/novacron-server demo $(DEMO_ARGS)

## Unit, property and end-to-end tests (the e2e tests start real processes).
test: deps
	$(CARGO) build --locked --workspace --bins
	$(CARGO) test --locked --workspace

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

fuzz:
	bash shared/fuzz/run.sh $(or $(FUZZ_SECONDS),30)
