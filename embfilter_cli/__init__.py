"""embfilter: spectral filters from an LLM's unembedding matrix for better text embeddings.

The package root stays import-light: `embfilter --help` and shell completion must not pull in
torch or transformers, so nothing heavy is imported here.
"""

__version__ = "0.1.0"
