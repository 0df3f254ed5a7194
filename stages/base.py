"""Stage 0: the embedded world's base model.

Train a byte-level BPE tokenizer on the world corpus, then pretrain a small Llama on it
from scratch, on CPU. The result is the run's ``base`` artifact, a Hugging Face model
folder the later stages load exactly as they would load a hub model.

    make base
    make base ARGS="train.max_steps=200 arch.num_hidden_layers=2"
    python -m stages.base run_name=exp1 seed=1

With ``model=llama`` (or any ``model.path``) there is nothing to build: the stages load
that model directly and this stage says so and exits.
"""

from __future__ import annotations

import json

import hydra
import torch
from omegaconf import DictConfig

import pipeline.config  # noqa: F401  (registers the schemas)
from pipeline.core.artifacts import staged_artifact
from pipeline.core.errors import PipelineError
from pipeline.core.runtime import output_run_dir, resolved, seed_everything, user_errors
from pipeline.core.tracking import start_tracking
from pipeline.core.validation import check_ranges
from pipeline.data.corpus import pack_corpus
from pipeline.world.base_model import build_llama, pretrain, train_tokenizer


def read_corpus(path: str) -> list[str]:
    try:
        with open(path) as f:
            return [json.loads(line)["text"] for line in f if line.strip()]
    except FileNotFoundError as e:
        raise PipelineError(f"pretraining corpus {path} not found: run `make data` first") from e


def run(cfg: DictConfig) -> dict:
    check_ranges(cfg)
    if cfg.model.path:
        print(f"model.path={cfg.model.path}: a pretrained model is configured, no base to build.")
        return {}
    seed_everything(cfg.seed)
    torch.set_num_threads(cfg.train.num_threads)
    tracker = start_tracking(cfg, "base")

    # --- tokenizer and corpus ---
    texts = read_corpus(cfg.data.pretrain)
    tokenizer = train_tokenizer(texts, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency)
    stream = pack_corpus(texts, tokenizer)  # (N,)

    # --- model ---
    model = build_llama(cfg.arch, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny Llama: {n_params / 1e6:.2f}M parameters, corpus {len(stream)} tokens")

    # --- train ---
    metrics = pretrain(model, stream, cfg.train, cfg.seed, tracker.log)
    metrics.update(n_parameters=n_params, corpus_tokens=len(stream), vocab_size=len(tokenizer))
    print(f"base: loss {metrics['train_loss']:.3f} in {metrics['train_seconds']:.0f}s")

    # --- save ---
    with staged_artifact(output_run_dir(cfg), "base", resolved(cfg)) as art:
        model.save_pretrained(art.dir / "model")
        tokenizer.save_pretrained(art.dir / "model")
        art.metrics = metrics
    tracker.summary(metrics)
    tracker.finish()
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="base")
@user_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
