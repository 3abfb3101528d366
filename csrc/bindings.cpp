// rlr_kernels._C: the C++ CPU kernels of both ops (the "cpp" backend of rlr_kernels).
// rlr_kernels/cpp.py wraps this module; dispatch.py calls it through torch.library custom ops.
#include <torch/python.h>

#include "cpu/kernels.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rlr_kernels C++ CPU kernels: local reference attention and masked key attention";
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("local_forward", &rlr::cpu::local_forward, nogil, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("height"), py::arg("width"), py::arg("window"));
  m.def("local_backward", &rlr::cpu::local_backward, nogil, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse"), py::arg("grad_out"), py::arg("height"), py::arg("width"), py::arg("window"));
  m.def("masked_forward", &rlr::cpu::masked_forward, nogil, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("height"), py::arg("width"), py::arg("window"));
  m.def("masked_amx_available", &rlr::cpu::masked_amx_available,
        "whether bfloat16 masked attention runs on AMX tiles here (L, d multiples of 16; RLR_CPU_AMX=0 disables)");
  m.def("masked_float32_path", &rlr::cpu::masked_float32_path,
        "'flash' where float32 masked attention runs on ATen's CPU flash attention (no AVX-512 here), "
        "else 'kernel' (RLR_CPU_MASKED=kernel|flash overrides)");
  m.def("masked_flash_mask_cache", &rlr::cpu::masked_flash_mask_cache,
        "(masks, bytes): the (L, L) window masks the flash path keeps, shared by all threads (at most 4, 128 MiB)");
  m.def("masked_flash_mask_cache_clear", &rlr::cpu::masked_flash_mask_cache_clear,
        "drop the flash path's kept window masks");
  m.def("masked_backward", &rlr::cpu::masked_backward, nogil, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse"), py::arg("grad_out"), py::arg("height"), py::arg("width"), py::arg("window"));
}
