"""The tiny run the reliability cases share."""

from __future__ import annotations

# A model, corpus and device every case can train in a second or two; each case adds its stage's settings.
TINY_RUN = [
    "device=cpu",
    "model.config={hidden_size: 32, num_hidden_layers: 1, num_heads: 2}",
    "data.sources=[{path: synthetic, synthetic_docs: 24, synthetic_words: 60}]",
    "data.min_tokens=96",
    "data.max_tokens=128",
    "data.eval_docs=2",
]
