// Every fastreg operator is declared here, once; kernels are registered per device in
// the *_cpu.cpp and *_cuda.cu files, autograd and fake kernels in fastreg/_ops.py.
#include <torch/library.h>

TORCH_LIBRARY(fastreg, m) {
  // Dropout with the RNG state as an explicit input, so each op is a pure function:
  // rng_state is an int64 tensor (seed, offset) on the input's device. mode is what
  // the forward keeps for backward: 'bits', 'bool' or 'recompute'.
  m.def("dropout_fwd(Tensor input, float p, Tensor rng_state, str mode) -> (Tensor, Tensor)");
  m.def("dropout_bwd(Tensor grad, Tensor mask, float p, Tensor rng_state, str mode) -> Tensor");
  m.def("dropout_mask(Tensor rng_state, int[] size, float p) -> Tensor");
}
