// Host/device qualifiers for code shared by the C++ and CUDA kernel cores.
#pragma once

#if defined(__CUDACC__)
#define CLIPFAST_HD __host__ __device__ __forceinline__
#else
#define CLIPFAST_HD inline
#endif
