"""Helpers shared by the kernel launchers: which implementation runs, and how big a block is.

Setting the environment variable ``INSPECTION_FORCE_REFERENCE=1`` forces every public kernel op onto its torch
reference, on any device; it is read at each call, so it can be flipped without re-importing.
"""

from __future__ import annotations

import os

import torch

#: Environment switch that forces the torch references everywhere when set to ``"1"``.
FORCE_REFERENCE_ENV = "INSPECTION_FORCE_REFERENCE"
#: Triton's own switch that runs ``@triton.jit`` kernels on the CPU through its interpreter.
INTERPRET_ENV = "TRITON_INTERPRET"


def use_triton(t: torch.Tensor) -> bool:
    """Whether a public op should run its Triton kernel for ``t``.

    Args:
        t: the op's main input; its device decides.

    Returns:
        False when ``INSPECTION_FORCE_REFERENCE=1``; otherwise True when ``t`` is on a CUDA device or the
        Triton interpreter is on (``TRITON_INTERPRET=1``), and False elsewhere.
    """
    if os.environ.get(FORCE_REFERENCE_ENV) == "1":
        return False
    return bool(t.is_cuda) or os.environ.get(INTERPRET_ENV) == "1"


def block_size(n: int, lo: int = 16, hi: int = 1024) -> int:
    """The block size for ``n`` elements: the next power of two of ``n``, clamped to ``[lo, hi]``.

    Args:
        n: elements the block should cover, >= 0.
        lo: smallest block, a power of two >= 1.
        hi: largest block, a power of two >= ``lo``.

    Returns:
        A power of two in ``[lo, hi]``.

    Raises:
        TypeError: an argument is not an int.
        ValueError: ``n`` is negative, or ``lo``/``hi`` are not powers of two with ``1 <= lo <= hi``.
    """
    for name, value in (("n", n), ("lo", lo), ("hi", hi)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"block_size: {name} must be an int; got {value!r} ({type(value).__name__})")
    if n < 0:
        raise ValueError(f"block_size: n must be >= 0; got {n}")
    if not (1 <= lo <= hi and lo & (lo - 1) == 0 and hi & (hi - 1) == 0):
        raise ValueError(
            f"block_size: lo and hi must be powers of two with 1 <= lo <= hi; got lo={lo}, hi={hi}"
        )
    return max(lo, min(hi, 1 << (max(n, 1) - 1).bit_length()))  # next power of two
