"""tvmshuffle: deploy ShuffleNet-style networks with Apache TVM (Relax).

The pipeline, top to bottom, lives in :mod:`tvmshuffle.pipeline`:
import (:mod:`tvmshuffle.frontend`) → fuse (:mod:`tvmshuffle.passes`) → tune
(:mod:`tvmshuffle.tuning`) → build (:mod:`tvmshuffle.targets`) → run/measure
(:mod:`tvmshuffle.runtime`).
"""

__version__ = "0.1.0"
