# splitrelay: `make test` and `make demo` do all set-up on a fresh Debian 12 machine.
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
ARGS ?=

.PHONY: history setup lint test test-fast demo bench bench-peers bench-setup bench-density bench-ttfa bench-report lab-up lab-down clean vm-test vm-box \
	image image-test

setup:
	@bash scripts/setup.sh

# The code's own checks: ruff (pyproject [tool.ruff]) and the import-linter
# contracts that keep the arrows one way (pyproject [tool.importlinter]).
lint: setup
	$(VENV)/bin/ruff check .
	cd $(CURDIR) && $(VENV)/bin/lint-imports

# The whole suite, as root: nothing may be skipped (tests/conftest.py).
test: setup lint history
	SPLITRELAY_FORBID_SKIPS=1 $(PY) -m pytest -ra $(PYTEST_ARGS)

# The upgrade tests run a previous release taken from git history: a shallow
# clone fetches the rest (or says why it cannot).
history:
	@if [ "$$(git rev-parse --is-shallow-repository 2>/dev/null)" = true ]; then \
		echo "history: shallow clone; fetching the history the upgrade tests need"; \
		git fetch --quiet --unshallow || echo "history: cannot fetch it; tests/netns/test_upgrade.py and tests/bpf/test_takeover.py will fail"; \
	fi

# The unit layer (tests/unit) as any user, once `make setup` has run as root:
# no root, no network, under a minute. For editing; `make test` before a push.
test-fast:
	@[ -x $(PY) ] || { echo "test-fast: no environment in $(VENV): run 'sudo make setup' once"; exit 1; }
	$(PY) -m pytest -q -p no:cacheprovider tests/unit $(PYTEST_ARGS)

demo: setup
	$(PY) -m cli.relayctl demo

bench: setup
	$(PY) -m tests.bench.bench_xdp

# splitrelay against netfilter, coturn, rtpengine and the Python slow path in
# one run (docs/benchmarks.md); ARGS=--json for JSON, ARGS=--quick for ~1 min.
# Set-up and progress go to stderr: stdout holds only the table or the JSON.
bench-peers:
	@bash scripts/setup.sh >&2
	@$(PY) -m tests.bench.bench_peers $(ARGS)

# Set-up rate (legs/s from a client's check to a flow in the kernel) and
# transceiver density (concurrent echo calls per core); ARGS as above.
bench-setup:
	@bash scripts/setup.sh >&2
	@$(PY) -m tests.bench.bench_setup $(ARGS)

bench-density:
	@bash scripts/setup.sh >&2
	@$(PY) -m tests.bench.loopback_density $(ARGS)

# Time to first audio (offer POST to the first echoed frame), aiortc and
# Chromium, by phase; ARGS=--save docs/bench-ttfa.json for the committed result.
bench-ttfa:
	@bash scripts/setup.sh >&2
	@$(PY) -m tests.bench.bench_ttfa $(ARGS)

# The "current figures" of docs/benchmarks.md from docs/bench-*.json (no root,
# nothing run): after committing a benchmark's new result, run this and commit both.
bench-report:
	@[ -x $(PY) ] || { echo "bench-report: no environment in $(VENV): run 'sudo make setup' once"; exit 1; }
	@$(PY) -m tests.bench.report

# The suite in a Debian 12 VM on its stock 6.1 kernel (not part of `make test`):
# box built locally if missing, vagrant up (libvirt; TCG where KVM cannot run
# guests), make test inside, vagrant destroy. See docs/vm.md.
vm-test:
	@bash vagrant/vm-test.sh

vm-box:
	@bash vagrant/build-box.sh

# The OCI image deploy/ runs, localhost/splitrelay:<version>: buildah from a
# debootstrapped Debian 12 rootfs (cached in /var/cache/splitrelay/image), no
# registry. scripts/image-build.sh says what it holds.
image: setup
	@bash scripts/image-build.sh

# The image under podman in a lab: relayd and the transceivers in containers,
# a real call through them (tests/netns/test_image.py; it rebuilds the image).
image-test: setup
	$(PY) -m pytest -ra tests/netns/test_image.py $(PYTEST_ARGS)

lab-up: setup
	$(PY) -m cli.relayctl lab up

lab-down: setup
	$(PY) -m cli.relayctl lab down

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
