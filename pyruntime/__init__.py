"""pyruntime: data, tensor, pipeline and ZeRO parallel training of LLMs on one device mesh."""
__version__ = "0.1.0"
