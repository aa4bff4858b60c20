"""The training kernel (InternLM model, mixed precision, ZeRO-1, pipeline parallel)."""

import os

# MKL's fp32 GEMMs on AVX2 code paths (Intel CPUs without AVX-512, or MKL capped with
# MKL_ENABLE_INSTRUCTIONS=AVX2) may round differently with the buffers' alignment and the thread
# count: an exact resume and the one-process-vs-ranks equality of fp32 runs then differ in the last
# bits (seen: resumed losses 5.7112298 vs 5.7112296). Conditional Numerical Reproducibility in its
# strict mode removes that and measured no slower (1024^3 fp32 GEMM, 2 threads, AVX2 and AVX-512
# paths). MKL reads it when it starts, so it is set before torch is imported; a value the user set wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
