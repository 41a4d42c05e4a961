"""`--augment degradations`: RandAugment plus wbc.degrade damage on the uint8 crop."""

import random

import numpy as np
import torch

from tests.fixtures import make_tiny_store, stained_image
from wbc.data import AUGMENTS, TensorDegradation, train_transform
from wbc.engine.stage1.train import Stage1Config, train


def test_registered_and_shape_preserving():
    assert "degradations" in AUGMENTS.names()
    x = torch.from_numpy(stained_image(np.random.default_rng(0), size=48)).permute(2, 0, 1).contiguous()
    torch.manual_seed(0)
    random.seed(0)
    y = train_transform("degradations")(x)
    assert y.shape == x.shape and y.dtype == torch.uint8


def test_tensor_degradation_applies_a_real_degradation():
    img = stained_image(np.random.default_rng(1), size=48)
    x = torch.from_numpy(img).permute(2, 0, 1).contiguous()
    random.seed(3)
    always = TensorDegradation(p=1.0)
    outs = [always(x) for _ in range(8)]
    assert all(not torch.equal(o, x) for o in outs)  # p=1: every call damages the image
    random.seed(3)
    assert all(torch.equal(a, always(x)) for a in outs)  # reproducible from the seed
    never = TensorDegradation(p=0.0)
    assert torch.equal(never(x), x)


def test_training_with_degradations_is_reproducible(tmp_path):
    """Two runs with the same seed give the same weights (workers=0 draws from `random`)."""
    store = make_tiny_store(tmp_path / "s.h5", n_per_class=6, size=40)
    cfg = Stage1Config(backbone="test_resnet", pretrained="none", epochs=1, batch_size=8, crop=32,
                      workers=0, augment="degradations", seed=0)
    (a,) = train(store, tmp_path / "a", cfg, fold=0)
    (b,) = train(store, tmp_path / "b", cfg, fold=0)
    wa = torch.load(a / "last.pt", map_location="cpu", weights_only=True)["model"]
    wb = torch.load(b / "last.pt", map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_no_warning_for_read_only_degradation_results():
    """PIL-backed degradations (blur, JPEG) return read-only arrays; handing one to torch printed
    a UserWarning from every DataLoader worker of a `--augment degradations` run. torch warns once
    per process, so the check runs in a fresh one, with warnings as errors."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import random, numpy as np, torch\n"
        "from tests.fixtures import stained_image\n"
        "from wbc.data import TensorDegradation\n"
        "x = torch.from_numpy(stained_image(np.random.default_rng(1), size=32)).permute(2, 0, 1).contiguous()\n"
        "random.seed(0)\n"
        "d = TensorDegradation(p=1.0)\n"
        "for _ in range(40):\n"
        "    d(x)\n"
    )
    r = subprocess.run([sys.executable, "-W", "error", "-c", code], check=False, capture_output=True, text=True,
                       cwd=str(Path(__file__).resolve().parents[1]), timeout=120)
    assert r.returncode == 0, r.stderr[-800:]
