# The two commands of the README:
#   make quickstart   sample data -> shards -> 2-process training -> evaluation on held-out videos
#   make test         install, lint, and run the whole test suite (what CI runs)
# Both create or reuse .venv/ at the repository root and install FFmpeg when it is missing.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.vmr-installed

.PHONY: quickstart corpus test lint install ffmpeg chromium clean

QUICK_DATA := runs/quickstart-data
QUICK_RUN  := runs/quickstart

# 400 synthetic videos (320 to train, 80 held out), shards re-encoded to 32 px at 2 fps, the tiny
# config trained by 2 CPU processes through accelerate launch, then the final model scored on the
# held-out videos with the official QVHighlights protocol, overall and by what tells each query apart
# from the most similar other query of its video (told_apart_by). About 14 minutes on 2 cores.
quickstart: install $(QUICK_DATA)/shards/manifest.json
	rm -rf $(QUICK_RUN)
	$(BIN)/accelerate launch --config_file launch/cpu_2proc.yaml -m vmr.train --config configs/tiny.yaml \
		train.output_dir=$(QUICK_RUN)
	$(BIN)/vmr eval --checkpoint $(QUICK_RUN)/export --shards '$(QUICK_DATA)/shards/val-*.tar' --name vmr-tiny \
		--predictions-out $(QUICK_RUN)/eval/predictions.jsonl --json $(QUICK_RUN)/eval/metrics.json \
		--group-by told_apart_by
	@echo
	@echo "Run: $(QUICK_RUN)  (inference bundle in export/, best on validation in export_best/)"
	@echo "TensorBoard: $(BIN)/tensorboard --logdir $(QUICK_RUN)/tensorboard   then open http://localhost:6006"
	@echo "Try it:      $(BIN)/vmr predict --checkpoint $(QUICK_RUN) --video $$(ls $(QUICK_DATA)/synth/videos/*.mp4 | tail -1) --query 'a red circle blinks'"

# Remade when the generator changes (its annotations gain fields, e.g. told_apart_by).
$(QUICK_DATA)/synth/val.jsonl: vmr/synth.py vmr/vocab.py | install
	$(BIN)/vmr synth --out $(QUICK_DATA)/synth --videos 400 --size 32 --fps 4 --min-duration 20 --max-duration 40

$(QUICK_DATA)/shards/manifest.json: $(QUICK_DATA)/synth/val.jsonl
	for split in train val; do \
		$(BIN)/vmr shards build --videos $(QUICK_DATA)/synth/videos --annotations $(QUICK_DATA)/synth/$$split.jsonl \
			--out $(QUICK_DATA)/shards --split $$split --fps 2 --size 32 --keyframe-interval 0 \
			--max-videos-per-shard 20 --workers 2 --overwrite || exit 1; \
	done

# The held-out videos as a small corpus benchmark (TVR's protocol), with the quickstart's model:
# ground truth, vmr index, vmr search --queries --contrast (the training annotations' sentences),
# vmr eval --protocol tvr (runs/corpus/). A few minutes on 2 cores.
corpus: install
	test -d $(QUICK_RUN)/export || { echo "run 'make quickstart' first"; exit 2; }
	$(BIN)/python benchmarks/corpus_search.py --checkpoint $(QUICK_RUN)/export --work runs/corpus \
		--out runs/corpus/report.json

test: install chromium
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .

install: ffmpeg $(STAMP)

# Reinstall only when the package metadata or the constraints change. pyproject.toml declares the
# supported ranges; constraints.txt the exact versions the tests run against (on a CPU machine pip
# takes the CPU wheels of torch 2.13.0 and torchcodec 0.13.0; see the README for CUDA machines).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

# $(call apt_require,CHECK,PACKAGE,WHY): nothing when the shell test CHECK passes; else, as root
# with apt-get, install PACKAGE; else print WHY and fail.
define apt_require
	@if $(1); then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing $(2) with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null; \
	else \
		echo "$(3)" >&2; \
		exit 1; \
	fi
endef

# torchcodec links against the system FFmpeg libraries (4 to 8); the ffmpeg program itself is
# used to re-encode videos when building shards. Debian's package brings both.
FFMPEG_WHY := vmr needs FFmpeg 4-8 (libraries and the ffmpeg program): install it, e.g. 'sudo apt-get install ffmpeg' or 'brew install ffmpeg', then run make again
ffmpeg:
	$(call apt_require,command -v ffmpeg >/dev/null 2>&1 && command -v ffprobe >/dev/null 2>&1,ffmpeg,$(FFMPEG_WHY))

# The demo's browser test drives Debian's chromium through Playwright (playwright's own browser
# download is not used).
CHROMIUM_WHY := the browser test needs chromium: install it (e.g. 'sudo apt-get install chromium'), or run pytest -m 'not browser'
chromium:
	$(call apt_require,command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1,chromium,$(CHROMIUM_WHY))

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
