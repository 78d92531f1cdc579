"""Chunk codecs for the tiers below memory: fewer bytes to carry, verified on the way back.

Each codec is a plugin registered through ``kvcore_register_codecs``; a tier's setting (for
example ``KVCORE_LMDB_CODEC``) names the one it uses. The memory tier always keeps raw bytes.
Built in: ``shuffle-zstd`` (lossless, needs ``kvcore[compression]``), ``int8`` and ``int4``
(lossy group quantization of bfloat16/float16 KV). ``docs/codecs.md`` has the figures.
"""
