"""Connectors: plug the store into inference engines.

- :mod:`kvtc_store.connectors.transformers`: prefix-cache reuse for Hugging Face
  transformers (``DynamicCache``); used by the demo and the quality benchmark.
"""
