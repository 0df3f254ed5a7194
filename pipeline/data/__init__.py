"""Data: chat formats (templates, answer masks), dataset layouts with row validation, and text
corpora as token streams. May import ``core``."""
