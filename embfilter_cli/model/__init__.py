"""From `--model` to the unembedding W_U and its facts.

Layer order (each imports only those before it): `location` → `aliases`, `gguf_header` →
`unembedding` → `hub` → `locate` → `head`.
"""
