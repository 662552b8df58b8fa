"""Rate-distortion benchmark of KV compression methods (issue 3), one idea per module.

- :mod:`.base`: the method contract (``roundtrip`` of ``(L, H, T, D)`` KV as 256-token
  chunks, stored bytes counted) and the baselines' chunk container;
- methods, one per module: :mod:`.kvtc` (ours), :mod:`.bf16`, :mod:`.fp8`,
  :mod:`.int_group` (int8 per token, int4 group 64), :mod:`.kivi` (KIVI-2); built by name
  in :mod:`.methods`; :mod:`.quantize` holds their shared group quantiser;
- suites: :mod:`.continuation` (quality and greedy agreement), :mod:`.retrieval`
  (RULER-style passkey and multi-key retrieval); :mod:`.engine` runs the model;
  :mod:`.data` holds the held-out texts;
- outputs: :mod:`.accounting` (honest ratios), :mod:`.rows` (``quality.json`` merge),
  :mod:`.targets` (issue-3 targets), :mod:`.report` (Markdown), :mod:`.plots` (PNG).

The entry point is ``benchmarks/rate_distortion.py``.
"""
