"""The fused CUDA kernels (the only CUDA code in minillm), one module per op family.

    common.py      shared device helpers (row reductions), launch sizes, compilation
    activation.py  softmax / log-softmax, GELU                  (ops/activation.py)
    loss.py        cross-entropy                                (ops/loss.py)
    norm.py        layer norm                                   (ops/norm.py)
    matmul.py      products through cuBLAS GemmEx (TF32, bf16/fp16 in, fp32 out)  (ops/matmul.py)
    attention.py   mask + softmax rows, the score-matrix path, flash attention   (ops/attention.py)
    optim.py       fused AdamW (per parameter, multi-tensor), multi-tensor norm and scale  (optim/adamw.py, optim/clip.py)
    generate.py    position-from-device kernels of the CUDA-graph decode step   (generate.py)

Each module keeps its kernel source beside its Python launcher. Kernels compile on
first use; CuPy is imported only inside functions, so importing costs nothing
without a GPU. Every kernel is tested equal to the array-module version.
"""
