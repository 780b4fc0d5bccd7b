"""The network: a Llama/Qwen-style decoder (transformer.py) to be read top to bottom.

Attention kernels for the CPU and for document masks, and the cross-entropy
fused with the tied head. Imports only torch and the standard library, nothing
of the project; everything that trains, exports or scores a model imports it.
"""
