# ecluster: `make demo` to see it work, `make test` to check it.
# The set-up is incremental: the venv is made once, `pip install -e` reruns only when
# pyproject.toml changes, and system packages are installed only when missing (as root).

SHELL      := /bin/bash
VENV       := .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.ecluster-installed
PYTEST     := $(VENV)/bin/pytest -q -p no:cacheprovider --durations=25
# tool:package; chromium drives the console tests, spin checks the protocol model, postfix and
# swaks are the real MTA and SMTP client of the Postfix plug-in's tests
SYS_TOOLS  := ip:iproute2 chromium:chromium spin:spin gcc:gcc postfix:postfix swaks:swaks \
              systemd-analyze:systemd
BENCH_TOOLS := ip:iproute2 keepalived:keepalived arping:arping corosync:corosync pacemakerd:pacemaker ocf-tester:resource-agents

PHONY_EXTRA := benchdeps _install
.PHONY: all setup sysdeps $(PHONY_EXTRA) test demo cli-docs bench scale soak chaos clean distclean

all: test

$(PY):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml plugins/ecluster_smtp/pyproject.toml plugins/ecluster_postfix/pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q -e plugins/ecluster_smtp
	$(PY) -m pip install -q -e plugins/ecluster_postfix
	touch $@

# tool:package pairs; apt-get only for what is missing, and only as root
sysdeps:
	@$(MAKE) --no-print-directory _install TOOLS="$(SYS_TOOLS)"

benchdeps:
	@$(MAKE) --no-print-directory _install TOOLS="$(BENCH_TOOLS)"

_install:
	@missing=""; \
	for pair in $(TOOLS); do \
	  tool=$${pair%%:*}; pkg=$${pair#*:}; \
	  command -v $$tool >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing:$$missing"; \
	    case " $$missing " in *" postfix "*) \
	      echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections 2>/dev/null;; \
	    esac; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) \
	      || echo "warning: could not install$$missing: tests that need them will skip"; \
	  else \
	    echo "note: missing$$missing (not root): tests that need them will skip"; \
	  fi; \
	fi

setup: sysdeps $(STAMP)

test: setup
	$(PYTEST) -m "not soak"

# e.g. make demo DEMO_ARGS="--duration 120" (or --loopback)
demo: setup
	$(VENV)/bin/ecluster demo $(DEMO_ARGS)

cli-docs: setup
	$(PY) tools/gen_cli_docs.py

bench: setup benchdeps
	@for b in bench/*.py; do case $$b in */soak.py|*/scale.py) continue;; esac; echo "== $$b"; $(PY) $$b || exit 1; done

# idle cost by cluster size (3, 5, 7, 9 members) and its model to 32 and 64 members (root),
# e.g. make scale SCALE_ARGS="--quick" or SCALE_ARGS="--sizes 2+1,4+1 --window 10 --rounds 2"
scale: setup benchdeps
	$(PY) bench/scale.py $(SCALE_ARGS)

# 10 minutes per preset with both cores busy: false failovers and memory growth
soak: setup
	$(PY) bench/soak.py --minutes 10 --preset lan --preset fast

# Jepsen-style chaos run (root): kills, partitions, netem, a full journal disk, clock steps, under
# load; a random seed, printed first (replay: python -m tests.chaos.runner --seed N --duration S).
# Then the exhaustive Spin check of the protocol model. e.g. make chaos CHAOS_ARGS="--seed 7 --duration 600"
CHAOS_ARGS ?= --duration 300
chaos: setup
	$(PY) -m tests.chaos.runner $(CHAOS_ARGS)
	bash tools/check_model.sh

clean:
	rm -rf .pytest_cache .hypothesis build artifacts demo *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -print0 | xargs -0 rm -rf

distclean: clean
	rm -rf $(VENV)
