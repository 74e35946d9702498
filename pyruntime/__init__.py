"""pyruntime: data, tensor, pipeline and ZeRO parallel training of LLMs on one device mesh."""
# The extension pyruntime._C links against libtorch / libc10, which only torch's own import
# puts in the process: importing torch here lets `import pyruntime._C` work on its own.
import torch as _torch  # noqa: F401

__version__ = "0.1.0"
