"""Benchmarks of llama_jax: `python -m bench [--suite cpu|gpu]` (inference and training), and the converter bench
(bench/convert_bench.py). See BENCHMARKS.md for the recorded results."""
