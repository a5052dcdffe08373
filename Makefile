# The two commands of the README: `make run` and `make test`.
# Each makes .venv and installs what it needs by itself.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TRIAL := $(PY) -m twisted.trial
TESTS ?= tests

.PHONY: run test venv proto bench clean

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

test: $(STAMP)
	$(TRIAL) $(TESTS)

proto: $(STAMP)
	$(PY) -m easybackend.proto.generate

clean:
	rm -rf $(VENV) _trial_temp build *.egg-info twisted/plugins/dropin.cache
