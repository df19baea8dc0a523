# testbed: the two set-up commands.
#   make up     install what a fresh Debian machine lacks, build testbed, bring up the quickstart
#   make test   run the whole test suite (unit, integration, end-to-end on real VMs)
# Run as root, or with sudo available for the package install.

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
TESTBED := target/release/testbed
# Image builds need root (mmdebstrap --mode=root); they go to the invoking
# user's cache, from which VMs then boot without root.
CACHE := $(or $(TESTBED_CACHE),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/testbed)
BUILD_IMAGE = $(SUDO) env TESTBED_CACHE=$(CACHE) $(1) image build debian-12

.PHONY: deps build up lint test bench clean

# qemu-utils is pinned to qemu-system-x86's version: some machines ship a
# newer qemu-utils that the distribution's qemu-system-x86 conflicts with.
# libvirt-dev and pkg-config build the libvirt provider (cargo feature
# `libvirt`, on by default); libvirt-daemon-system and dnsmasq-base let the
# tests start a libvirtd of their own.
deps:
	$(SUDO) apt-get update -qq
	QEMU_VERSION=$$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $$2}'); \
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends --allow-downgrades \
		qemu-system-x86 "qemu-utils=$$QEMU_VERSION" mmdebstrap e2fsprogs openssh-client openssh-server \
		ca-certificates pkg-config libvirt-dev libvirt-daemon-system libvirt-clients dnsmasq-base

build:
	cargo build --release

up: deps build
	$(call BUILD_IMAGE,$(TESTBED))
	$(TESTBED) up topologies/quickstart.toml
	$(TESTBED) ssh -f topologies/quickstart.toml zk -- hostname

# What CI checks besides the tests: formatting and clippy's lints.
lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

test:
	cargo build
	$(call BUILD_IMAGE,target/debug/testbed)
	cargo test

bench: build
	cargo run --release --example bench

clean:
	cargo clean
