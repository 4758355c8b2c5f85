// The penalty ops on CUDA: tensor glue and registration. The kernels and their tables are
// device code in device/penalty_kernels.cuh. Nothing is copied to the device: under CUDA
// graph capture the tables are kernel parameters of the graph's nodes, and the incoming
// gradient is read from device memory, so nothing synchronises with the host.
#include <torch/library.h>

#include <vector>

#include "cuda/cuda_launch.h"
#include "device/penalty_kernels.cuh"
#include "ops/penalty.h"

namespace fastreg {
namespace {

using device::ElementwiseTable;
using device::ReduceTable;

uint8_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return device::kF32;
    case at::kHalf:
      return device::kF16;
    case at::kBFloat16:
      return device::kBF16;
    case at::kDouble:
      return device::kF64;
    default:
      TORCH_CHECK(false, "fastreg penalty: unsupported dtype ", t);
  }
  return device::kF32;  // not reached
}

int64_t chunks_of(int64_t numel) { return (numel + kPenaltyChunk - 1) / kPenaltyChunk; }

// Puts the tensors of `items` into tables of kSlots, `fill(table, t, item)` writing slot t
// and returning the tensor it reads, and calls launch_table(table, chunks) for each table.
template <typename Table, int kSlots, typename Item, typename Fill, typename Launch>
void launch_in_tables(const std::vector<Item>& items, const Fill& fill,
                      const Launch& launch_table) {
  Table table{};
  int64_t chunks = 0;  // in the table being filled
  const auto flush = [&] {
    table.chunk_begin[table.n] = chunks;
    launch_table(table, chunks);
    table.n = 0;
    chunks = 0;
  };
  for (const Item& item : items) {
    if (table.n == kSlots) flush();
    const int t = table.n++;
    const at::Tensor& tensor = fill(table, t, item);
    table.numel[t] = tensor.numel();
    table.dtype[t] = dtype_code(tensor.scalar_type());
    table.chunk_begin[t] = chunks;
    chunks += chunks_of(tensor.numel());
  }
  if (table.n > 0) flush();
}

at::Tensor penalty_cuda(at::TensorList params, c10::ArrayRef<double> l1, c10::ArrayRef<double> l2) {
  check_penalty_args(params, l1, l2);
  TORCH_CHECK_VALUE(!params.empty(), "params must not be empty (its device gives the result's)");
  const DeviceGuard guard(params[0].device());
  // Dense sources (contiguous copies of non-dense tensors) live until the kernels ran:
  // the caching allocator reuses their memory only for later work on this stream.
  const std::vector<ReductionInput> inputs = reduction_inputs(params, l1, l2);
  const at::ScalarType result_type = penalty_result_type(params);
  at::Tensor out = at::empty({}, params[0].options().dtype(result_type));
  int64_t total_chunks = 0;
  for (const ReductionInput& input : inputs) total_chunks += chunks_of(input.src->numel());
  if (total_chunks == 0) return out.zero_();
  at::Tensor partials = at::empty({total_chunks}, params[0].options().dtype(at::kDouble));
  double* slots = partials.mutable_data_ptr<double>();
  const Stream stream = current_stream();

  launch_in_tables<ReduceTable, device::kReduceSlots>(
      inputs,
      [](ReduceTable& table, int t, const ReductionInput& input) -> const at::Tensor& {
        table.data[t] = input.src->const_data_ptr();
        table.l1[t] = input.l1;
        table.l2[t] = input.l2;
        return *input.src;
      },
      [&](const ReduceTable& table, int64_t chunks) {
        launch(device::penalty_reduce_kernel, grid_size(chunks), kThreadsPerBlock, 0, stream, table,
               slots);
        slots += chunks;
      });

  const double* all = partials.const_data_ptr<double>();
  if (result_type == at::kDouble) {
    launch(device::penalty_final_kernel<double>, 1, kThreadsPerBlock, 0, stream, all, total_chunks,
           out.mutable_data_ptr<double>());
  } else {
    launch(device::penalty_final_kernel<float>, 1, kThreadsPerBlock, 0, stream, all, total_chunks,
           out.mutable_data_ptr<float>());
  }
  return out;
}

// Launches the elementwise kernel over the jobs, kElementwiseSlots tensors at a time.
template <ElementwiseMode kMode>
void run_elementwise(const std::vector<ElementwiseJob>& jobs, const at::Tensor& grad_out) {
  if (jobs.empty()) return;
  const void* g = grad_out.defined() ? grad_out.const_data_ptr() : nullptr;
  const bool g_double = grad_out.defined() && grad_out.scalar_type() == at::kDouble;
  const Stream stream = current_stream();
  launch_in_tables<ElementwiseTable, device::kElementwiseSlots>(
      jobs,
      [](ElementwiseTable& table, int t, const ElementwiseJob& job) -> const at::Tensor& {
        table.in[t] = job.in->const_data_ptr();
        table.out[t] = job.out->mutable_data_ptr();
        table.a[t] = job.a;
        table.b[t] = job.b;
        return *job.in;
      },
      [&](const ElementwiseTable& table, int64_t chunks) {
        launch(device::penalty_elementwise_kernel<kMode>, grid_size(chunks), kThreadsPerBlock, 0,
               stream, table, g, g_double);
      });
}

std::vector<at::Tensor> penalty_backward_cuda(const at::Tensor& grad_out, at::TensorList params,
                                              c10::ArrayRef<double> l1, c10::ArrayRef<double> l2) {
  check_penalty_args(params, l1, l2);
  const at::Tensor& like = params.empty() ? grad_out : params[0];
  const DeviceGuard guard(like.device());
  const at::Tensor g = penalty_grad_out(grad_out, like);
  std::vector<at::Tensor> grads;
  const std::vector<ElementwiseJob> jobs = backward_jobs(params, l1, l2, grads);
  run_elementwise<ElementwiseMode::Grad>(jobs, g);
  return grads;
}

void penalty_grad_cuda(at::TensorList grads, at::TensorList params, c10::ArrayRef<double> l1,
                       c10::ArrayRef<double> l2) {
  check_penalty_args(params, l1, l2);
  check_grads_length(grads, params);
  if (params.empty()) return;
  const DeviceGuard guard(params[0].device());
  const std::vector<ElementwiseJob> jobs = add_grad_jobs(grads, params, l1, l2);
  run_elementwise<ElementwiseMode::AddGrad>(jobs, at::Tensor());
  finish_jobs(jobs);
}

void prox_l1_cuda(at::TensorList params, c10::ArrayRef<double> threshold) {
  check_penalty_tensors(params, "params");
  check_coefficients(threshold, params.size(), "threshold");
  if (params.empty()) return;
  const DeviceGuard guard(params[0].device());
  const std::vector<ElementwiseJob> jobs = prox_jobs(params, threshold);
  run_elementwise<ElementwiseMode::Prox>(jobs, at::Tensor());
  finish_jobs(jobs);
}

}  // namespace

FASTREG_CUDA_IMPL(m) {
  m.impl("penalty", &penalty_cuda);
  m.impl("penalty_backward", &penalty_backward_cuda);
  m.impl("penalty_grad_", &penalty_grad_cuda);
  m.impl("prox_l1_", &prox_l1_cuda);
}

}  // namespace fastreg
