"""`python -m infer.serve`: the OpenAI-compatible HTTP server."""
