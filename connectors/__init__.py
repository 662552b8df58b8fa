"""Connectors: plug the store into inference engines.

- :mod:`kvtc_store.connectors.transformers`: prefix-cache reuse for Hugging Face
  transformers (``DynamicCache``); used by the demo and the quality benchmark.
- :mod:`kvtc_store.connectors.lmcache`: an LMCache (0.5.6) L2 adapter over our tiers;
  importing it registers the LMCache serde ``kvtc``
  (:mod:`kvtc_store.connectors.lmcache_serde`). Needs ``lmcache``; docs/engines/lmcache.md.
"""
