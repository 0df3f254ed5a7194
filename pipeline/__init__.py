"""The RLHF pipeline's library. The stages in ``stages/`` import it; it never imports them.

Packages, lowest first; each may import only those above it in this list:

    core/        errors, artifacts (the staged directory), run identity, runtime, tracking, validation
    data/        chat formats (templates, masks), dataset layouts and row checks, text corpora
    generation/  decoding settings, batched generation, stop masks, SFT's sample table
    models/      loading models and tokenizers, policies of a stage, the reward model
    training/    what the TRL-trainer stages share (arguments, guards, resume, RM training)
    rl/          the RL stage: estimators, losses, KL, log-probs, rollout, the shared-base model, trainer
    world/       the embedded world (test bench): generator, gold judge, tiny base model
    eval/        the final comparison: rollouts, metrics, report, plots (the world's judge when present)
    config/      typed schemas of the Hydra tree (imports the settings dataclasses it types)
"""
