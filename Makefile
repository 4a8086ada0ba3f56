# The one entry point for set-up, demo and tests (the docs, CI and developers use these targets).
VENV := .venv
PY := $(VENV)/bin/python
VMISO := $(VENV)/bin/vmiso
PYTEST := $(VENV)/bin/pytest

.PHONY: setup demo test test-unit test-system lint bench micro clean agent agent-stop

setup:
	@bash scripts/setup.sh

micro: setup
	$(VMISO) image build-micro

demo: micro
	$(VMISO) doctor
	$(VMISO) run -- sh -c 'echo "hello from $$(uname -n), kernel $$(uname -r)"; echo "this line went to stderr" >&2; exit 3'; \
	  echo "vmiso run exited with $$? (the task's own exit code)"

# The agent (docs/operations.md, "The agent"): systemctl where systemd runs, by hand (scripts/agent.sh) here.
agent: micro
	bash scripts/agent.sh start

agent-stop:
	bash scripts/agent.sh stop

lint: setup
	$(VENV)/bin/ruff check vmiso tests benchmarks
	$(VENV)/bin/mypy  # the public API's modules (mypy.ini)

test-unit: setup
	$(PYTEST) -q -m "not system" tests
	VMISO_NO_EXTENSIONS=1 $(PYTEST) -q -m "not system" tests

test-system: micro
	$(PYTEST) -q -m system tests

test: lint test-unit test-system

bench: micro
	$(PYTEST) -q benchmarks --benchmark-only

clean:
	rm -rf build $(VENV) vmiso/_fast/*.c vmiso/_fast/*.so *.egg-info
