"""Backbone aliases, creation, data configs, embeddings and Stage-1 checkpoint loading."""

import pytest
import torch

from wbc.backbones import (
    ALIASES,
    CHECKPOINT_FORMAT,
    create_backbone,
    crop_resize,
    data_config,
    embed,
    load_checkpoint,
    logits_from_embeddings,
    resolve_name,
)
from wbc.errors import WbcError

TINY = "test_resnet"


def test_aliases_and_timm_names():
    assert resolve_name("r50") == "resnet50"
    assert resolve_name("r152") == "resnet152"
    assert resolve_name("swin") == "swin_tiny_patch4_window7_224"
    assert resolve_name("lite1") == "tf_efficientnet_lite1"
    assert resolve_name(TINY) == TINY
    assert resolve_name("resnet50.a1_in1k") == "resnet50.a1_in1k"  # timm tags pass through


def test_unknown_backbone_lists_aliases():
    with pytest.raises(WbcError) as e:
        resolve_name("r51")
    msg = str(e.value)
    for alias in ALIASES:
        assert alias in msg
    assert "timm" in msg and "\n" not in msg


def test_data_config_keeps_paper_ratio():
    model = create_backbone(TINY, 3)
    cfg = data_config(model)
    assert cfg["input_size"] == [3, 224, 224] and cfg["resize"] == 368
    small = data_config(model, crop=160)
    assert small["input_size"] == [3, 160, 160] and small["resize"] == 263 == crop_resize(160)
    assert len(cfg["mean"]) == 3 and len(cfg["std"]) == 3


def test_embed_then_head_equals_forward():
    torch.manual_seed(0)
    model = create_backbone(TINY, 5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        emb = embed(model, x)
        assert emb.shape == (2, model.num_features)
        torch.testing.assert_close(logits_from_embeddings(model, emb), model(x))


def _checkpoint(model, path):
    torch.save({
        "format": CHECKPOINT_FORMAT, "model": model.state_dict(), "timm_name": TINY, "alias": TINY,
        "class_names": ["A", "B", "C"], "store_content_id": "abc", "fold": 0, "config": {},
        "data_config": data_config(model, crop=64), "epoch": 3,
    }, path)


def test_load_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(1)
    model = create_backbone(TINY, 3).eval()
    _checkpoint(model, tmp_path / "best.pt")
    loaded, meta = load_checkpoint(tmp_path / "best.pt", "cpu")
    assert meta["class_names"] == ["A", "B", "C"] and meta["epoch"] == 3 and "model" not in meta
    assert not loaded.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_load_checkpoint_refuses_bad_files(tmp_path):
    with pytest.raises(WbcError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(WbcError, match="not a Stage-1 checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "trunc.pt").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(WbcError, match="cannot read"):
        load_checkpoint(tmp_path / "trunc.pt")


def test_fixed_size_models_follow_the_crop(tmp_path):
    """ViT/Swin are built for one input size: a smaller crop rebuilds them at that size."""
    model = create_backbone("test_vit", 3, crop=32).eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    assert create_backbone(TINY, 3, crop=32).default_cfg["input_size"][-1] != 32  # CNNs untouched
    torch.save({
        "format": CHECKPOINT_FORMAT, "model": model.state_dict(), "timm_name": "test_vit",
        "alias": "test_vit", "class_names": ["A", "B", "C"], "store_content_id": "abc", "fold": 0,
        "config": {}, "data_config": data_config(model, crop=32), "epoch": 1,
    }, tmp_path / "vit.pt")
    loaded, _ = load_checkpoint(tmp_path / "vit.pt")
    assert loaded(torch.randn(1, 3, 32, 32)).shape == (1, 3)
