"""The fused kernels (the only CUDA and C++ code in minillm), one module per op family.

    common.py      shared device helpers (row reductions), launch sizes, compilation
    cpu.py         compiled CPU loops: C++ built on first use by the machine's compiler, called by
                   ctypes; ``ElementwiseKernel`` runs a CUDA elementwise body on NumPy arrays
    activation.py  softmax / log-softmax, GELU                  (ops/activation.py)
    loss.py        cross-entropy                                (ops/loss.py)
    norm.py        layer norm; on the CPU also RMS norm (C++ row loops)  (ops/norm.py)
    matmul.py      products through cuBLAS GemmEx (TF32, bf16/fp16 in, fp32 out)  (ops/matmul.py)
    attention.py   mask + softmax rows, the score-matrix path, flash attention   (ops/attention.py)
    optim.py       fused AdamW (per parameter, multi-tensor), multi-tensor norm and scale  (optim/adamw.py, optim/clip.py)
    generate.py    position-from-device kernels of the CUDA-graph decode step   (generate.py)

Each module keeps its kernel source beside its Python launcher. Kernels compile on
first use; CuPy is imported only inside functions, so importing costs nothing
without a GPU. Every kernel is tested equal to the array-module version, which
is what runs where a kernel cannot (no GPU; no C++ compiler, or not Linux, or
``MINILLM_CPU_KERNELS=0``, for the CPU loops).
"""
