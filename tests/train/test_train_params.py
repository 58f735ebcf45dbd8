"""Training params: both profiles validate, wrong values are one-line errors naming the key, and the paper profile's
size/cost is computed on the meta device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tasks.params import ParamsError, load_params

ROOT = Path(__file__).resolve().parents[2]


def test_profiles_validate_with_training_sections():
    tiny = load_params(ROOT / "params.yaml")
    paper = load_params(ROOT / "params.paper.yaml")
    assert tiny.model.arch == "vit_small" and tiny.pretrain.crops.global_crops_size == 56
    assert tiny.adapt.crops.global_crops_size == 2 * tiny.pretrain.crops.global_crops_size
    assert paper.model.arch == "vit_giant2" and paper.model.num_register_tokens == 4
    assert paper.pretrain.data.global_batch_size == 3072 and paper.pretrain.crops.local_crops_number == 8
    assert paper.pretrain.loss.dino_head.n_prototypes == 65536 and paper.pretrain.loss.centering == "sinkhorn_knopp"
    assert paper.adapt.crops.global_crops_size == 518
    assert paper.launch.nproc_per_node * paper.launch.nnodes * 12 == 3072


@pytest.mark.parametrize("override, key", [
    ("model.num_heads=5", "model"),
    ("pretrain.optim.warmup_epochs=1000", "pretrain.optim"),
    ("launch.node_rank=3", "launch"),
    ("pretrain.loss.centering=sk", "pretrain.loss.centering"),
    ("distill.crops.global_crops_size=50", "distill"),
    ("pretrain.crops.blur_probs=[1.0,0.1]", "pretrain.crops.blur_probs"),
    ("pretrain.crops.solarize_prob=1.5", "pretrain.crops.solarize_prob"),
])
def test_bad_training_values_are_one_line_errors(override, key):
    with pytest.raises(ParamsError) as err:
        load_params(ROOT / "params.yaml", [override])
    msg = str(err.value)
    assert key in msg and "\n" not in msg


def test_stage_level_checks(tmp_path):
    from tasks.train_launch import check_batch, check_crops

    p = load_params(ROOT / "params.yaml", ["pretrain.crops.global_crops_size=50", "launch.nproc_per_node=3"])
    with pytest.raises(ParamsError, match="pretrain.crops.global_crops_size: 50 is not a multiple"):
        check_crops("pretrain", p.pretrain.crops, p.model.patch_size)
    with pytest.raises(ParamsError, match="not divisible by the 3 training processes"):
        check_batch("pretrain", p.pretrain.data, p.launch)
    # loader processes take whole shard streams: 3 workers on 4 streams would silently have been 1 (their gcd)
    p = load_params(ROOT / "params.yaml", ["pretrain.data.num_workers=3"])
    with pytest.raises(ParamsError, match=r"pretrain.data.num_workers: 3 .* 4 shard stream\(s\)") as err:
        check_batch("pretrain", p.pretrain.data, p.launch)
    assert "\n" not in str(err.value)
    # the paper profile passes its own checks on 256 GPUs (it asked for 10 workers on 1 stream per GPU before: 1 ran)
    paper = load_params(ROOT / "params.paper.yaml")
    for stage in ("pretrain", "adapt", "distill"):
        data = getattr(paper, stage).data
        check_batch(stage, data, paper.launch)
        assert data.num_workers >= 4 and data.streams // (paper.launch.nproc_per_node * paper.launch.nnodes) >= \
            data.num_workers


def test_default_profile_cost_table():
    from tasks.train_cost import format_cost, train_cost

    cost = train_cost(load_params(ROOT / "params.yaml"))
    for stage in ("pretrain", "adapt", "distill"):
        assert cost[stage]["flops_per_step"] > 0 and cost[stage]["gpu_hours"] > 0
    assert cost["adapt"]["flops_per_step"] / cost["adapt"]["global_batch"] > \
        cost["pretrain"]["flops_per_step"] / cost["pretrain"]["global_batch"]  # higher resolution costs more
    assert "pretrain" in format_cost(cost)
    # memory: one process on CPU holds the whole batch in float32; two processes halve the activations per process
    pre = cost["pretrain"]
    assert cost["activation_bytes_per_value"] == 4 and pre["world_size"] == 1 and pre["batch_per_gpu"] == 64
    assert pre["memory_bytes_per_gpu"] == pre["model_state_bytes_per_gpu"] + pre["activation_bytes_per_gpu"]
    assert pre["model_state_bytes_per_gpu"] >= 16 * pre["trainable_params"]
    two = train_cost(load_params(ROOT / "params.yaml", ["launch.nproc_per_node=2"]))["pretrain"]
    assert two["batch_per_gpu"] == 32 and two["activation_bytes_per_gpu"] == pre["activation_bytes_per_gpu"] // 2
    # activation checkpointing: the profile's figure follows the setting, and both are always reported
    assert not pre["activation_checkpointing"] and pre["memory_bytes_per_gpu"] == \
        pre["memory_bytes_per_gpu_not_checkpointed"]
    ckpt = train_cost(load_params(ROOT / "params.yaml", ["launch.activation_checkpointing=true"]))["pretrain"]
    assert ckpt["memory_bytes_per_gpu"] == ckpt["memory_bytes_per_gpu_checkpointed"] == \
        pre["memory_bytes_per_gpu_checkpointed"]
    states = pre["model_state_bytes_per_gpu"]
    # 4 blocks: 4 inputs + 1 block recomputed against ~20 activations a block keeps (measured: 148 -> 24 MiB saved
    # by the whole step in benchmarks/train_step.py)
    assert ckpt["activation_bytes_per_gpu"] < 0.5 * pre["activation_bytes_per_gpu"]
    assert ckpt["memory_bytes_per_gpu"] - states == ckpt["activation_bytes_per_gpu"]


@pytest.mark.slow
def test_paper_profile_cost_on_the_meta_device(capsys):
    from tasks.train_cost import main

    assert main(["-p", str(ROOT / "params.paper.yaml")]) == 0
    out = capsys.readouterr().out
    assert "vit_giant2" in out and "GPU-hours" in out
    from tasks.train_cost import train_cost

    cost = train_cost(load_params(ROOT / "params.paper.yaml"))
    assert 1.0e9 < cost["pretrain"]["student_params"] < 1.3e9  # ViT-g/14: ~1.1 B parameters
    assert cost["pretrain"]["iterations"] == 625_000 and cost["adapt"]["img_size"] == 518
    assert 5_000 < cost["gpu_hours_total"] < 500_000
    # 3072 images over 256 GPUs in bf16: a step must fit on one 80 GB GPU
    pre = cost["pretrain"]
    assert cost["activation_bytes_per_value"] == 2 and pre["batch_per_gpu"] == 12
    assert 8 * 2**30 < pre["memory_bytes_per_gpu"] < 80 * 2**30
    # with activation checkpointing the 40 blocks keep their inputs: far less, still more than the model states
    assert pre["model_state_bytes_per_gpu"] < pre["memory_bytes_per_gpu_checkpointed"] < \
        0.5 * pre["memory_bytes_per_gpu"]
    assert cost["adapt"]["activation_bytes_per_image"] > 3 * pre["activation_bytes_per_image"]  # 518 px: 5x tokens


def test_hub_spec_rebuilds_the_paper_model_on_the_meta_device():
    """model.json names a hub constructor + kwargs that rebuild the trained architecture key for key."""
    from dataclasses import replace

    import torch

    from dinov2_core import hub
    from dinov2_core.models import build_backbone

    paper = load_params(ROOT / "params.paper.yaml")
    cfg = replace(paper.model, img_size=518)
    name, kwargs = cfg.hub_spec()
    assert name == "dinov2_vitg14_reg" and "ffn_layer" not in kwargs and "num_register_tokens" not in kwargs
    with torch.device("meta"):
        ours = build_backbone(cfg, with_drop_path=False)
        theirs = getattr(hub, name)(pretrained=False, **kwargs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_adapt_init_that_is_no_checkpoint_names_the_param(tmp_path):
    from tasks.adapt import load_full_checkpoint

    full = tmp_path / "full.pth"
    torch.save({"student": {}, "teacher": {}, "config": {}}, full)
    assert set(load_full_checkpoint(str(full))) == {"student", "teacher", "config"}
    (tmp_path / "half.pth").write_bytes(full.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"^adapt\.init: .*half\.pth: not a checkpoint .*full\.pth\)$"):
        load_full_checkpoint(str(tmp_path / "half.pth"))
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(ValueError, match="not a full training checkpoint"):
        load_full_checkpoint(str(tmp_path / "tensor.pth"))
