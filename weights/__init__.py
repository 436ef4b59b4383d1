"""Checkpoint I/O shared by both sides: safetensors streaming, the weight-name map, conversion."""
