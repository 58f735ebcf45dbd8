"""Hub constructors load weights from local paths, opener-provided URLs and training checkpoints."""

import io
import pickle
import random

import pytest
import torch

from dinov2_core import hub
from dinov2_core.models import deterministic_state_dict

TINY = {"depth": 1, "img_size": 28}  # real ViT-S/14 widths, cut down in depth and positional table


def _weights(**kw):
    with torch.device("meta"):
        ref = hub.dinov2_vits14(pretrained=False, **kw)
    return deterministic_state_dict(ref, 3)


def test_pretrained_from_local_path(tmp_path):
    sd = _weights(**TINY)
    path = tmp_path / "w.pth"
    torch.save(sd, path)
    m = hub.dinov2_vits14(pretrained=True, weights=str(path), **TINY)
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k])


def test_pretrained_through_opener_for_any_url():
    sd = _weights(num_register_tokens=0, **TINY)
    buf = io.BytesIO()
    torch.save(
        {"teacher": {f"backbone.{k}": v for k, v in sd.items()} | {"dino_head.mlp.0.weight": torch.zeros(1)}},
        buf,
    )
    opened = []

    def opener(url):
        opened.append(url)
        return io.BytesIO(buf.getvalue())

    m = hub.dinov2_vits14(
        pretrained=True, weights="s3://bucket/run/teacher_checkpoint.pth", opener=opener, **TINY
    )
    assert opened == ["s3://bucket/run/teacher_checkpoint.pth"]
    assert torch.equal(m.pos_embed.detach(), sd["pos_embed"])


def test_url_without_opener_is_an_error_and_weights_only_is_enforced(tmp_path):
    with pytest.raises(ValueError):
        hub.load_checkpoint("s3://bucket/x.pth")
    evil = tmp_path / "evil.pth"
    torch.save({"cls_token": torch.zeros(1), "obj": object.__new__(_Custom)}, evil)
    with pytest.raises(ValueError, match=r"evil.pth: not a checkpoint .*\(UnpicklingError: Unsupported global") as err:
        hub.load_checkpoint(evil)
    assert isinstance(err.value.__cause__, pickle.UnpicklingError) and "\n" not in str(err.value)


def test_a_file_that_is_no_checkpoint_is_one_line_naming_it(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"cls_token": torch.zeros(3)}, good)
    (tmp_path / "half.pth").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    for name, why in (("half.pth", "RuntimeError: PytorchStreamReader failed"), ("notes.pth", "UnpicklingError")):
        with pytest.raises(ValueError) as err:
            hub.load_checkpoint(tmp_path / name)
        assert str(err.value).startswith(f"{tmp_path / name}: not a checkpoint") and why in str(err.value)
        assert "\n" not in str(err.value) and len(str(err.value)) < 400


def test_mmap_reads_a_legacy_file_and_garbage_of_any_kind_is_one_line(tmp_path):
    """``mmap=True`` (adapt maps a full checkpoint instead of reading GBs) still reads a file in torch's legacy
    format; bytes that are no checkpoint raise IndexError, KeyError... inside torch's reader (``"hello"`` was a bare
    ``KeyError: 101``): every one is the same one-line ValueError."""
    legacy = tmp_path / "legacy.pth"
    torch.save({"cls_token": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(hub.load_checkpoint(legacy, mmap=True)["cls_token"], torch.ones(2))
    rng = random.Random(0)
    junk = [b"hello", b"\x80\x02", b"PK\x03\x04garbage"] + [rng.randbytes(rng.randrange(1, 200)) for _ in range(100)]
    for i, data in enumerate(junk):
        path = tmp_path / f"junk{i}.pth"
        path.write_bytes(data)
        for mmap in (False, True):
            with pytest.raises(ValueError, match=r"junk\d+\.pth: not a checkpoint") as err:
                hub.load_checkpoint(path, mmap=mmap)
            assert "\n" not in str(err.value)


class _Custom:
    pass


def test_strict_loading_rejects_wrong_arch(tmp_path):
    sd = _weights(**TINY)
    path = tmp_path / "w.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError) as err:
        hub.dinov2_vits14_reg(pretrained=True, weights=str(path), **TINY)  # registers missing from checkpoint
    assert str(err.value) == f"{path}: weights do not fit DinoVisionTransformer: 1 missing (e.g. register_tokens)"
    sd["pos_embed"] = sd["pos_embed"][:, :-1]
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"1 unexpected \(e.g. extra.weight\), 1 of another shape \(e.g. pos_embed "):
        hub.dinov2_vits14(pretrained=True, weights=str(path), **TINY)


def test_default_weights_point_at_release_urls():
    assert (
        hub.checkpoint_url("vit_small")
        == "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"
    )
    assert hub.checkpoint_url("vit_giant2", 14, 4).endswith("/dinov2_vitg14/dinov2_vitg14_reg4_pretrain.pth")
    seen = []

    def opener(url):
        seen.append(url)
        raise FileNotFoundError(url)

    with pytest.raises(FileNotFoundError):
        hub.dinov2_vitb14_reg(pretrained=True, opener=opener, depth=1, img_size=28)
    assert seen == ["https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth"]
