// The Python module of the CUDA simulator (built by fastreg/_cudasim.py, loaded instead of
// fastreg._C when FASTREG_BACKEND=cudasim): with ops/schema.cpp and the simulated CUDA
// sources it registers fastreg's operators, whose CPU kernels are then the CUDA kernels
// run by the simulator, and the penalty API's fast path (ops/penalty_front.cpp) as
// fastreg._C has it. It also sets the simulator's configuration and runs its self-tests.
#include <torch/extension.h>

#include <string>

#include "sim/runtime.h"

#define FASTREG_STR_(x) #x
#define FASTREG_STR(x) FASTREG_STR_(x)

namespace fastreg {
namespace sim {
// sim/selftest.cpp
at::Tensor selftest(const std::string& name);
std::vector<std::string> selftest_names();
}  // namespace sim
void bind_penalty_front(pybind11::module_& m);  // ops/penalty_front.cpp
}  // namespace fastreg

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace sim = fastreg::sim;
  m.attr("built_with_torch") = FASTREG_STR(FASTREG_BUILT_WITH_TORCH);  // set by the build
  m.attr("cuda_kernels") = false;
  m.attr("cuda_simulator") = true;
  m.def("configure", &sim::configure, pybind11::arg("order"), pybind11::arg("resident_blocks"),
        pybind11::arg("seed") = 0,
        "Sets the block order ('forward', 'reverse', 'random'), the resident blocks that cap "
        "grids, and the random order's seed, for the launches that follow.");
  m.def(
      "config",
      [] {
        const sim::Config& c = sim::config();
        const char* order = c.order == sim::BlockOrder::Forward   ? "forward"
                            : c.order == sim::BlockOrder::Reverse ? "reverse"
                                                                  : "random";
        return pybind11::make_tuple(order, c.resident_blocks, c.seed);
      },
      "(order, resident_blocks, seed) of the launches that follow.");
  m.def(
      "stats",
      [] {
        const sim::Stats& s = sim::stats();
        return pybind11::dict(pybind11::arg("launches") = s.launches,
                              pybind11::arg("blocks") = s.blocks,
                              pybind11::arg("collectives") = s.collectives);
      },
      "Launches, blocks and completed warp collectives so far.");
  m.def("selftest", &sim::selftest, pybind11::arg("name"),
        "Runs one of the simulator's own test kernels; see selftest_names().");
  m.def("selftest_names", &sim::selftest_names);
  fastreg::bind_penalty_front(m);  // the penalty API's fast path, as in fastreg._C
}
