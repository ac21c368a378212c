"""Write a directory so that it either appears complete or not at all."""

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from llama_jax.errors import InputError


def partial_path(destination: Path) -> Path:
    """Where `destination` is built: a hidden sibling, so an interrupted build never looks like the real thing."""
    return destination.parent / f".{destination.name}.partial"


@contextlib.contextmanager
def atomic_directory(destination: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield an empty work directory that replaces `destination` by one rename when the block succeeds.

    An existing destination is an InputError unless `force`. On any exception (Ctrl-C included) the work
    directory is removed; after a kill -9 it is left hidden and the next run clears it.
    """
    destination = Path(destination).absolute()
    if destination.exists() and not force:
        raise InputError(destination, "already exists; pass --force to overwrite it")
    work = partial_path(destination)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    old = destination.parent / f".{destination.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if destination.exists():
        destination.rename(old)
    work.rename(destination)
    shutil.rmtree(old, ignore_errors=True)
