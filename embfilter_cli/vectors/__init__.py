"""Stored vectors in and out, one module per format, and the streaming apply loop."""
