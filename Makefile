# The two set-up commands of the README. Each installs what it needs first, so both work on a
# fresh machine. torch goes in first as the CPU build (on a GPU cluster install the CUDA build of
# torch instead, e.g. from the pytorch.org index for your CUDA version, then run the same targets).
PYTHON ?= python
TORCH ?= torch==2.13.0

.PHONY: install install-dev quickstart test lint slurm-deps

install:
	$(PYTHON) -m pip install $(TORCH)
	$(PYTHON) -m pip install -e .

install-dev:
	$(PYTHON) -m pip install $(TORCH)
	$(PYTHON) -m pip install -e ".[dev]"

quickstart: install
	$(PYTHON) -m pretrain.launch --config configs/quickstart.yaml

lint:
	$(PYTHON) -m ruff check .
	lint-imports --no-logo

test: install-dev lint
	$(PYTHON) -m pytest

# Debian's Slurm and munge for the slurm-marked tests (single- and two-node clusters the tests start by hand;
# iproute2's `ip` makes the two nodes' network namespaces); without apt-get or root this says so and the
# tests skip with that reason.
SLURM_PACKAGES = slurmctld slurmd slurm-client munge iproute2
slurm-deps:
	@if command -v sbatch >/dev/null 2>&1 && [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/munged ] && \
	    command -v ip >/dev/null 2>&1; then \
		echo "slurm-deps: Slurm, munge and iproute2 are installed"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		{ DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SLURM_PACKAGES) >/dev/null && \
		  echo "slurm-deps: installed $(SLURM_PACKAGES)"; } || \
		echo "slurm-deps: apt-get could not install $(SLURM_PACKAGES): the slurm-marked tests will be skipped"; \
	else \
		echo "slurm-deps: apt-get (as root) is unavailable: the slurm-marked tests will be skipped"; \
	fi
