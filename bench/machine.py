"""The machine: what it is (CPU, cores, RAM, accelerator, versions) and its measured limits (bandwidth, peak)."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.model import measured_peak_flops

PACKAGES = ("llama_jax", "jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers")


def describe() -> dict:
    """CPU model, cores, RAM, kernel, Python, the jax devices, date and load average."""
    cpu = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    ram = None
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        ram = int(fields["MemTotal"].split()[0]) * 1024
    devices = jax.devices()
    return {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)), "ram_bytes": ram,
            "kernel": platform.release(), "python": platform.python_version(),
            "device": f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform})",
            "load_start": os.getloadavg()[0]}


def versions() -> dict:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def _best_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def jax_copy_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Bytes read + written per second by a jitted, donated (in place) `x + 1` over `nbytes` on the default device.

    Donation makes the output reuse the input's buffer, so no run pays for fresh pages.
    """
    x = jnp.ones(nbytes // 4, jnp.float32)
    step = jax.jit(lambda a: a + 1.0, donate_argnums=0)
    x = step(x).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x = step(x).block_until_ready()
        times.append(time.perf_counter() - start)
    del x
    return 2 * nbytes / min(times)


def numpy_copy_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Bytes read + written per second by `np.copyto` between two preallocated host arrays of `nbytes`."""
    a = np.ones(nbytes // 4, np.float32)
    b = np.zeros_like(a)
    seconds = _best_seconds(lambda: np.copyto(b, a), repeats)
    return 2 * nbytes / seconds


def jax_sum_read_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Bytes read per second by a jitted `jnp.sum` over `nbytes` of float32: a pure read stream, all cores."""
    x = jnp.ones(nbytes // 4, jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    return nbytes / _best_seconds(lambda: total(x).block_until_ready(), repeats)


def jax_gemv_read_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Bytes read per second by a float32 matrix-vector product over an `nbytes` matrix: the read stream that a
    batch-1 decode step is."""
    side = int((nbytes // 4) ** 0.5)
    w = jnp.ones((side, side), jnp.float32)
    v = jnp.ones((side,), jnp.float32)
    gemv = jax.jit(lambda w, v: w @ v)
    gemv(w, v).block_until_ready()
    seconds = _best_seconds(lambda: gemv(w, v).block_until_ready(), repeats)
    return w.nbytes / seconds


def limits(*, nbytes: int = 1 << 30, repeats: int = 5, peak_size: int = 2048, host: bool = True) -> dict:
    """The measured ceilings. bandwidth: the best copy (bytes read + written per second); read_bandwidth (host):
    the best pure read (a sum or a gemv over `nbytes`), which is what a decode step does; peak FLOP/s per dtype.

    On a small VM the two differ: each core sustains only so many outstanding reads, and a copy's writes add
    traffic without occupying them, so reads alone may top out well below the copy's read + write rate."""
    out = {"copy_bytes": nbytes, "jax_copy": jax_copy_bandwidth(nbytes, repeats)}
    if host:
        out["numpy_copy"] = numpy_copy_bandwidth(nbytes, repeats)
        out["gemv_read"] = jax_gemv_read_bandwidth(nbytes, repeats)
        out["sum_read"] = jax_sum_read_bandwidth(nbytes, repeats)
        out["read_bandwidth"] = max(out["gemv_read"], out["sum_read"])
    out["bandwidth"] = max(out["jax_copy"], out.get("numpy_copy", 0.0))
    out["peak_size"] = peak_size
    out["peak"] = {"float32": measured_peak_flops(jnp.float32, size=peak_size, repeats=repeats),
                   "bfloat16": measured_peak_flops(jnp.bfloat16, size=peak_size, repeats=repeats)}
    return out
