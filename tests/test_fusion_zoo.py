"""FuseShuffleGroupConv on every zoo model: every shuffle goes, nothing else changes.

Numerics of every fused model against PyTorch are in test_compile.py (fusion is the default).
"""

import pytest
from conftest import ZOO_MODELS, zoo_import

from tvmshuffle import kernels, pipeline, targets
from tvmshuffle.models import zoo

SHAPE = (1, 3, 64, 64)


def shuffle_calls(rows):
    return sum(k.calls for k in rows if k.standalone_shuffle)


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO_MODELS)
def test_every_shuffle_is_fused(name):
    spec = zoo.MODELS[name]
    preset = targets.resolve("host")
    imported = zoo_import(name, SHAPE)
    before = kernels.list_kernels(pipeline.lower(imported.mod, preset, fuse=False))
    after = kernels.list_kernels(pipeline.lower(imported.mod, preset, fuse=True))
    # 16 units (4 + 8 + 4), one shuffle each, except V1 with one group (no shuffle at all).
    expected_shuffles = 0 if spec.groups == 1 else 16
    assert shuffle_calls(before) == expected_shuffles
    assert shuffle_calls(after) == 0
    assert not any(k.standalone_shuffle for k in after)
    fused_calls = sum(k.calls for k in after if k.fused_shuffle_conv)
    if spec.groups is not None:  # V1: each shuffle feeds one depthwise conv
        assert fused_calls == expected_shuffles
    else:
        # V2: a stride-1 unit's shuffle+split feeds one conv (the other half is gathered into the
        # next concat): 13 units. The shuffles before stages 3 and 4 feed both branches of a
        # stride-2 unit: 2 x 2. The last shuffle feeds conv5: 1.
        assert fused_calls == 13 + 2 * 2 + 1
    # The model computes the same number of MACs either way: fusion moves no arithmetic.
    assert sum(k.macs * k.calls for k in before) == sum(k.macs * k.calls for k in after)
