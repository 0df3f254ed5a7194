"""The embedded world: the test bench, not the product. Its vocabulary, entities, corpus and
responses, the dataset generator, the gold judge, and the tiny Llama base model. Nothing in the
product imports it except the world's own stages and eval's gold judge. May import ``core``
and ``data``."""
