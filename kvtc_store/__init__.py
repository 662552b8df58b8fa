"""kvtc-store: a tiered KV-cache store with KV Cache Transform Coding compression.

Layers, top to bottom (imports point one way):

- ``kvtc_store.connectors``: transformers (and later vLLM, SGLang, LMCache) integration;
- ``kvtc_store.store``: chunk keys, the tiered store;
- ``kvtc_store.codec``: calibration, encode/decode (tensors and bytes only);
- ``kvtc_store.backends``: storage tiers (bytes and keys only).
"""

__version__ = "0.1.0"
