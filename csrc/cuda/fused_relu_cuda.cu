// The fused ops' CUDA kernels for activation 'relu' (a translation unit per activation, so
// that builds run in parallel; see cuda/fused_cuda.h).
#include "cuda/fused_cuda.h"

namespace fastreg {
FASTREG_FUSED_CUDA_INSTANTIATE(Activation::Relu)
}  // namespace fastreg
