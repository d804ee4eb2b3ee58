"""``tvmshuffle study``: every fused ``shuffle_group_conv2d`` layer of the zoo, timed alone.

For each distinct fused layer (a PrimFunc holding the SBlock ``shuffle_group_conv2d``, with
its ``shuffle_pad`` and its bias/ReLU/residual epilogue) of the chosen models, three
schedules are built and measured on the same random inputs:

``default``
    the PrimFunc as :func:`tvmshuffle.pipeline.lower` leaves it, built as is (what an
    untuned model build runs: one thread, no explicit vectorisation);
``hand``
    :func:`tvmshuffle.schedules.schedule_primfunc` (a row says "no hand schedule" when
    none fits);
``tuned``
    the best MetaSchedule record for the layer (``tuning_logs/<target>/study`` by default;
    with ``trials_per_layer`` > 0 the layers are tuned there first, resumably). A layer with
    no record is reported as missing, never left out.

Every variant's output is checked against ``default`` (max error ≤ ``tolerance`` × the
output scale, :func:`tvmshuffle.runtime.check`) before it is timed; a wrong one is reported
as wrong and not timed. Times are medians of ``repeat`` samples of ``number`` runs
(``time_evaluator``), here or on an RPC device (an emulated one is labelled EMULATED and
gets no peak).

Each row also puts the layer on a roofline: FLOPs = 2 × MACs; bytes = the minimum traffic
(every input buffer read once — of the activation only the channels the convolution reads,
half of them in a ShuffleNet V2 unit — and the output written once, fp32); arithmetic
intensity AI = FLOPs / bytes; bound = min(peak, AI × bandwidth), with the fp32 peak measured
where the layers run by :func:`measure_peak` (a TVM kernel of register-resident FMA chains;
:func:`cpu_peak`'s formula beside it) and the bandwidth measured by :func:`measure_bandwidth`.

The package, one concern a module:

* :mod:`.config` — :class:`StudyConfig` (the flags of ``tvmshuffle study``);
* :mod:`.layers` — the distinct fused layers of the models and their analysis (kind, MACs,
  minimum bytes, epilogue), read from the lowered TIR;
* :mod:`.hardware` — the CPU's fp32 peak (measured; the formula's clock measured too), the memory
  bandwidth, TVM's threads;
* :mod:`.measure` — building and timing each layer × schedule here or on an RPC device, and
  :func:`run_study`;
* :mod:`.report` — the results and their JSON, markdown table and roofline plot.
"""

from .config import SCHEDULES, STUDY_RECORDS, StudyConfig
from .hardware import Bandwidth, Peak, cpu_peak, host_clock_ghz, isa_of, measure_bandwidth, measure_peak, peak_kernel
from .layers import Layer, fused_layers, study_models
from .measure import run_study, tune_layers, tuned_funcs
from .report import Row, StudyReport, markdown, plot, to_json, write_outputs

__all__ = [
    "SCHEDULES", "STUDY_RECORDS", "Bandwidth", "Layer", "Peak", "Row", "StudyConfig", "StudyReport",
    "cpu_peak", "fused_layers", "host_clock_ghz", "isa_of", "markdown", "measure_bandwidth", "measure_peak",
    "peak_kernel", "plot", "run_study", "study_models", "to_json", "tune_layers", "tuned_funcs",
    "write_outputs",
]
