# Quickstart: `make demo` (offline, end to end) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-slow test-all lint bench demo demo-model clean

# Where `make demo` writes its corpus and index, and `make demo-model` its training corpus and run.
DEMO_DIR ?= .demo
DEMO_TRAIN_DIR ?= .demo-train
CM := $(PY) -m retrieval

install: $(STAMP)

# Re-install only when the packaging files change.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[serve,postgres,distributed,test]'
	touch $(STAMP)

# The quick suite (about 5 minutes on 2 cores); the slow one (real models end to end, kills, servers,
# browsers, Ray: about 15 minutes) is `make test-slow`; CI runs both.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-all: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check --line-length 120 --select E,F,W,I,B,UP --ignore B905 --target-version py310 indexer retrieval tests bench

bench: $(STAMP)
	$(PY) bench/index_throughput.py

# A few hundred generated images (a seed never used in training), indexed with the bundled model,
# searched both ways and evaluated. Runs offline.
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(CM) data synth --out $(DEMO_DIR)/corpus --n 300 --seed 77 --test 300 --val 0
	$(CM) index $(DEMO_DIR)/corpus/test --index $(DEMO_DIR)/index --model crossmodal-demo
	@echo; echo '== text -> image: "a large red circle in the center on a gray background"'
	$(CM) search "a large red circle in the center on a gray background" --index $(DEMO_DIR)/index -k 3
	@echo; echo '== text -> image: "two shapes: a small blue star and a big yellow square"'
	$(CM) search "two shapes: a small blue star and a big yellow square" --index $(DEMO_DIR)/index -k 3
	@echo; echo '== filtered: "a large red circle" among the PNG files only (inside the vector search)'
	$(CM) search "a large red circle" --type png --index $(DEMO_DIR)/index -k 3
	@echo; echo '== image -> text:' $(DEMO_DIR)/corpus/test/000000.jpg; cat $(DEMO_DIR)/corpus/test/000000.txt
	$(CM) search --image $(DEMO_DIR)/corpus/test/000000.jpg --index $(DEMO_DIR)/index -k 3
	@echo; echo '== image -> text:' $(DEMO_DIR)/corpus/test/000003.png; cat $(DEMO_DIR)/corpus/test/000003.txt
	$(CM) search --image $(DEMO_DIR)/corpus/test/000003.png --index $(DEMO_DIR)/index -k 3
	@echo; echo '== recall@k over the 300 images and their 900 captions'
	$(CM) eval --index $(DEMO_DIR)/index
	@echo; echo '== text -> image scored by the image, its captions, and fusions of both'
	$(CM) eval --fusion --index $(DEMO_DIR)/index
	@echo; echo "index: $(DEMO_DIR)/index   try: $(VENV)/bin/crossmodal search 'a green triangle at the top' --index $(DEMO_DIR)/index"
	@echo "browse it:  $(VENV)/bin/crossmodal serve --index $(DEMO_DIR)/index   (then open http://127.0.0.1:8000)"

# Reproduces indexer/weights/crossmodal-demo.safetensors from scratch (see README for the wall time):
# 12 epochs from random init and 8 more at a lower learning rate, both at 64 px (crossmodal-demo-64px),
# then 4 epochs at 96 px (crossmodal-demo; open_clip interpolates the position embeddings).
demo-model: $(STAMP)
	$(CM) data synth --out $(DEMO_TRAIN_DIR)/corpus --n 20000 --seed 1 --test 1000 --val 500
	$(CM) train $(DEMO_TRAIN_DIR)/corpus/dataset_synth.json --model crossmodal-demo-64px --pretrained none \
		--out $(DEMO_TRAIN_DIR)/run1 --epochs 12 --batch-size 128 --lr 1e-3 --warmup 150 --val-every 288 \
		--checkpoint-every 144 --seed 0
	$(CM) train $(DEMO_TRAIN_DIR)/corpus/dataset_synth.json --model crossmodal-demo-64px \
		--pretrained $(DEMO_TRAIN_DIR)/run1/checkpoint.pt --out $(DEMO_TRAIN_DIR)/run2 --epochs 8 --batch-size 128 \
		--lr 3e-4 --warmup 50 --val-every 288 --checkpoint-every 144 --seed 1
	$(CM) train $(DEMO_TRAIN_DIR)/corpus/dataset_synth.json --model crossmodal-demo \
		--pretrained $(DEMO_TRAIN_DIR)/run2/checkpoint.pt --out $(DEMO_TRAIN_DIR)/run3 --epochs 4 --batch-size 128 \
		--lr 3e-4 --warmup 50 --val-every 144 --checkpoint-every 144 --seed 3 --fp16
	mkdir -p indexer/weights
	cp $(DEMO_TRAIN_DIR)/run3/weights.safetensors indexer/weights/crossmodal-demo.safetensors

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
