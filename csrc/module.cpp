// The Python module pyruntime._C. Importing it also registers the torch.library ops
// (torch.ops.pyruntime.*) defined in torch_ops.cpp, which are part of the same library.
#include "bindings.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyruntime C++ core: flat-buffer layout planning, pipeline schedules, multi-tensor ops";
  pyruntime::bind_flat_layout(m);
  pyruntime::bind_schedule(m);
}
