"""kernels: tensor-level math for minituner (depends on torch only).

NF4/FP4/Int4 codebooks and blockwise absmax quantization (`minituner.kernels.nf4`, the lesson;
`minituner.kernels.nf4_fast`, the same results by lookup tables), the dynamic
8-bit map and blockwise 8-bit quantization (`minituner.kernels.blockwise`), the page pool behind the
paged optimizer (`minituner.kernels.paging`) and the NF4 benchmark (`python -m minituner.kernels.bench`).
kernels/ never imports minituner's other modules.
"""
