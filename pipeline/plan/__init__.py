"""Memory planning, before any weight loads: a model's shape read from its config.json (``arch``), the
bytes each stage (sft, rm, ppo) holds on the device at its peak for that shape, a batch and a precision
(``memory``), the card and its budget (``card``), and the settings that fit it, ``ppo.*_batch_size=auto``
included (``fit``). ``make plan`` prints it; the RL stage resolves ``auto`` and refuses a configuration
that cannot fit with it. May import ``core``, ``models`` and ``rl`` (for their constants); nothing in
the library imports it, only the stages."""
