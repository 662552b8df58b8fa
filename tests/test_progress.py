"""Progress during calibration (issue 22: the bar looked hung for half an hour on 2 busy
cores): the model's sampling reports every generation step, not once per batch, without
changing what is sampled; the sensitivity pass reports each run as one count over its
windows; the CLI's bar keeps its elapsed time ticking while nothing calls it."""

from __future__ import annotations

import threading
import time
from contextlib import closing
from itertools import pairwise

import pytest
import torch

from kvtc_store.calibration import CalibrationSettings, calibration_units, collect
from kvtc_store.cli import _ProgressBar
from kvtc_store.model import model_info
from kvtc_store.samples import model_samples
from tests.tiny_models import VOCAB, build, byte_tokenizer, llama3_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    """A tiny random Llama-3-style model and a byte-level tokenizer of its vocabulary."""
    return build(llama3_config()), byte_tokenizer()


def test_sampling_reports_every_step_and_samples_the_same(tiny) -> None:
    model, tok = tiny
    calls: list[tuple[int, int]] = []
    n, max_new, batch = 1200, 32, 4
    plain = model_samples(model, tok, n, seed=5, max_new_tokens=max_new, batch=batch)
    got = model_samples(
        model,
        tok,
        n,
        seed=5,
        max_new_tokens=max_new,
        batch=batch,
        progress=lambda *a: calls.append(a),
    )
    assert got == plain  # reporting changes nothing sampled
    assert all(total == n for _, total in calls)
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[-1] == n
    # batches of 4 prompts (about 70 tokens each here) and 32-token answers: 1,200 tokens
    # take 4 batches, 3 of them ending below n. Reported once per batch, that would be 3
    # distinct counts below n; reported every step, up to 32 per batch, moving by at most
    # one token per row
    below = sorted({d for d in done if d < n})
    assert len(below) >= 2 * max_new, below
    steps = [b - a for a, b in pairwise(below)]
    assert sum(0 < s <= batch for s in steps) >= 2 * max_new - 3, steps


def test_sensitivity_reports_each_run_as_one_count(tiny) -> None:
    model, _ = tiny
    info = model_info(model, "tiny-llama3")
    settings = CalibrationSettings(windows=2, window_tokens=256)
    units = [u for u in calibration_units(settings) if u.kind == "sensitivity"]
    ids = torch.randint(0, VOCAB, (units[-1].end,), generator=torch.Generator().manual_seed(1))
    messages: list[str] = []
    collect(model, ids, units, info, settings, progress=messages.append)
    runs = 2 * model.config.num_hidden_layers * len(units)  # keys and values per layer
    assert messages == [f"layer sensitivity: run {k}/{runs}" for k in range(1, runs + 1)]


def test_the_bar_ticks_while_a_stage_runs_and_stops_when_closed(capsys) -> None:
    with closing(_ProgressBar(refresh_s=0.1)) as progress:
        progress(0, 3, "a long stage")
        time.sleep(1.5)  # nothing calls the bar meanwhile
        err = capsys.readouterr().err
        assert "a long stage" in err
        assert "00:01" in err, err  # redrawn with the elapsed time, unprompted
        progress(1, 3, "the next stage")
        time.sleep(0.3)
        assert "1/3" in capsys.readouterr().err
    assert not any(t.name == "kvtc-progress" for t in threading.enumerate())
    assert capsys.readouterr().err.endswith("the next stage]\n")  # closed, left in place
    time.sleep(0.3)
    assert capsys.readouterr().err == ""  # closed: no more redraws
