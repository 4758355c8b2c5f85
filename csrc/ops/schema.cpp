// Every fastreg operator is declared here, once; kernels are registered per device in
// the *_cpu.cpp and *_cuda.cu files, autograd and fake kernels in fastreg/_ops.py.
#include <torch/library.h>

TORCH_LIBRARY(fastreg, m) {
  // Dropout with the RNG state as an explicit input, so each op is a pure function:
  // rng_state is an int64 tensor (seed, offset) on the input's device. mode is what
  // the forward keeps for backward: 'bits', 'bool' or 'recompute'.
  m.def("dropout_fwd(Tensor input, float p, Tensor rng_state, str mode) -> (Tensor, Tensor)");
  // In place: input becomes the output (as dropout_fwd's, bit for bit); returns the mask.
  // `mask_mode`, not `mode`: torch.compile's auto_functionalize passes a mutable op's
  // arguments by name to a function whose own first parameter is called `mode`.
  m.def("dropout_fwd_(Tensor(a!) input, float p, Tensor rng_state, str mask_mode) -> Tensor");
  m.def("dropout_bwd(Tensor grad, Tensor mask, float p, Tensor rng_state, str mode) -> Tensor");
  m.def("dropout_mask(Tensor rng_state, int[] size, float p) -> Tensor");
  // grad copied into the layout `stride` (dropout_fwd's output's): dropout_fwd's backward
  // node calls it under compiled autograd (csrc/ops/dropout_autograd.cpp says why).
  m.def("grad_with_strides(Tensor grad, SymInt[] stride) -> Tensor");

  // L1/L2 penalty over a list of tensors on one device, with per-tensor coefficients
  // (parameter groups cost nothing extra): sum_i l1[i] * sum|w_i| + l2[i] * sum w_i**2,
  // a 0-dim float32 tensor (float64 if any tensor is float64). A zero coefficient's
  // term is left out. grad_out is read from device memory by the kernels.
  m.def("penalty(Tensor[] params, float[] l1, float[] l2) -> Tensor");
  m.def("penalty_backward(Tensor grad_out, Tensor[] params, float[] l1, float[] l2) -> Tensor[]");
  // grads[i] += l1[i] * sign(w_i) + 2 * l2[i] * w_i, in place, no graph.
  m.def("penalty_grad_(Tensor(a!)[] grads, Tensor[] params, float[] l1, float[] l2) -> ()");
  // w <- sign(w) * max(|w| - threshold[i], 0), in place.
  m.def("prox_l1_(Tensor(a!)[] params, float[] threshold) -> ()");
  // The fused ops, with dropout's RNG contract and mask modes; each returns (out, mask).
  // bias (optional) broadcasts over input's last dimension. bias_dropout_add_fwd gives
  // residual + dropout(input + bias); bias_act_dropout_fwd gives dropout(act(input + bias))
  // with activation 'none', 'relu', 'gelu', 'gelu_tanh' or 'silu'. bias_act_dropout_bwd is
  // the backward of both (activation 'none' for bias_dropout_add, whose input and bias it
  // then does not read): (grad_input, grad_bias), grad_bias empty unless bias_grad.
  m.def(
      "bias_dropout_add_fwd(Tensor input, Tensor? bias, Tensor residual, float p, "
      "Tensor rng_state, str mode) -> (Tensor, Tensor)");
  m.def(
      "bias_act_dropout_fwd(Tensor input, Tensor? bias, float p, str activation, "
      "Tensor rng_state, str mode) -> (Tensor, Tensor)");
  m.def(
      "bias_act_dropout_bwd(Tensor grad, Tensor? input, Tensor? bias, Tensor mask, float p, "
      "str activation, Tensor rng_state, str mode, bool bias_grad) -> (Tensor, Tensor)");
}
