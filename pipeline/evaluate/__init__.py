"""Using a model: scoring windows, `mm eval`, lm-eval benchmarks and `mm generate`.

scoring (nats, tokens and bytes per window; shared with training's validation),
held_out (`mm eval`: val loss, perplexity, bits per byte), benchmarks
(lm-evaluation-harness on an export) and generate (sampling). May import the
shared core, data, model, checkpoint and export; imported by train and the
eval and generate stages.
"""
