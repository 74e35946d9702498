"""Hugging Face model directories in and out: config.json <-> ModelConfig (config.py),
streaming sharded safetensors loading (load.py) and export (export.py)."""
