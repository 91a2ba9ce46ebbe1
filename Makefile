# piku.py — everything a fresh Debian 12 / Ubuntu 22.04+ machine needs, and the two jobs.
#   make demo   push an example app into a throwaway PIKU_ROOT and show its answer
#   make test   the whole test suite (unit + real git/uWSGI/sshd integration)
#   make bench  deploy timings of the uv buildpack (docs/PERFORMANCE.md)

PYTHON ?= /usr/bin/python3
VENV   ?= .venv
# Debian packages piku and its tests use; Dockerfile.test installs them through `make deps` too.
APT_PACKAGES = git uwsgi uwsgi-plugin-python3 iproute2 openssh-server openssh-client \
               python3 python3-venv python3-pip python3-click python3-dotenv python3-psutil python3-watchdog \
               nginx openssl pebble lego python3-cryptography bubblewrap patchelf nodejs g++ make \
               skopeo umoci podman runc docker-registry
PIP_PACKAGES = pytest uv poetry poetry-plugin-export pipenv

.PHONY: deps test demo bench clean

deps: $(VENV)/.deps-done

$(VENV)/.deps-done: Makefile
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "Missing Debian packages:$$missing — run 'make deps' as root (or apt-get install them)"; exit 1; fi; \
	  echo "Installing Debian packages:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@# npm: Debian's package, unless the nodejs installed brings its own (NodeSource's does, and conflicts with it)
	@command -v npm >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm; }
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check $(PIP_PACKAGES)
	@touch $@

test: deps
	$(VENV)/bin/python -m pytest -q -rs tests

demo: deps
	PYTHON=$(PYTHON) ./tools/demo.sh

bench: deps
	BENCH_RUNS=$${BENCH_RUNS:-7} $(PYTHON) bench/deploy_bench.py

clean:
	rm -rf $(VENV) .pytest_cache tests/__pycache__ __pycache__
