"""The recipe sweep's rows are valid pretrain runs: a typo'd knob or a crop that is no multiple of the patch fails
here in seconds, not after the rows before it have trained for minutes (`make sweep`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from benchmarks.recipe_sweep import DEFAULT_ROWS, SWEEP
from dinov2_core.models import build_backbone
from tasks.params import load_params
from tasks.train_launch import check_crops

REPO = Path(__file__).resolve().parents[1]


def test_row_names_are_unique_and_the_default_list_leaves_out_only_the_long_rows_and_the_smoke_row():
    names = [name for name, _, _ in SWEEP]
    assert len(names) == len(set(names))
    assert set(names) - set(DEFAULT_ROWS) == {n for n in names if n.startswith("long-")} | {"smoke"}


@pytest.mark.parametrize("name, overrides", [(name, overrides) for name, _, overrides in SWEEP])
def test_every_row_loads_and_its_crops_fit_its_patch(name, overrides):
    params = load_params(REPO / "params.yaml", overrides)
    check_crops("pretrain", params.pretrain.crops, params.model.patch_size)


def test_the_patch_7_row_trains_on_an_8x8_token_grid():
    params = load_params(REPO / "params.yaml", {n: o for n, _, o in SWEEP}["patch-7"])
    size = params.pretrain.crops.global_crops_size
    backbone = build_backbone(replace(params.model, img_size=size))
    tokens = backbone.forward_features(torch.zeros(1, 3, size, size))["x_norm_patchtokens"]
    assert tokens.shape[1] == 8 * 8

