"""Texts through the LLM: embeddings, recipes, the logit lens, vocabulary, evaluation."""
