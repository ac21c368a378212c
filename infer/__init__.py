"""`python -m infer`: text generation (see infer/__main__.py)."""
