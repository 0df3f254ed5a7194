# RLHF pipeline: `make help` lists the targets. Pass Hydra overrides with ARGS, e.g.
#   make sft ARGS="lora.r=4 train.learning_rate=1e-3"
#   make sft ARGS="-m lora.r=4,8"            (multirun sweep)

PY      := .venv/bin/python
STAMP   := .venv/.installed-stamp
WORLD   := $(or $(RLHF_ROOT),.)/data/world
DATA    := $(WORLD)/.stamp
ARGS    ?=
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup data base sft rm ppo dpo eval generate export pipeline plan test test-unit bench gpu-wheels clean

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $@

setup: $(STAMP) ## Create .venv and install the pinned dependencies (only when they changed)

# A stage's data: built on first use with the default world, never rewritten behind the user's back.
# Data older than the world's code or defaults (or made without make) may be another world.seed or
# size: only `make data` rewrites it.
$(DATA): $(STAMP) $(wildcard pipeline/world/*.py) conf/world/default.yaml
	@if ls $(WORLD)/*.jsonl >/dev/null 2>&1; then \
	  echo "$(WORLD) is older than the world's code or defaults (pipeline/world/, conf/world/default.yaml)," \
	       "or was not made by make. It is left as it is: rebuild it with make data, adding the ARGS it was" \
	       "made with (e.g. ARGS=\"world.seed=3\"), or keep it with: touch $@" >&2; \
	  exit 1; \
	fi
	$(PY) -m stages.datagen
	@touch $@

data: $(STAMP) ## Write the embedded world's datasets into data/world/ (deterministic, seeded)
	$(PY) -m stages.datagen $(ARGS)
	@touch $(DATA)

base: $(DATA) ## Pretrain the tiny base model on the world corpus -> artifacts/<run>/base
	$(PY) -m stages.base $(ARGS)

sft: $(DATA) ## Stage 1: supervised fine-tuning with LoRA -> artifacts/<run>/sft
	$(PY) -m stages.sft $(ARGS)

rm: $(DATA) ## Stage 2: pairwise reward model with LoRA -> artifacts/<run>/rm
	$(PY) -m stages.rm $(ARGS)

ppo: $(DATA) ## Stage 3: RL against the reward model, KL to SFT (ARGS="algorithm=rloo|grpo|dr_grpo|reinforce_pp|online_dpo")
	$(PY) -m stages.ppo $(ARGS)

dpo: $(DATA) ## Direct preference optimisation of the SFT policy (the no-RL baseline) -> artifacts/<run>/dpo
	$(PY) -m stages.dpo $(ARGS)

eval: $(DATA) ## Compare every stage of the run (gold judge on the world, the RM elsewhere) -> artifacts/<run>/eval
	$(PY) -m stages.eval $(ARGS)

generate: $(STAMP) ## Sample a stage's model: ARGS="stage=sft prompt='What is 2 plus 3?' decoding=top_p"
	$(PY) -m stages.generate $(ARGS)

export: $(STAMP) ## Merge a stage's policy into a plain HF model folder (ARGS="stage=dpo"; ppo by default)
	$(PY) -m stages.export $(ARGS)

pipeline: $(DATA) ## Run base, sft, rm, ppo and eval in order, skipping up-to-date stages
	$(PY) -m stages.pipeline $(ARGS)

plan: $(STAMP) ## GPU memory of sft, rm and ppo from config.json, and what fits: ARGS="model=llama3 gpu_memory=24GiB"
	$(PY) -m stages.plan $(ARGS)

test: $(STAMP) ## Run the test suite (unit, stage and slow tiers; gpu tests skip without CUDA)
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: $(STAMP) ## Run only the fast unit tests
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

bench: $(STAMP) ## Benchmarks in bench/ (ARGS=ppo: ours vs TRL 1.12's PPOTrainer; ARGS=grpo: ours vs TRL 1.16's GRPOTrainer; ARGS=gpu: the one-shot GPU bench, ARGS="gpu --dry-run" at tiny shapes; ARGS="alignment --run <r>": a run's eval over sampling seeds; ARGS="rm_agreement --responses <eval>/responses.jsonl <rm>...": RMs vs the gold judge)
	$(PY) bench/run.py $(ARGS)

gpu-wheels: ## Download the wheels the GPU machine installs (bench/gpu_wheels.sh -> bench/.gpu-wheels; run there: bench/gpu_run.sh)
	bash bench/gpu_wheels.sh

clean: ## Remove artifacts, generated data, W&B runs and Hydra outputs (keeps .venv)
	rm -rf artifacts data/world wandb outputs multirun
