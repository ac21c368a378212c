"""Write a directory so that it either appears complete or not at all."""

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import jax
from jax.experimental import multihost_utils

from llama_jax.errors import InputError


def partial_path(destination: Path) -> Path:
    """Where `destination` is built: a hidden sibling, so an interrupted build never looks like the real thing."""
    return destination.parent / f".{destination.name}.partial"


@contextlib.contextmanager
def atomic_directory(destination: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield an empty work directory that replaces `destination` by one rename when the block succeeds.

    An existing destination is an InputError unless `force`, and so is one whose directory cannot be created. On
    any exception (Ctrl-C included) the work directory is removed; after a kill -9 it is left hidden and the next
    run clears it. In a multi-process JAX job every process enters the block together; process 0 alone creates,
    removes and renames.
    """
    destination = Path(destination).absolute()
    if destination.exists() and not force:
        raise InputError(destination, "already exists; pass --force to overwrite it")
    work = partial_path(destination)
    primary = jax.process_index() == 0
    if primary:
        shutil.rmtree(work, ignore_errors=True)
        try:
            work.mkdir(parents=True)
        except OSError as e:
            raise InputError(destination, f"cannot be written here ({e.strerror})") from None
    _all_processes_reach(f"atomic_directory {destination} begin")
    try:
        yield work
    except BaseException:
        if primary:
            shutil.rmtree(work, ignore_errors=True)
        raise
    _all_processes_reach(f"atomic_directory {destination} written")
    if primary:
        old = destination.parent / f".{destination.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if destination.exists():
            destination.rename(old)
        work.rename(destination)
        shutil.rmtree(old, ignore_errors=True)
    _all_processes_reach(f"atomic_directory {destination} done")


def _all_processes_reach(name: str) -> None:
    """A barrier across the processes of a multi-process JAX job (nothing with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
