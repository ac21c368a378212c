"""How float32 results of long reductions are compared: by the error's norm, relative to the tensor's norm.

Two float32 computations of the same gradient (torch against XLA, remat against none, one batch against micro-
batches) add the same products in a different order. Each output element is a sum of many products of mixed sign;
its rounding error is of order eps32 * sqrt(terms) times the size of those products, not of the sum. Where the sum
cancels to a small value, that element's relative error is large, and which elements those are depends on the
CPU's summation order (vector width, threads). So an elementwise rtol fails on one machine and passes on another,
while the error of the tensor as a whole, ||got - want|| / ||want||, stays at eps32 * sqrt(terms) on every machine.
"""

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)


def float32_rtol(terms: int, depth: int = 1) -> float:
    """The relative error (in norm) of float32 results of reductions over `terms` products, compounded through
    `depth` such reductions in a row (layers, forward then backward): eps32 * sqrt(terms) * depth, times 4 for
    the rounding of the inputs and outputs themselves."""
    return 4 * EPS32 * np.sqrt(terms) * depth


def assert_close_in_norm(got, want, rtol: float, name: str = "") -> None:
    """||got - want|| <= rtol * ||want||, both finite, same shape (NaN never passes)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert np.isfinite(got).all() and np.isfinite(want).all(), f"{name}: not finite"
    error, size = np.linalg.norm(got - want), np.linalg.norm(want)
    assert error <= rtol * size, f"{name}: ||got - want|| = {error:.3g} > {rtol:.3g} * ||want|| ({size:.3g})"


def assert_trees_close_in_norm(got, want, rtol: float) -> None:
    """assert_close_in_norm for each leaf of two pytrees of the same structure (named by their paths)."""
    import jax

    paths = jax.tree_util.tree_flatten_with_path(want)[0]
    leaves = jax.tree.leaves(got)
    assert len(leaves) == len(paths)
    for (path, expected), actual in zip(paths, leaves):
        assert_close_in_norm(actual, expected, rtol, jax.tree_util.keystr(path))
