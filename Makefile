# The two commands of the README:
#   make quickstart   sample data -> shards -> 2-process training -> evaluation   (arrives with training)
#   make test         install, lint, and run the whole test suite (what CI runs)
# Both create or reuse .venv/ at the repository root and install FFmpeg when it is missing.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.vmr-installed

.PHONY: test lint install ffmpeg clean

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .

install: ffmpeg $(STAMP)

# Reinstall only when the package metadata changes. torch and torchcodec are exact pins, so on a
# CPU machine pip takes the CPU wheels; see the README for CUDA machines.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# torchcodec links against the system FFmpeg libraries (4 to 8); the ffmpeg program itself is
# used to re-encode videos when building shards. Debian's package brings both.
ffmpeg:
	@if command -v ffmpeg >/dev/null 2>&1 && command -v ffprobe >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing FFmpeg with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null; \
	else \
		echo "vmr needs FFmpeg 4-8 (libraries and the ffmpeg program): install it, e.g. 'sudo apt-get install ffmpeg' or 'brew install ffmpeg', then run make again" >&2; \
		exit 1; \
	fi

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
