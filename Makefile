# sami-xdp: one-command set-up, tests and demo on Debian 12, run as root.
#
#   sudo make demo    set up everything, then run the demo
#   sudo make test    set up everything, then run the test suite
#   make setup        Debian packages, kernel headers for bcc, .venv (idempotent, fast rerun)
#   make lint         ruff, mypy, the import layers
#   make mutate       break security rules one at a time; every break must fail a test
#   make bench        bench/run_all.sh, once it exists
#   make install      the samixdp command, systemd units, an example config (PREFIX, DESTDIR)
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
# every recipe runs as one bash script (with -e and pipefail)
.ONESHELL:

SYS_PYTHON := /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.samixdp-installed
KREL := $(shell uname -r)
KDIR := /lib/modules/$(KREL)
APT_PACKAGES := python3-bpfcc bpfcc-tools linux-headers-amd64 iproute2 python3-venv \
	python3-dev ethtool hping3 nftables conntrack tcpdump iperf3 bpftool systemd
PYTEST_ARGS ?=
DEMO_ARGS ?=
MUTATE_ARGS ?= -j 2

.PHONY: help setup apt-packages kernel-headers venv test mutate demo demo-core bench lint clean \
	distclean install

# `make install`: a venv of its own under $(PREFIX)/lib/samixdp (the Debian python with
# system site-packages, for bcc), `samixdp` in $(PREFIX)/bin, the systemd units, the
# libvirt hook and the docs; /etc/samixdp/samixdp.toml only when there is none yet
# (else samixdp.toml.example beside it). DESTDIR stages the files (the venv then
# works only once moved to PREFIX).
PREFIX ?= /usr/local
SYSCONFDIR ?= /etc
DESTDIR ?=
INSTALL_VENV = $(PREFIX)/lib/samixdp
UNITDIR = $(PREFIX)/lib/systemd/system
DOCDIR = $(PREFIX)/share/doc/samixdp

help:
	@echo "targets: setup test mutate demo bench lint install clean distclean   (test/demo/setup need root)"

setup: apt-packages kernel-headers venv

# Installs only when a package is missing, so reruns do not touch apt.
apt-packages:
	@missing=""
	for p in $(APT_PACKAGES); do
		status=$$(dpkg-query -W -f='$${db:Status-Status}' "$$p" 2>/dev/null || true)
		[[ $$status == installed ]] || missing="$$missing $$p"
	done
	if [[ -z $$missing ]]; then echo "setup: Debian packages present"; exit 0; fi
	if [[ $$(id -u) != 0 ]]; then
		echo "setup: missing Debian packages:$$missing; run as root: sudo make setup" >&2
		exit 1
	fi
	echo "setup: installing Debian packages:$$missing"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q
	apt-get install -y -q --no-install-recommends $(APT_PACKAGES)

# bcc compiles against /lib/modules/$(uname -r)/{build,source}. When the running kernel
# has no headers package (custom or newer kernels), point them at the newest installed
# Debian headers: build -> linux-headers-<ver>-amd64, source -> its -common sibling.
# Existing entries are never replaced (a dangling symlink counts as missing).
kernel-headers: apt-packages
	@build=$$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null \
		| grep -E '/linux-headers-[0-9][0-9.]*-[0-9]+-amd64$$' | sort -V | tail -n1 || true)
	common=$${build%-amd64}-common
	for kind in build source; do
		link=$(KDIR)/$$kind
		if [[ -e $$link ]]; then echo "setup: kernel headers: $$link present"; continue; fi
		if [[ -z $$build ]]; then
			echo "setup: no /usr/src/linux-headers-*-amd64 to link $$link to" >&2; exit 1
		fi
		if [[ $$(id -u) != 0 ]]; then
			echo "setup: $$link is missing; run as root: sudo make setup" >&2; exit 1
		fi
		target=$$build
		if [[ $$kind == source && -d $$common ]]; then target=$$common; fi
		mkdir -p $(KDIR)
		why="kernel $(KREL) has no headers of its own"
		if [[ -L $$link ]]; then rm -f "$$link"; why="$$link was a dangling symlink"; fi
		ln -s "$$target" "$$link"
		echo "setup: $$why: linked $$link -> $$target"
	done

venv: $(STAMP)

# A venv of the Debian python with system site-packages (bcc comes from python3-bpfcc);
# rebuilt when it is not one, reinstalled when pyproject.toml changes.
$(STAMP): pyproject.toml | apt-packages
	@if [[ -x $(PY) ]] && grep -qx 'home = /usr/bin' $(VENV)/pyvenv.cfg \
		&& grep -qx 'include-system-site-packages = true' $(VENV)/pyvenv.cfg \
		&& $(PY) -c 'import bcc' 2>/dev/null; then
		echo "setup: reusing $(VENV)"
	else
		echo "setup: creating $(VENV) from $(SYS_PYTHON) with system site-packages"
		rm -rf $(VENV)
		$(SYS_PYTHON) -m venv --system-site-packages $(VENV)
	fi
	echo "setup: pip install -e '.[test,dev]'"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,dev]'
	$(PY) -c 'import bcc, sami_xdp.cli' || { echo "setup: the venv cannot import bcc/sami_xdp" >&2; exit 1; }
	touch $@

test: setup
	@for s in scripts/*.sh; do bash -n "$$s"; done
	echo "+ $(PY) -m pytest -q $(PYTEST_ARGS) tests"
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# tests/mutations.toml, each break applied to a temporary copy (see scripts/mutate.py)
mutate: setup
	$(PY) scripts/mutate.py $(MUTATE_ARGS)

demo: setup
	$(PY) scripts/demo_migrate.py $(DEMO_ARGS)

demo-core: setup
	bash scripts/demo_core.sh

bench: setup
	@if [[ -f bench/run_all.sh ]]; then bash bench/run_all.sh; \
	else echo "bench: bench/run_all.sh does not exist yet"; fi

lint: venv
	$(PY) -m ruff check sami_xdp testbed bench scripts/mutate.py
	$(PY) -m mypy sami_xdp
	$(VENV)/bin/lint-imports
	$(PY) scripts/mutate.py --list > /dev/null  # every mutation's anchor still in its file

install: apt-packages kernel-headers
	@d=$(DESTDIR)
	echo "install: $(PREFIX) (venv $(INSTALL_VENV)), config $(SYSCONFDIR)/samixdp$${d:+, staged in $$d}"
	[[ -x $$d$(INSTALL_VENV)/bin/python ]] || $(SYS_PYTHON) -m venv --system-site-packages $$d$(INSTALL_VENV)
	$$d$(INSTALL_VENV)/bin/python -m pip install -q --disable-pip-version-check .
	install -d $$d$(PREFIX)/bin $$d$(UNITDIR) $$d$(DOCDIR) $$d$(PREFIX)/share/samixdp/libvirt
	ln -sfn $(INSTALL_VENV)/bin/samixdp $$d$(PREFIX)/bin/samixdp
	for u in contrib/systemd/*.service; do
		sed -e 's|@BINDIR@|$(PREFIX)/bin|g' -e 's|@SYSCONFDIR@|$(SYSCONFDIR)|g' \
			-e 's|@DOCDIR@|$(DOCDIR)|g' "$$u" > $$d$(UNITDIR)/$$(basename "$$u")
		chmod 0644 $$d$(UNITDIR)/$$(basename "$$u")
	done
	install -m 0755 contrib/libvirt/qemu $$d$(PREFIX)/share/samixdp/libvirt/qemu
	install -m 0644 README.md $$d$(DOCDIR)/README.md
	install -d -m 0700 $$d$(SYSCONFDIR)/samixdp
	for f in samixdp.toml acl.yaml; do
		if [[ -e $$d$(SYSCONFDIR)/samixdp/$$f ]]; then
			install -m 0600 contrib/$$f $$d$(SYSCONFDIR)/samixdp/$$f.example
			echo "install: kept $(SYSCONFDIR)/samixdp/$$f (the new one is $$f.example)"
		else
			install -m 0600 contrib/$$f $$d$(SYSCONFDIR)/samixdp/$$f
		fi
	done
	if [[ -z $$d && -d /run/systemd/system ]]; then systemctl daemon-reload; fi
	echo "install: done; edit $(SYSCONFDIR)/samixdp/samixdp.toml, then: samixdp apply --check;" \
		"systemctl enable --now samixdp-apply samixdp-agent"

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) *.egg-info
