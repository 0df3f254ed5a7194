"""The final comparison (``make eval``): rollouts of every stage, metric math, the report and its
plots. May import every package but ``config``; it uses the world's judge on world prompts."""
