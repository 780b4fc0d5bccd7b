"""Raw text to token ids and back out as training windows.

Reading inputs (JSONL, gzip, zstd, Parquet, `datasets` directories), the
embedded sample corpus, training and loading tokenizers, `mm tokenize` and its
worker processes, the sources table (sources), and the order samples are drawn in (mixture,
sampler, shuffle). The
token store itself is `data/store/`. May import the shared core (errors,
atomic, params_data) and nothing of model, checkpoint, train, export or
evaluate; imported by all of them and by the data stages.
"""
