"""`python -m convert`."""
