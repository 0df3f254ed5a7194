"""Data: chat formats (templates, answer masks), sources (files, folders laid out by split, hub ids,
row ranges), dataset layouts with row validation, and text corpora as token streams. May import
``core``."""
