"""The suffix's prefill on a reused prefix, as a serving engine runs it (issue 6's TTFT).

Hugging Face's own path for a prompt whose first ``P`` tokens are cached (a
``DynamicCache`` built from the KV, then ``forward`` of the ``S`` new tokens) spends most
of its time outside the model's arithmetic: on the H200 at P = 32k the cache's
``torch.cat`` copies take 26 ms, ``repeat_kv`` (8 KV heads expanded to 32) 18 ms and the
attention of 16 queries over 32k keys 23 ms, against about 5 ms of weight reads
(``benchmarks/gpu_probe.py``; ``results/gpu_codec.md``). A serving engine instead keeps
the cache in preallocated buffers that the fetched KV is written into, attends with a
split-KV ("flash-decoding") kernel that reads each KV head once for all the query heads
sharing it, and replays the step from a CUDA graph. :class:`SuffixForward` does the
same with the unchanged Hugging Face model:

- a ``StaticCache`` of exactly ``P + S`` positions whose layers are views of two
  ``(L, 1, H, P + S, D)`` tensors: the KV of the prefix is written straight into them
  (:meth:`SuffixForward.prefix_kv`, :meth:`SuffixForward.chunk_views`), and each
  layer's ``update`` writes the suffix's KV at its positions (Hugging Face's own layers
  count tokens across calls, which a replayed step must not);
- attention as one FlashAttention-2 call per layer (:func:`causal_flash_attention`, the
  default): the causal mask aligned to the bottom-right corner, so that new token ``i``
  sees the whole prefix and new tokens up to itself, the KV heads read once for the
  query heads that share them (GQA without ``repeat_kv``), as engines' prefill kernels
  do (Dao, "FlashAttention-2", 2023; whether PyTorch's build also splits the keys across
  the multiprocessors for few queries, as upstream's ``mha_fwd`` can, was not checked:
  what was measured is its time, 9.0 / 11.6 ms at 8k / 32k on the H200). The
  first version, :func:`prefix_suffix_attention` (``attention="split"``), did that by
  hand: the query heads of each KV head packed as rows, the prefix cut into splits
  attended in one batched flash-attention call that returns each split's log-sum-exp,
  the suffix's own ``S x S`` causal block in float32, the parts merged by their
  log-sum-exps (Dao et al., "Flash-Decoding for long-context inference", 2023; the merge
  is the online softmax of FlashAttention, Dao 2022, §3.1); about twenty small kernels a
  layer instead of one;
- the forward captured once in a CUDA graph and replayed (CUDA only).

The logits are checked against Hugging Face's own path in ``gpu_codec.py --ttft`` (H200,
bf16) and in ``tests/test_suffix_forward.py`` (a tiny float32 Llama on the CPU; on CUDA,
the FlashAttention call against the float32 reference and the split version).
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch

ATTN_NAMES = {"flash": "kvtc_causal_flash", "split": "kvtc_prefix_suffix"}


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Unmasked attention of ``q (B, H, M, D)`` over ``k, v (B, H, N, D)``: the output
    ``(B, H, M, D)`` in ``q``'s dtype and the log-sum-exp ``(B, H, M)`` float32 (natural
    log). FlashAttention-2 through PyTorch on CUDA, float32 arithmetic elsewhere."""
    if q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, False, False, scale=scale
        )[:2]
        return out, lse
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.softmax(scores, dim=-1) @ v.float()
    return out.to(q.dtype), lse


def _splits(prefix: int) -> int:
    """How many equal splits of the prefix's keys to attend in parallel: splits of at
    least 512 keys (256 when the prefix is a multiple of 256 only), at most 64."""
    for size in (512, 256):
        if prefix % size == 0:
            n = prefix // size
            while n > 64 and n % 2 == 0:
                n //= 2
            return n
    return 1


def _check_shapes(name: str, query: torch.Tensor, key: torch.Tensor) -> None:
    """ValueError unless batch 1, a cache at least as long as the query, ``Hk | Hq``."""
    b, hq, s, _ = query.shape
    hk, total = key.shape[1], key.shape[2]
    if b != 1 or total < s or hq % hk:
        raise ValueError(f"{name}: query {tuple(query.shape)}, key {tuple(key.shape)}")


def causal_flash_attention(module, query, key, value, attention_mask, scaling=None,
                           dropout=0.0, **kwargs):  # fmt: skip
    """Attention of ``S`` new tokens over a cache holding exactly ``P`` earlier tokens
    and themselves, in one FlashAttention-2 call (Hugging Face attention-function
    signature; module docstring).

    On CUDA in float16/bfloat16: ``aten._scaled_dot_product_flash_attention`` with
    ``is_causal``, which FlashAttention-2 aligns to the bottom-right corner when there
    are fewer queries than keys (query ``i`` sees keys ``0 .. P + i``), whereas PyTorch
    documents the mask of ``scaled_dot_product_attention(is_causal=True)`` as aligned
    top-left, hence the direct call.
    Elsewhere (CPU, or a float32 model on CUDA): float32 arithmetic with that mask, all
    ``(Hq, S, P + S)`` scores at once (the reference the tests use; slow for long
    prefixes). The direct call and its bottom-right alignment were checked on torch 2.11
    (tests/test_suffix_forward.py on the H200).

    Args:
        query: ``(1, Hq, S, D)``.
        key, value: ``(1, Hk, P + S, D)``, the whole cache (``Hq`` a multiple of ``Hk``).
        attention_mask: ignored (the mask is the prefix in full plus the causal suffix).
        scaling: softmax scale (default ``D ** -0.5``).

    Returns:
        ``((1, S, Hq, D), None)`` in ``query``'s dtype.

    Raises:
        ValueError: batch other than 1, a cache shorter than the query, or query heads
            that are not a multiple of the KV heads.
    """
    _check_shapes("causal_flash_attention", query, key)
    _, hq, s, d = query.shape
    hk, total = key.shape[1], key.shape[2]
    scale = d**-0.5 if scaling is None else scaling
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        out = torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, 0.0, True, False, scale=scale
        )[0]
        return out.transpose(1, 2).contiguous(), None
    k = key.float().repeat_interleave(hq // hk, dim=1)
    v = value.float().repeat_interleave(hq // hk, dim=1)
    scores = (query.float() @ k.transpose(-1, -2)) * scale  # (1, Hq, S, P + S)
    seen = torch.arange(total, device=query.device)[None, :] <= (
        total - s + torch.arange(s, device=query.device)[:, None]
    )
    out = torch.softmax(scores.masked_fill(~seen, -math.inf), dim=-1) @ v
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def prefix_suffix_attention(module, query, key, value, attention_mask, scaling=None,
                            dropout=0.0, **kwargs):  # fmt: skip
    """:func:`causal_flash_attention`'s result (same arguments, return value and errors)
    the first version's way: split-KV attention by hand, the parts merged by their
    log-sum-exps (module docstring); kept to compare (``SuffixForward(attention="split")``)."""
    _check_shapes("prefix_suffix_attention", query, key)
    _, hq, s, d = query.shape
    hk, total = key.shape[1], key.shape[2]
    scale = d**-0.5 if scaling is None else scaling
    g = hq // hk
    p = total - s
    q = query.reshape(1, hk, g * s, d)  # row j * s + i: query head kv * g + j, token i
    outs, lses = [], []
    if p:
        n = _splits(p)
        kp = key[0, :, :p].view(hk, n, p // n, d).transpose(0, 1)  # (n, Hk, P/n, D)
        vp = value[0, :, :p].view(hk, n, p // n, d).transpose(0, 1)
        out, lse = _attend(q.expand(n, hk, g * s, d).contiguous(), kp, vp, scale)
        outs.append(out.float())
        lses.append(lse)
    ks, vs = key[:, :, p:], value[:, :, p:]  # the suffix's own keys: causal
    scores = (q.float() @ ks.float().transpose(-1, -2)) * scale  # (1, Hk, g*S, S)
    row = torch.arange(g * s, device=q.device) % s
    causal = torch.arange(s, device=q.device)[None, :] <= row[:, None]
    scores = scores.masked_fill(~causal, -math.inf)
    lses.append(torch.logsumexp(scores, dim=-1))
    outs.append(torch.softmax(scores, dim=-1) @ vs.float())
    lse = torch.cat(lses)  # (parts, Hk, g*S)
    w = torch.exp(lse - lse.amax(dim=0, keepdim=True))
    out = (torch.cat(outs) * w[..., None]).sum(0) / w.sum(0)[..., None]  # (Hk, g*S, D)
    out = out.view(1, hk, g, s, d).reshape(1, hq, s, d).transpose(1, 2)
    return out.to(query.dtype).contiguous(), None


def _write_suffix(keys, values, pos, key_states, value_states, *args, **kwargs):
    """A cache layer's ``update``: the new tokens' ``(1, Hk, S, D)`` keys and values go
    to positions ``pos`` of the layer's ``(1, Hk, P + S, D)`` buffers, which are
    returned whole."""
    keys.index_copy_(2, pos, key_states)
    values.index_copy_(2, pos, value_states)
    return keys, values


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for name, fn in ((ATTN_NAMES["flash"], causal_flash_attention),
                     (ATTN_NAMES["split"], prefix_suffix_attention)):  # fmt: skip
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, lambda *args, **kwargs: None)


@contextlib.contextmanager
def _attention(model, name: str):
    """``model`` uses the attention function ``name`` inside the block."""
    cfg = model.config
    old = cfg._attn_implementation
    cfg._attn_implementation = name
    try:
        yield
    finally:
        cfg._attn_implementation = old


class SuffixForward:
    """Logits of the last of ``S`` new tokens after ``P`` cached ones, from buffers the
    prefix's KV is written into (module docstring).

    Args:
        model: a Hugging Face causal LM (Llama family), batch 1.
        suffix_ids: ``(1, S)`` token ids of the new tokens (int64, on the model's device).
        prefix: ``P``, the cached tokens (the suffix sits at positions ``P .. P + S - 1``).
        graph: replay a CUDA graph (default: on CUDA).
        attention: ``"flash"`` (:func:`causal_flash_attention`, default) or ``"split"``
            (:func:`prefix_suffix_attention`, the first version, kept to compare).

    Memory: the cache, ``2 * L * Hk * (P + S) * D`` elements of the model's dtype.

    Raises:
        RuntimeError: ``graph=True`` off CUDA, or a capture CUDA refuses.
        ValueError: an unknown ``attention``.
    """

    def __init__(self, model, suffix_ids: torch.Tensor, prefix: int, graph: bool | None = None,
                 attention: str = "flash"):  # fmt: skip
        import inspect

        from transformers import StaticCache

        if attention not in ATTN_NAMES:
            raise ValueError(f"attention {attention!r}: one of {sorted(ATTN_NAMES)}")
        self.attention = ATTN_NAMES[attention]
        _register()
        self.model, self.prefix = model, prefix
        cfg = model.config
        dev = suffix_ids.device
        s = suffix_ids.shape[1]
        self.ids = suffix_ids.clone()
        self.pos = torch.arange(prefix, prefix + s, device=dev)
        self.position_ids = self.pos[None].clone()
        params = inspect.signature(model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.cache = StaticCache(config=cfg, max_cache_len=prefix + s)
        heads = cfg.num_key_value_heads
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        layers = self.cache.layers
        self.keys = torch.zeros((len(layers), 1, heads, prefix + s, dim), dtype=model.dtype,
                                device=dev)  # fmt: skip
        self.values = torch.zeros_like(self.keys)
        for i, layer in enumerate(layers):  # the layers write where told, not where they count
            layer.keys, layer.values = self.keys[i], self.values[i]
            layer.update = functools.partial(_write_suffix, self.keys[i], self.values[i], self.pos)
        self.graph = None
        self.out = None
        if graph if graph is not None else dev.type == "cuda":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._step()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self._step()

    @torch.no_grad()
    def _step(self) -> torch.Tensor:
        with _attention(self.model, self.attention):
            kwargs = {self.cache_kwarg: self.cache}
            return self.model(self.ids, position_ids=self.position_ids, use_cache=True,
                              logits_to_keep=1, **kwargs).logits  # fmt: skip

    def prefix_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L, Hk, P, D)`` views of the cache's keys and values for the prefix."""
        p = self.prefix
        return self.keys[:, 0, :, :p], self.values[:, 0, :, :p]

    def chunk_views(self, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix as ``(P / chunk, L, Hk, chunk, D)`` views (the codec's ``out``);
        ``P`` must be a multiple of ``chunk`` (tokens), else ``RuntimeError`` (view)."""
        kk, vv = self.prefix_kv()
        layers, heads, p, d = kk.shape
        return tuple(
            x.view(layers, heads, p // chunk, chunk, d).permute(2, 0, 1, 3, 4) for x in (kk, vv)
        )

    def logits(self) -> torch.Tensor:
        """``(1, 1, vocab)`` logits of the last new token, from the KV now in
        :meth:`prefix_kv` (a buffer reused by the next call when graphed)."""
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.out
