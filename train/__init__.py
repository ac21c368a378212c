"""`python -m train`."""
