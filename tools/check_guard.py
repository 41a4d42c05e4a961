"""The in-domain guard of `wbc adapt` on the sets bench_crosslab.py built (run it first, OUT=cache/xlab-a1):
JTSC and PBC-LT test subsets clean / stain-jittered / blurred; prints the shift share, whether AdaBN
ran, and Macro-F1 (labels only score). Usage: python tools/check_guard.py [OUT] [JTSC manifest]"""

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tools.bench_crosslab import score
from wbc.adapt import AdaptConfig, adapt


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "cache/xlab-a1"
    jtsc = sys.argv[2] if len(sys.argv) > 2 else str(ROOT.parent / "shared/data/jtsc/manifest.csv")
    sets = {"jtsc": (jtsc, out / "ensemble.yaml", "SNE=NE,BNE=NE")}
    for d in ("none-0", "stain_jitter-4", "gaussian_blur-3"):
        sets[d] = (out / "pbc-sets" / d / "manifest.csv", out / "ensemble-pbc.yaml", None)
    for name, (manifest, ens, label_map) in sets.items():
        res = adapt(manifest, ens, out / "guard" / name / "adapted.yaml", AdaptConfig(device="cpu"))
        classes = yaml.safe_load(Path(ens).read_text())["class_names"]
        s = score(res, Path(manifest), classes, label_map)
        st = res.doc["steps"]
        print(f"{name}: {100 * st['shift']['share_beyond_val95']:.1f}% beyond the in-domain 95th percentile, "
              f"AdaBN {'on' if st['bn']['enabled'] else 'off'}, zoom {st['zoom']['zoom']}, MF1 {100 * s['mf1']:.1f}")


if __name__ == "__main__":
    main()
