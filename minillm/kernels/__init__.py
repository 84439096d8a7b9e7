"""The fused CUDA kernels (the only CUDA code in minillm), one module per op family.

    common.py      shared device helpers (row reductions), launch sizes, compilation
    activation.py  softmax / log-softmax, GELU                  (ops/activation.py)
    loss.py        cross-entropy                                (ops/loss.py)
    norm.py        layer norm                                   (ops/norm.py)
    attention.py   attention mask + softmax rows                (ops/attention.py)
    optim.py       fused AdamW, multi-tensor norm and scale     (optim/adamw.py, optim/clip.py)

Each module keeps its kernel source beside its Python launcher. Kernels compile on
first use; CuPy is imported only inside functions, so importing costs nothing
without a GPU. Every kernel is tested equal to the array-module version.
"""
