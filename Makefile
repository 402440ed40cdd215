# graylane: `make demo` shows it routing in a real Envoy; `make test` is what CI runs (.ci/run).
# Nothing needs installing by hand: scripts/setup fetches what is missing (the wasm32-wasip1
# target, a pinned Envoy into .tools/) and is quiet when everything is there.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
WASM_TARGET := wasm32-wasip1
TARGET_DIR := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)
WASM := $(TARGET_DIR)/$(WASM_TARGET)/release/graylane_filter.wasm
# The nginx adapter's library (profile `nginx`: release, but unwinding; see Cargo.toml).
NGINX_LIB := $(TARGET_DIR)/nginx/libgraylane_nginx.so
# graylane's native nginx module, built against the installed nginx's source (scripts/nginx-module).
NGINX_MODULE := $(TARGET_DIR)/nginx/ngx_http_graylane_module.so
# make demo ROUTER=nginx: the same demo with nginx routing instead of Envoy.
ROUTER ?= envoy
# Property tests under wasm run in an interpreter-like JIT; fewer cases keep CI fast.
WASM_PROPTEST_CASES ?= 32
ENVOY_CONFIGS := $(sort $(wildcard envoy/*.yaml envoy/*/*.yaml))

# Each step prints one line, so a failing `make test` says where it stopped.
step = @printf '\n==> %s\n' "$(1)"

.NOTPARALLEL:

.PHONY: help setup build wasm nginx oci oci-check test lint fmt-check clippy unit wasm-test validate validate-manifests e2e demo bench clean props-long

help:
	@echo "make setup   install what is missing (wasm32-wasip1 target, pinned Envoy in .tools/)"
	@echo "make build   the filter (.wasm), the nginx library and module (.so) and the native crates"
	@echo "make oci     the filter as an OCI image layout for Istio (target/oci/graylane-filter)"
	@echo "make test    everything CI runs: fmt, clippy (native + wasm32), unit tests, strategy"
	@echo "             tests on wasm32, envoy --mode validate, the OCI layout, Kubernetes and"
	@echo "             Istio manifests against their schemas, end-to-end tests in a real Envoy"
	@echo "             and nginx"
	@echo "make demo    a real Envoy with graylane in front of two demo backends (Ctrl-C stops);"
	@echo "             make demo ROUTER=nginx: the same with nginx routing"
	@echo "make bench   throughput / latency / memory figures (see README)"
	@echo "make lint    fmt + clippy only"
	@echo "make clean   cargo clean (keeps .tools/)"

setup:
	@scripts/setup

# The filter exports only the callbacks it implements (filter/src/abi.rs): Envoy skips a
# callback the module does not export, instead of entering the VM for it on every request.
# `graylane-oci trim` stays as the guard (deploy/oci/src/trim.rs): it unexports any body,
# trailer or on_done callback a build would export (none, for this one).
wasm: setup
	$(call step,cargo build -p graylane-filter --target $(WASM_TARGET) --release)
	$(CARGO) build -p graylane-filter --target $(WASM_TARGET) --release
	$(CARGO) run -q -p graylane-oci -- trim "$(WASM)"

nginx: setup
	$(call step,cargo build -p graylane-nginx --profile nginx)
	$(CARGO) build -p graylane-nginx --profile nginx
	$(call step,the native nginx module (scripts/nginx-module))
	scripts/nginx-module "$(NGINX_MODULE)"

build: wasm nginx
	$(call step,cargo build --workspace)
	$(CARGO) build --workspace --all-targets

fmt-check:
	$(call step,cargo fmt --all --check)
	$(CARGO) fmt --all --check

clippy:
	$(call step,clippy native)
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(call step,clippy $(WASM_TARGET))
	$(CARGO) clippy -p graylane-strategy -p graylane-filter --target $(WASM_TARGET) -- -D warnings
	$(CARGO) clippy -p graylane-raw-filter --target $(WASM_TARGET) --all-features -- -D warnings

lint: setup fmt-check clippy

unit:
	$(call step,unit tests (native))
	GRAYLANE_NGINX_LIB="$(NGINX_LIB)" GRAYLANE_NGINX_MODULE="$(NGINX_MODULE)" $(CARGO) test --workspace --exclude graylane-e2e

# The strategy's tests compiled to wasm32-wasip1 and run under Node's WASI (scripts/wasm-runner.mjs).
wasm-test:
	$(call step,graylane-strategy tests on $(WASM_TARGET) (node:wasi))
	CARGO_TARGET_WASM32_WASIP1_RUNNER="$(CURDIR)/scripts/wasm-runner.mjs" \
	PROPTEST_CASES="$${PROPTEST_CASES:-$(WASM_PROPTEST_CASES)}" \
	  $(CARGO) test -p graylane-strategy --target $(WASM_TARGET) --tests

# Every config users copy must load in the real Envoy (the .wasm included: run from the root,
# where the configs' relative `target/wasm32-wasip1/release/graylane_filter.wasm` resolves).
validate:
	$(call step,envoy --mode validate on $(words $(ENVOY_CONFIGS)) config(s) under envoy/)
	@test -f "$(WASM)" || { echo "missing $(WASM): run make wasm" >&2; exit 1; }
	@envoy="$$(scripts/find-envoy)"; \
	for c in $(ENVOY_CONFIGS); do \
	  if out="$$("$$envoy" --mode validate -c "$$c" --log-level warn 2>&1)"; then \
	    echo "ok  $$c"; \
	  else \
	    echo "$$out" | grep -v '^\[[^]]*\]\[[^]]*\]\[info\]' >&2; echo "FAIL $$c" >&2; exit 1; \
	  fi; \
	done

# The filter as an OCI image layout in Istio's Wasm image format (docs/istio.md: pushing it).
oci: wasm
	$(call step,OCI image layout of the filter -> $(TARGET_DIR)/oci/graylane-filter)
	$(CARGO) run -q -p graylane-oci -- build --wasm "$(WASM)" --out "$(TARGET_DIR)/oci/graylane-filter"

oci-check: oci
	$(call step,OCI layout: as Istio reads it; reproducible; read by skopeo)
	@scripts/oci-check

# Every manifest under deploy/ and what graylane install / render istio print, against the
# Kubernetes and Istio schemas; the validators must reject known-bad documents.
validate-manifests:
	$(call step,manifests against the Kubernetes and Istio schemas)
	@scripts/validate-manifests

e2e:
	$(call step,end-to-end tests (real Envoy, real .wasm))
	envoy="$$(scripts/find-envoy)"; \
	ENVOY_BIN="$$envoy" GRAYLANE_WASM="$(WASM)" GRAYLANE_NGINX_LIB="$(NGINX_LIB)" \
	  GRAYLANE_NGINX_MODULE="$(NGINX_MODULE)" $(CARGO) test -p graylane-e2e --no-fail-fast
	$(call step,the nginx tests again through the Lua module (GRAYLANE_NGINX_VIA=lua))
	GRAYLANE_NGINX_VIA=lua GRAYLANE_NGINX_LIB="$(NGINX_LIB)" GRAYLANE_NGINX_MODULE="$(NGINX_MODULE)" \
	  $(CARGO) test -p graylane-e2e --no-fail-fast --test nginx_routing --test nginx_live
	GRAYLANE_NGINX_VIA=lua GRAYLANE_NGINX_LIB="$(NGINX_LIB)" GRAYLANE_NGINX_MODULE="$(NGINX_MODULE)" \
	  $(CARGO) test -p graylane-e2e --no-fail-fast --test discovery -- nginx::

# In make test, the steps after `unit` use the graylane binary its `cargo test` built (a
# `cargo build` of it would compile the control plane again with another feature set).
test: export GRAYLANE_BIN = $(TARGET_DIR)/debug/graylane
test: setup fmt-check clippy wasm nginx unit wasm-test validate oci-check validate-manifests e2e
	@printf '\n==> make test: all passed\n'

# The property tests of every parser at 1,000,000 cases each (README, Testing): a long run.
props-long:
	PROPTEST_CASES=1000000 $(CARGO) test --release -p graylane-strategy --test props
	PROPTEST_CASES=1000000 $(CARGO) test --release -p graylane-filter --test config
	PROPTEST_CASES=1000000 $(CARGO) test --release -p graylane-control-plane --test props

demo: setup
	@ROUTER="$(ROUTER)" scripts/demo

bench: setup
	@scripts/bench

clean:
	$(CARGO) clean
	rm -rf .demo
