"""Another lab's images: cell scale, AdaBN, feature alignment, target priors, ADAPTED.yaml.

`adapt(target, ensemble, out, AdaptConfig())` (the `wbc adapt` command) writes ADAPTED.yaml;
`wbc.adapt.apply.load_for_scoring` reads it (or a plain ENSEMBLE.yaml) for predict and
external evaluation.
"""

from wbc.adapt.pipeline import AdaptConfig, AdaptResult, adapt

__all__ = ["AdaptConfig", "AdaptResult", "adapt"]
