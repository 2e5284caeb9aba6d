# First use creates .venv and installs everything; later runs reuse it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo style-demo test test-all lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch and torchvision are pinned as a pair: a registry torchvision does not import beside another torch.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# Stage one (autoencoder), stage two (diffusion; prints the caption-fidelity score), then sample.py on
# the trained checkpoint as a user would.
demo: $(STAMP)
	$(BIN)/python train.py experiment=autoencoder_demo
	$(BIN)/python train.py experiment=demo
	$(BIN)/python sample.py ckpt=$$(ls -t outputs/demo/*/checkpoints/last.ckpt | head -1) ema=true \
		prompt="a red circle on a blue background" num_images=4 steps=25 out_dir=outputs/demo-samples

# The style demo: a DreamBooth fine-tune learns a striped style from 24 pictures, with and without prior
# preservation, then python -m ldm.style_demo scores both against the base and writes the grid. Its base is its
# own (the CI demo's recipe on an autoencoder that can draw stripes, which the demo's cannot), trained once.
style-demo: $(STAMP)
	ls outputs/style_demo_base/*/checkpoints/last.ckpt >/dev/null 2>&1 || { \
		$(BIN)/python train.py experiment=autoencoder_style_demo && \
		$(BIN)/python train.py experiment=style_demo_base; }
	$(BIN)/python train.py experiment=style_demo
	$(BIN)/python train.py experiment=style_demo data.class_prompt= module.prior_loss_weight=0 run_name=style_demo_no_prior
	$(BIN)/python -m ldm.style_demo

# Two test processes (pytest-xdist), a file per process at a time so module fixtures are built once: most
# tests run on one thread, and the machines CI runs on have 2 cores (one torch thread per process). Files go
# out in collection order, which tests/conftest.py makes longest first (xdist would otherwise start with the
# files of most tests, and the longest file, collected last, would leave one process idle at the end).
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test-all: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m ''

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) outputs data/demo
