"""Generation: decoding settings, batched generation through a chat template, stop masks, and
SFT's table of samples. May import ``core`` and ``data``."""
