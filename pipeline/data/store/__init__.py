"""The token store `tokens.zarr`: its layout, its writer and its memory-mapped reader.

layout (names, attribute keys, checksums), writer (parts published atomically),
reader (`open_store`: checks, mmap), views (chunk files and parts as one array)
guard (every batch's ids below the vocabulary), and in object storage remote (URLs, the
client), cache (chunks fetched into a bounded local cache) and upload (parts published
marker last). May import the shared core and `pipeline.data`; imported by data's tokenize,
training, evaluation and verify.
"""
