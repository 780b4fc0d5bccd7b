"""mm's engine: an importable library with no CLI code, no typer and no dvc (see docs/design.md).

The top level is the shared core every part may import: params (params.yaml as typed
sections), params_data and params_train (its data, tokenizer and schedule fields), architecture (presets and
model.json), errors, atomic (whole-file writes), hardware (device, dtype, peak FLOP/s)
and verify (re-hashing anything mm wrote). The parts, in the order they may import
each other: data, model → checkpoint → export → evaluate → train.
"""
