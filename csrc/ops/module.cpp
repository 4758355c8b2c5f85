// The Python module fastreg._C: importing it loads the operator registrations; it also
// tells what the binary was built with.
#include <torch/extension.h>

#include "cpu/cpu_features.h"

namespace fastreg {
void bind_penalty_front(pybind11::module_& m);  // penalty_front.cpp
}

#define FASTREG_STR_(x) #x
#define FASTREG_STR(x) FASTREG_STR_(x)

PYBIND11_MODULE(_C, m) {
  m.attr("built_with_torch") = FASTREG_STR(FASTREG_BUILT_WITH_TORCH);  // set by setup.py
  m.attr("cpu_clone") = fastreg::cpu_clone();  // the CPU kernels' clone on this CPU
  // The CPU Philox path: "avx512", "avx2" or "portable" (cpu_features.h).
  m.def("philox_isa", [] { return std::string(fastreg::philox_isa_name(fastreg::philox_isa())); });
  m.def("set_philox_isa", [](const std::string& name) {
    if (!fastreg::set_philox_isa(name)) {
      throw pybind11::value_error("set_philox_isa: '" + name +
                                  "' is not a Philox path this CPU "
                                  "runs (portable, avx2, avx512)");
    }
  });
#ifdef FASTREG_WITH_CUDA
  m.attr("cuda_kernels") = true;
#else
  m.attr("cuda_kernels") = false;
#endif
  fastreg::bind_penalty_front(m);  // the penalty API's fast path (fastreg/penalty.py)
}
