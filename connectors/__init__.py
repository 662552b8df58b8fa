"""Connectors: plug the store into inference engines.

- :mod:`kvtc_store.connectors.transformers`: prefix-cache reuse for Hugging Face
  transformers (``DynamicCache``); used by the demo and the quality benchmark.
- :mod:`kvtc_store.connectors.engine`: the store opened for a serving engine's model,
  with engine-neutral chunk keys (shared by vLLM and SGLang replicas).
- :mod:`kvtc_store.connectors.sglang`: an SGLang HiCache storage backend
  (``--hicache-storage-backend dynamic``; docs/engines/sglang.md), with
  :mod:`kvtc_store.connectors.sglang_pages` mapping SGLang's page hashes to token ids.
- :mod:`kvtc_store.connectors.vllm`: vLLM's KV connector (``KVTCConnector``; needs vllm),
  with :mod:`kvtc_store.connectors.vllm_layout` reading vLLM's paged KV layout.
- :mod:`kvtc_store.connectors.lmcache`: an LMCache (0.5.6) L2 adapter over our tiers;
  importing it registers the LMCache serde ``kvtc``
  (:mod:`kvtc_store.connectors.lmcache_serde`). Needs ``lmcache``; docs/engines/lmcache.md.
"""
