// Python bindings of the emulator harness (harness.cpp). A separate translation unit so that
// changing the list of bound functions does not recompile the kernels.
#include <torch/python.h>

#include <string>
#include <vector>

using at::Tensor;

std::vector<Tensor> emu_forward(Tensor u, Tensor x, Tensor fc1, c10::optional<Tensor> fc1i, Tensor fc2,
                                c10::optional<Tensor> pw, c10::optional<Tensor> bw, c10::optional<Tensor> bb,
                                Tensor rm, Tensor rv, std::string mode_s, bool training, double momentum, double eps,
                                int64_t m, int64_t pad, bool cl, std::vector<int64_t> launch);
std::vector<Tensor> emu_backward(Tensor dy, Tensor u, Tensor pu, Tensor px, Tensor gate, Tensor hid, Tensor bm,
                                 Tensor bi, Tensor fc1, c10::optional<Tensor> fc1i, Tensor fc2,
                                 c10::optional<Tensor> pw, c10::optional<Tensor> bw, c10::optional<Tensor> bb,
                                 std::string mode_s, bool training, int64_t m, int64_t pad, bool cl,
                                 std::vector<int64_t> launch);
std::vector<int64_t> emu_plan(int64_t N, int64_t C, int64_t H, int64_t W, std::string mode_s, int64_t e, int64_t r,
                              int64_t m, int64_t pad, bool cl, bool backward, bool training, int64_t elem,
                              bool aligned, std::vector<int64_t> opts, std::vector<int64_t> dev);
std::vector<int64_t> emu_explicit(int64_t N, int64_t C, int64_t H, int64_t W, std::string mode_s, int64_t e, int64_t r,
                                  int64_t m, int64_t pad, bool cl, bool backward, int64_t elem, int64_t threads,
                                  int64_t blocks, int64_t splits, int64_t vec, int64_t cluster, bool per_sample);
void emu_trace(bool on);
std::vector<Tensor> emu_trace_take();
std::vector<std::string> emu_site_names(Tensor sites);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("emu_forward", &emu_forward);
  m.def("emu_backward", &emu_backward);
  m.def("emu_plan", &emu_plan);
  m.def("emu_explicit", &emu_explicit);
  m.def("emu_trace", &emu_trace);
  m.def("emu_trace_take", &emu_trace_take);
  m.def("emu_site_names", &emu_site_names);
}
