"""Checkpoints out to the formats other tools read, and those formats back into mm.

exporter (`mm export`), hf_format (Hugging Face weights, config.json, tokenizer
files), gguf (llama.cpp), model_card (the export's README.md), manifest
(SHA256SUMS), loading (a checkpoint or an export → model + tokenizer), and hf_config /
hf_import (a Hugging Face model directory back into model.json and weights). May
import the shared core, data, model and checkpoint; imported by evaluate,
train (samples during training) and the export stage.
"""
