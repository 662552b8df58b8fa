"""The peer runners of ``benchmarks/peers`` (CacheGen via LMCache, kvpress evictions).

The tests that need a peer environment (``make peers-env``: ``.venv-lmcache``,
``.venv-kvpress``) skip without it; ``make test-peers`` builds them and runs this file.
Everything runs for real: the SmolLM2 model, real text, the installed peer packages.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "benchmarks" / "peers"
sys.path.insert(0, str(PEERS))

from merge import merge_rows
from protocol import (
    CONT,
    CTX,
    continue_and_greedy,
    load_kv,
    load_windows,
    save_kv,
    save_windows,
)

LMCACHE_PY = ROOT / ".venv-lmcache" / "bin" / "python"
KVPRESS_PY = ROOT / ".venv-kvpress" / "bin" / "python"


def _model_dir(model) -> Path:
    path = Path(model.config._name_or_path)
    assert (path / "config.json").is_file(), "the converted SmolLM2 folder is expected"
    return path


def test_merge_keeps_other_rows_and_replaces_own(tmp_path):
    path = tmp_path / "quality.json"
    legacy = {
        "command": "python benchmarks/quality.py",
        "rows": [
            {"method": "kvtc", "target_ratio": 8, "kl": 0.007},
            {"method": "cachegen", "target_ratio": None, "kl": 9.9},
            {"method": "kvpress-snapkv", "target_ratio": 2.0, "kl": 9.9},
            {"method": "kvpress-snapkv", "target_ratio": 16.0, "kl": 0.5},
        ],
    }
    path.write_text(json.dumps(legacy))
    new = [
        {"method": "cachegen", "target_ratio": None, "kl": 0.05},
        {"method": "kvpress-snapkv", "target_ratio": 2, "kl": 0.01},
    ]
    merge_rows(path, new, "peers-1", {"windows": [0, 16]})
    doc = json.loads(path.read_text())
    assert doc["runs"] == {
        "legacy": {"command": "python benchmarks/quality.py"},
        "peers-1": {"windows": [0, 16]},
    }
    rows = {(r["method"], r["target_ratio"]): r for r in doc["rows"]}
    assert len(doc["rows"]) == 4  # the stale snapkv 2.0 row replaced, not kept beside
    # the peers' rows are of the two-text windows of the suite before issue 17
    v1 = {"run": "peers-1", "genre": "suite-v1"}
    assert rows[("cachegen", None)] == {**new[0], **v1}
    assert rows[("kvpress-snapkv", 2.0)] == {**new[1], **v1}
    for key, kl in ((("kvtc", 8), 0.007), (("kvpress-snapkv", 16.0), 0.5)):
        assert rows[key]["kl"] == kl and rows[key]["run"] == "legacy"  # others' rows kept
    # a second run of the same rows replaces them, and the unused run goes away
    doc = merge_rows(path, new, "peers-2", {})
    assert set(doc["runs"]) == {"legacy", "peers-2"} and len(doc["rows"]) == 4
    with pytest.raises(ValueError, match="method"):
        merge_rows(path, [{"kl": 1.0}], "x", {})
    path.write_text("[1, 2]")
    with pytest.raises(TypeError, match="rows"):
        merge_rows(path, new, "x", {})


def test_windows_file_round_trip_and_shape_check(tmp_path):
    ids = torch.randint(0, 49152, (2, CTX + CONT))
    save_windows(tmp_path / "w.safetensors", ids, ["a", "b c"])
    got, names = load_windows(tmp_path / "w.safetensors")
    assert torch.equal(got, ids) and names == ["a", "b c"]
    with pytest.raises(ValueError, match="windows must be"):
        save_windows(tmp_path / "x.safetensors", ids[:, :100], ["a", "b"])


@pytest.mark.model
def test_continue_and_greedy_matches_the_evaluate_path(smollm2, doc_kv, one_thread):
    """Explicit positions give the logits kvtc_store.evaluate computes; greedy stops at the
    first token differing from the reference and reports the common prefix."""
    from kvtc_store.evaluate import continuation_logits
    from kvtc_store.model import cache_from_kv

    model, _, _ = smollm2
    ids, keys, values = doc_kv
    n_ctx, n = 600, 12
    k, v = keys[:, :, :n_ctx], values[:, :, :n_ctx]
    cont = ids[n_ctx : n_ctx + 50]

    def run(reference=None):
        return continue_and_greedy(model, cache_from_kv(k, v), cont, reference, n_ctx, n)

    ref = continuation_logits(model, k, v, cont)
    logits, greedy, matched = run()
    assert torch.allclose(logits, ref, atol=1e-4)
    assert greedy.numel() == n and matched == n
    assert int(greedy[0]) == int(ref[0].argmax())
    _, again, matched = run(greedy)
    assert torch.equal(again, greedy) and matched == n
    wrong = greedy.clone()
    wrong[5] = (wrong[5] + 1) % 49152
    _, stopped, matched = run(wrong)
    assert matched == 5 and stopped.numel() == 6


@pytest.mark.model
@pytest.mark.skipif(
    not LMCACHE_PY.exists(),
    reason="needs .venv-lmcache (`make test-peers` builds it; CI runs it)",
)
def test_cachegen_serde_round_trips_a_real_chunk(smollm2, doc_kv, tmp_path):
    """A real 256-token SmolLM2 chunk through LMCache's CacheGen serde: shape kept, every
    element within its quantisation bound, and smaller than bf16."""
    model, _, info = smollm2
    _, keys, values = doc_kv
    k, v = keys[:, :, 256:512].to(torch.bfloat16), values[:, :, 256:512].to(torch.bfloat16)
    save_kv(tmp_path / "in.safetensors", k, v)
    cmd = [str(LMCACHE_PY), str(PEERS / "cachegen_serde.py"), "--model", str(_model_dir(model))]
    cmd += ["--once", str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors")]
    done = subprocess.run(cmd, check=False, cwd=PEERS, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reply = json.loads(done.stdout.strip().splitlines()[-1])
    out = load_kv(tmp_path / "out.safetensors")
    assert out["keys"].shape == k.shape == (30, 3, 256, 64)
    assert out["keys"].dtype == torch.bfloat16 and out["values"].shape == v.shape
    # LMCache's bins for a 30-layer model: keys 32 in layers 0-9, 16 after; values 32 in
    # layers 0-1, 16 after. Each (layer, token) row of H*D channels is scaled by its max
    # |x| into bins // 2 - 1 levels each side: the error is at most half a step, plus
    # bf16 rounding of the scale and of the decoded value.
    for name, x, first in (("keys", k, 10), ("values", v, 2)):
        x = x.float()
        levels = torch.full((30, 1, 1), 7.0)
        levels[:first] = 15.0
        rows = x.permute(0, 2, 1, 3).reshape(30, 256, -1)
        err = (out[name].float() - x).permute(0, 2, 1, 3).reshape(30, 256, -1).abs()
        scale = rows.abs().amax(-1, keepdim=True)
        bound = scale * (0.5 / levels + 2 * 2**-8)
        assert (err <= bound).all(), f"{name}: max excess {(err - bound).max():.4g}"
        assert err.mean() > 0  # it is lossy: the round trip went through the quantiser
    raw = 256 * info.kv_bytes_per_token_bf16
    serde, deflated = int(out["chunk_bytes"][0]), int(out["chunk_deflate_bytes"][0])
    assert reply["bytes"] == serde
    assert 2.0 < raw / serde < 8.0 and deflated < serde


@pytest.mark.model
@pytest.mark.skipif(
    not KVPRESS_PY.exists(),
    reason="needs .venv-kvpress (`make test-peers` builds it; CI runs it)",
)
def test_kvpress_replay_equals_pressed_prefill(smollm2, tmp_path):
    """The one-prefill replay of each press gives the cache a prefill under that press
    gives, tensor for tensor (real text, kvpress's own hooks)."""
    from kvtc_store.demo import document_ids

    model, tok, _ = smollm2
    ctx, cont = document_ids(tok, CTX)
    save_windows(tmp_path / "w.safetensors", torch.cat([ctx, cont])[None], ["python-docs"])
    cmd = [str(KVPRESS_PY), str(PEERS / "kvpress_presses.py"), "--model", str(_model_dir(model))]
    cmd += ["--windows", str(tmp_path / "w.safetensors"), "--check-replay", "384"]
    cmd += ["--presses", "snapkv", "knorm", "expected_attention", "--ratios", "4", "--threads", "1"]
    done = subprocess.run(cmd, check=False, cwd=PEERS, capture_output=True, text=True, timeout=600)
    lines = done.stdout.strip().splitlines()
    assert lines, done.stderr[-3000:]
    res = json.loads(lines[-1])
    assert done.returncode == 0, (res, done.stderr[-3000:])
    assert res == {p: {"same": True, "kept": 96} for p in ("snapkv", "knorm", "expected_attention")}
