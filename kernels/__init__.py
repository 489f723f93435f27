"""kernels: tensor-level math for minituner (depends on torch only).

NF4/FP4/Int4 codebooks and blockwise absmax quantization (`minituner.kernels.nf4`), the dynamic
8-bit map and blockwise 8-bit quantization (`minituner.kernels.blockwise`), the page pool behind the
paged optimizer (`minituner.kernels.paging`) and benchmarks (`python -m minituner.kernels.bench`).
"""
