# The one entry point for set-up, demo and tests (the docs, CI and developers use these targets).
VENV := .venv
PY := $(VENV)/bin/python
VMISO := $(VENV)/bin/vmiso
PYTEST := $(VENV)/bin/pytest

.PHONY: setup demo test test-unit test-unit-user test-system lint bench micro clean agent agent-stop

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

# The same unit tier as an ordinary user (vmiso-unit) with libvirtd out of reach, both variants, in a
# copy of the working tree and a venv from Debian's /usr/bin/python3 (/opt/vmiso-unit): proves it
# needs neither root nor a daemon (tests needing root skip, saying why). scripts/unit-as-user.sh.
test-unit-user: setup
	bash scripts/unit-as-user.sh

test-system: micro
	$(PYTEST) -q -m system tests

test: lint test-unit test-unit-user test-system

bench: micro
	$(PYTEST) -q benchmarks --benchmark-only

clean:
	rm -rf build $(VENV) vmiso/_fast/*.c vmiso/_fast/*.so *.egg-info
