/* A stand-in for CUDA's cuda_runtime.h, enough for bindgen to read nccl.h (ffi/bindgen/regenerate.sh).
 * nccl.h only needs the two opaque stream and event handle types; their real definitions are these. */
#ifndef TRAINCTL_CUDA_RUNTIME_STUB_H
#define TRAINCTL_CUDA_RUNTIME_STUB_H
#include <stddef.h> /* the real header brings size_t in too */
typedef struct CUstream_st *cudaStream_t;
typedef struct CUevent_st *cudaEvent_t;
#endif
