# testbed: the two set-up commands.
#   make up     install what a fresh Debian machine lacks, build testbed, bring up the quickstart
#   make test   run the whole test suite (unit, integration, end-to-end on real VMs)
# Run as root or as an ordinary user: sudo is used only for the package
# install. Image builds run as the invoking user (mmdebstrap's unshare mode
# when it is not root) into that user's cache.

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
TESTBED := target/release/testbed

.PHONY: deps build up lint test bench clean

# qemu-utils is pinned to qemu-system-x86's version: some machines ship a
# newer qemu-utils that the distribution's qemu-system-x86 conflicts with.
# libvirt-dev and pkg-config build the libvirt provider (cargo feature
# `libvirt`, on by default); libvirt-daemon-system and dnsmasq-base let the
# tests start a libvirtd of their own. syslinux, mtools, dosfstools and
# fdisk make the bootable disks (`image build --disk`, provider
# virtualbox); python3 runs the tests' fake VBoxManage; ruby evaluates
# Vagrantfiles (`testbed import`); ansible-core runs Ansible provisioners.
deps:
	$(SUDO) apt-get update -qq
	QEMU_VERSION=$$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $$2}'); \
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends --allow-downgrades \
		qemu-system-x86 "qemu-utils=$$QEMU_VERSION" mmdebstrap e2fsprogs genext2fs uidmap openssh-client openssh-server \
		ca-certificates pkg-config libvirt-dev libvirt-daemon-system libvirt-clients dnsmasq-base \
		syslinux syslinux-common mtools dosfstools fdisk python3 ruby ansible-core

build:
	cargo build --release

up: deps build
	$(TESTBED) up topologies/quickstart.toml
	$(TESTBED) ssh -f topologies/quickstart.toml zk -- hostname

# What CI checks besides the tests: formatting and clippy's lints.
lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

# The base image is built first, once, so that the tests booting it in
# parallel do not each wait on its lock. Run as root, the new user's test
# (tests/zookeeper_qemu.rs, tests/lifecycle_libvirt.rs) run testbed as an
# ordinary user: TEST_USER, made here when missing (useradd gives it
# subordinate ids once /etc/subuid and /etc/subgid exist), in the group
# `libvirt` (Debian's libvirt-daemon-system makes it) that may use libvirtd.
TEST_USER := $(or $(TESTBED_TEST_USER),testbed-ci)
test:
	@if [ "$$(id -u)" = 0 ]; then \
		touch /etc/subuid /etc/subgid; \
		id $(TEST_USER) >/dev/null 2>&1 || useradd --create-home $(TEST_USER); \
		grep -q "^$(TEST_USER):" /etc/subuid 2>/dev/null || \
			usermod --add-subuids 100000-165535 --add-subgids 100000-165535 $(TEST_USER); \
		usermod --append --groups libvirt $(TEST_USER); \
	fi
	cargo build
	target/debug/testbed image build debian-12
	TESTBED_TEST_USER=$(TEST_USER) cargo test

bench: build
	cargo run --release --example bench

clean:
	cargo clean
