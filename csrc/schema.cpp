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
  // The fused ops, with dropout's RNG contract and mask modes; each returns (out, mask).
  // bias (optional) broadcasts over input's last dimension. bias_dropout_add_fwd gives
  // residual + dropout(input + bias); bias_act_dropout_fwd gives dropout(act(input + bias))
  // with activation 'none', 'relu', 'gelu', 'gelu_tanh' or 'silu'. bias_act_dropout_bwd is
  // the backward of both (activation 'none' for bias_dropout_add, whose input and bias it
  // then does not read): (grad_input, grad_bias), grad_bias empty unless bias_grad.
  m.def("bias_dropout_add_fwd(Tensor input, Tensor? bias, Tensor residual, float p, "
        "Tensor rng_state, str mode) -> (Tensor, Tensor)");
  m.def("bias_act_dropout_fwd(Tensor input, Tensor? bias, float p, str activation, "
        "Tensor rng_state, str mode) -> (Tensor, Tensor)");
  m.def("bias_act_dropout_bwd(Tensor grad, Tensor? input, Tensor? bias, Tensor mask, float p, "
        "str activation, Tensor rng_state, str mode, bool bias_grad) -> (Tensor, Tensor)");
}
