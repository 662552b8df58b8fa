"""Connectors: plug the store into inference engines.

- :mod:`kvtc_store.connectors.transformers`: prefix-cache reuse for Hugging Face
  transformers (``DynamicCache``); used by the demo and the quality benchmark.
- :mod:`kvtc_store.connectors.engine`: the store opened for a serving engine's model.
- :mod:`kvtc_store.connectors.vllm`: vLLM's KV connector (``KVTCConnector``; needs vllm),
  with :mod:`kvtc_store.connectors.vllm_layout` reading vLLM's paged KV layout.
"""
