// Declarations of the pybind11 binding functions gathered into pyruntime._C by module.cpp.
// Each lives in its own csrc/py_*.cpp, which includes pybind11 only (not torch), so it
// compiles in seconds. Tensor ops are registered with torch.library in torch_ops.cpp.
#pragma once
#include <pybind11/pybind11.h>

namespace pyruntime {
void bind_flat_layout(pybind11::module_& m);  // py_flat_layout.cpp
void bind_schedule(pybind11::module_& m);     // py_schedule.cpp
}  // namespace pyruntime
