"""The ``@triton.jit`` bodies of kvquant's kernels, one module per kernel family; the modules of
:mod:`kvquant.kernels` with the same names launch them. Each module defines its kernels only when triton imports."""
