# The two commands of the README: `make run` and `make test`.
# Each makes .venv and installs what it needs by itself.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TRIAL := $(PY) -m twisted.trial
TESTS ?= tests

.PHONY: run test venv proto bench bench-replicas bench-grpc-floor browser postgres clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	@# Twisted rebuilds its plugin cache on the next scan.
	rm -f twisted/plugins/dropin.cache
	touch $(STAMP)

venv: $(STAMP)

# Starts the server in the foreground. With neither OPENAI_API_KEY nor
# OPENAI_BASE_URL set, it answers with the built-in offline model.
run: $(STAMP)
	@if [ -z "$$OPENAI_API_KEY" ] && [ -z "$$OPENAI_BASE_URL" ]; then \
	  echo "make run: OPENAI_API_KEY and OPENAI_BASE_URL are unset: starting with the offline model (--offline)"; \
	  exec $(VENV)/bin/twistd -n --pidfile= easybackend --offline $(ARGS); \
	else \
	  exec $(VENV)/bin/twistd -n --pidfile= easybackend $(ARGS); \
	fi

# The tests also need a browser (the page's test) and PostgreSQL (the
# store's and the replicas' tests): installed or started when missing.
test: $(STAMP) browser postgres
	$(TRIAL) $(TESTS)

# The browser the page's end-to-end test drives (Debian's, no download).
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then \
	  echo "chromium and chromedriver are installed"; \
	else \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
	    || echo "make browser: could not install chromium (needs root and apt); the page test will fail"; \
	fi

# PostgreSQL on 127.0.0.1:5432 for the store's PostgreSQL tests.
postgres:
	@if pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then \
	  echo "PostgreSQL is up on 127.0.0.1:5432"; \
	elif ls /etc/postgresql >/dev/null 2>&1; then \
	  pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql | head -n1) main start; \
	else \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql && \
	   pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql | head -n1) main start) \
	    || echo "make postgres: could not start PostgreSQL; its tests will fail"; \
	fi

BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP) setup.cfg
	$(PY) -m pip install --quiet -e '.[test,bench]' --config-settings editable_mode=compat
	rm -f twisted/plugins/dropin.cache
	touch $(BENCH_STAMP)

# The benchmark (docs/benchmarks.md), about 13 min; ARGS=--quick for a
# 2-minute smoke check.
bench: $(BENCH_STAMP)
	$(PY) -m bench.run $(ARGS)

# One replica on SQLite against one and two on PostgreSQL
# (docs/benchmarks-replicas.md).
bench-replicas: $(BENCH_STAMP) postgres
	$(PY) -m bench.replicas $(ARGS)

# What grpcio's threaded server alone costs per streamed answer, beside the
# fake upstream (bench/analysis.md), about a minute.
bench-grpc-floor: $(BENCH_STAMP)
	$(PY) -m bench.grpc_floor $(ARGS)

proto: $(STAMP)
	$(PY) -m easybackend.proto.generate

clean:
	rm -rf $(VENV) _trial_temp build *.egg-info twisted/plugins/dropin.cache
