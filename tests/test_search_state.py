"""The searches' typed, versioned state: a state file round-trips through its dataclass, a version-1
file (written before the state was typed) migrates, a newer one is refused, and one made for another
run is refused by name."""

from __future__ import annotations

import json

import pytest

from recipes.search.engine import STATE_VERSION, StateFile, migrate_state
from recipes.search.layerwise import DefaultState
from recipes.search.mixed import MixedState
from recipes.search.paper import PaperState

FINGERPRINT = {"model": "abc", "calib": "c", "dev": "d", "wbits": 8, "abits": 8, "num_bins": 2048}
# a paper-recipe state file as version 1 wrote it: one dict for every recipe, no version
V1_PAPER = {"fingerprint": FINGERPRINT, "float_wer": 12.5, "stage1": {"a.input_quantizer": 13.0},
            "stage2": {"0.0": 12.75}, "errors": {"fp32": {"word_edits": [1]}}}


def test_state_round_trips_through_json(tmp_path):
    path = tmp_path / "state.json"
    store = StateFile(path, DefaultState, FINGERPRINT, resume=False)
    store.state.starts["max/max"] = {"kl": 0.5, "wer": 20.0}
    store.state.layer_batches["q"] = {"mse": [0.1, 0.2]}
    store.state.phases_done.append("starts")
    store.save()
    raw = json.loads(path.read_text())
    assert raw["version"] == STATE_VERSION and raw["phases_done"] == ["starts"]
    again = StateFile(path, DefaultState, FINGERPRINT, resume=True).state
    assert again == store.state


def test_version_1_files_migrate(tmp_path):
    path = tmp_path / "state.json"
    path.write_text(json.dumps(V1_PAPER))
    state = StateFile(path, PaperState, FINGERPRINT, resume=True).state
    assert (state.version, state.phases_done, state.float_wer, state.stage1, state.stage2, state.errors) == \
        (STATE_VERSION, [], 12.5, V1_PAPER["stage1"], V1_PAPER["stage2"], V1_PAPER["errors"])
    # a mixed state from before CTC scoring: no sensitivity_ctc, so the search recomputes those
    old_mixed = {**V1_PAPER, "stage1": {}, "stage2": {}, "sensitivity": {"l": {"float": 0.0, "W8A8": 0.1}}}
    path.write_text(json.dumps(old_mixed))
    mixed = StateFile(path, MixedState, FINGERPRINT, resume=True).state
    assert mixed.sensitivity == old_mixed["sensitivity"] and mixed.sensitivity_ctc == {}
    assert not hasattr(mixed, "stage1")  # keys this recipe does not read are dropped


def test_newer_or_foreign_state_is_refused(tmp_path):
    path = tmp_path / "state.json"
    with pytest.raises(ValueError, match="newer than this tool"):
        migrate_state({**V1_PAPER, "version": STATE_VERSION + 1})
    path.write_text(json.dumps({**V1_PAPER, "version": STATE_VERSION + 1}))
    with pytest.raises(ValueError, match=r"state.json: not a state file written by this tool \(state version"):
        StateFile(path, PaperState, FINGERPRINT, resume=True)
    path.write_text(json.dumps({**V1_PAPER, "stage1": "not a dict", "bogus": 1}))
    with pytest.raises(ValueError, match="'stage1' is a str, not a dict"):
        StateFile(path, PaperState, FINGERPRINT, resume=True)
    path.write_text(json.dumps(V1_PAPER))
    with pytest.raises(ValueError, match="different num_bins, wbits"):
        StateFile(path, PaperState, {**FINGERPRINT, "wbits": 6, "num_bins": 512}, resume=True)
    with pytest.raises(FileExistsError, match="pass --resume"):
        StateFile(path, PaperState, FINGERPRINT, resume=False)


def test_every_baseline_system_has_its_calibrator():
    from recipes.evaluation import systems
    from recipes.search.layerwise import BASELINE_SPECS

    assert systems.BASELINES == tuple(BASELINE_SPECS)  # compare.json's column order is this order
