"""The study's settings (:class:`StudyConfig`) and what every part of it shares."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from .. import targets
from ..errors import UserError
from ..remote import check_rpc_args
from ..frontend import DEFAULT_INPUT_SHAPE
from ..runtime import ThreadConfig

log = logging.getLogger(__name__)

SCHEDULES = ("default", "hand", "tuned")
#: ``<records root>/<target>/study``: where the study's tuning records live
STUDY_RECORDS = "study"
FAMILIES = ("shufflenet_v1", "shufflenet_v2")


@dataclass
class StudyConfig:
    """What ``tvmshuffle study`` is asked to do."""

    target: str = "host"
    #: zoo names; None: every ShuffleNet V1 (g = 1, 2, 3, 4, 8) and V2 model of the zoo
    models: list[str] | None = None
    input_shape: tuple[int, ...] = DEFAULT_INPUT_SHAPE
    #: a records dir (has a tuning database or target.json) or a root like ``tuning_logs/``
    #: (``<root>/<target>/study`` first, then the other fused records dirs of the target);
    #: None: the default root (:func:`tvmshuffle.records.default_root`)
    tuning_records: Path | None = None
    #: 0: no tuning (layers without records: tuned "missing"); N: every layer gets N trials
    #: in the study records dir first (resumable: trials already there count)
    trials_per_layer: int = 0
    rpc_tracker: str | None = None
    rpc_key: str | None = None
    number: int = 20
    repeat: int = 15
    #: the first N distinct layers only (the models after the one that completes them are
    #: not read: their ``models`` and ``calls`` then count the models read)
    layers_limit: int | None = None
    #: TVM threads where the layers run (``--threads``; on a device, set through its session);
    #: None: here ``TVM_NUM_THREADS`` if set, else every core (TVM's own default halves the
    #: cores on x86, for hyper-threads), on a device its pool as it is
    threads: int | None = None
    #: ``--affinity big|little|default`` of TVM's thread pool (None: as it is)
    affinity: str | None = None
    tolerance: float = 1e-4
    cross_compiler: str | None = None
    seed: int = 0
    #: size of each of the three arrays of the bandwidth kernel, MB
    bandwidth_mb: int = 64
    #: RPC: one session per layer, ended by the device after this many seconds
    session_timeout: float = 600.0
    #: RPC: seconds a remote step may go without an answer (``--rpc-timeout``)
    rpc_timeout: float = 120.0
    #: tqdm bars on stderr (on a terminal only)
    progress: bool = True
    #: more :class:`tvmshuffle.tuning.TuneConfig` fields for the tuning (e.g. search_population)
    tune_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.input_shape is not None:
            self.input_shape = tuple(int(v) for v in self.input_shape)
            if len(self.input_shape) != 4 or any(v <= 0 for v in self.input_shape):
                raise UserError(f"--input-shape: expected four positive integers, got {self.input_shape}")
        if self.tuning_records is not None:
            self.tuning_records = Path(self.tuning_records)
        if self.number < 1 or self.repeat < 1:
            raise UserError("--number and --repeat must be >= 1")
        if self.trials_per_layer < 0:
            raise UserError(f"--trials-per-layer must be >= 0, got {self.trials_per_layer}")
        if self.layers_limit is not None and self.layers_limit < 1:
            raise UserError(f"--limit must be >= 1, got {self.layers_limit}")
        ThreadConfig(self.threads, self.affinity)  # --threads >= 1, --affinity one of the modes
        check_rpc_args(self.rpc_tracker, self.rpc_key, self.rpc_timeout)
        if self.models is not None and not self.models:
            raise UserError("--model: give at least one model (or none for the whole zoo)")


def _preset(config: StudyConfig, wait: bool = False) -> targets.TargetPreset:
    """The target, checked to run where the study measures (``wait``: a free device there)."""
    from ..devices import check_device

    preset = targets.resolve(config.target, config.cross_compiler)
    check_device(preset, config.rpc_tracker, config.rpc_key, config.rpc_timeout, wait=wait)
    return preset


def _bar(iterable, config: StudyConfig, **kwargs):
    from tqdm import tqdm

    return tqdm(iterable, disable=None if config.progress else True, dynamic_ncols=True, **kwargs)


