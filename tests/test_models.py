"""The model zoo: names, paper complexities, shapes, shuffle placement, errors, weights."""

import pytest
import torch

from tvmshuffle.errors import UserError
from tvmshuffle.models import channel_shuffle, shufflenet_v1, shufflenet_v2, zoo

#: one xdist worker runs this module: its module-scoped fixtures are built once
pytestmark = pytest.mark.xdist_group("models")

SMALL_INPUT = (1, 3, 64, 64)

# Paper complexities in MFLOPs (= millions of multiply-accumulates) at 224x224.
# V1: arXiv 1707.01083 Tables 2/3 (1x for every group count; g3 at other widths).
# V2: arXiv 1807.11164 Table 5.
PAPER_MMACS = {
    "shufflenet_v1_g1_x1_0": 143,
    "shufflenet_v1_g2_x1_0": 140,
    "shufflenet_v1_g3_x1_0": 137,
    "shufflenet_v1_g4_x1_0": 133,
    "shufflenet_v1_g8_x1_0": 137,
    "shufflenet_v1_g3_x0_5": 38,
    "shufflenet_v1_g3_x1_5": 292,
    "shufflenet_v1_g3_x2_0": 524,
    "shufflenet_v2_x0_5": 41,
    "shufflenet_v2_x1_0": 146,
    "shufflenet_v2_x1_5": 299,
    "shufflenet_v2_x2_0": 591,
}


@pytest.fixture(scope="module")
def table():
    return {row["name"]: row for row in zoo.model_table()}


def test_zoo_lists_29_models(table):
    v1 = [f"shufflenet_v1_g{g}_x{w}" for g in (1, 2, 3, 4, 8) for w in ("0_25", "0_5", "1_0", "1_5", "2_0")]
    v2 = [f"shufflenet_v2_x{w}" for w in ("0_5", "1_0", "1_5", "2_0")]
    assert sorted(zoo.MODELS) == sorted(v1 + v2)
    assert sorted(table) == sorted(v1 + v2)
    spec = zoo.MODELS["shufflenet_v1_g8_x0_25"]
    assert (spec.family, spec.groups, spec.width) == ("shufflenet_v1", 8, 0.25)
    spec = zoo.MODELS["shufflenet_v2_x1_5"]
    assert (spec.family, spec.groups, spec.width) == ("shufflenet_v2", None, 1.5)
    for row in table.values():
        assert set(row) == {"name", "family", "groups", "width", "macs", "params"}
        assert isinstance(row["macs"], int) and row["macs"] > 0
        assert isinstance(row["params"], int) and row["params"] > 0


@pytest.mark.parametrize("name", sorted(PAPER_MMACS))
def test_macs_match_paper_within_2_percent(table, name):
    ours = table[name]["macs"] / 1e6
    assert abs(ours / PAPER_MMACS[name] - 1) <= 0.02, (name, ours, PAPER_MMACS[name])


def test_v2_params_match_torchvision(table):
    # torchvision's documented parameter counts for the same architecture
    expected = {"x0_5": 1_366_792, "x1_0": 2_278_604, "x1_5": 3_503_624, "x2_0": 7_393_996}
    for width, params in expected.items():
        assert table[f"shufflenet_v2_{width}"]["params"] == params


def test_macs_scale_roughly_with_width_squared(table):
    # MACs(w) / MACs(1x) within a factor 2 of w**2, e.g. 0.25x between 1/32 and 1/8 of 1x;
    # conv1 and the FC layer do not scale with w**2, so exact w**2 is not expected.
    for name, row in table.items():
        family = name.rpartition("_x")[0]
        base = table[f"{family}_x1_0"]["macs"]
        w = row["width"]
        assert w * w / 2 <= row["macs"] / base <= 2 * w * w, (name, row["macs"] / base)
        if w != 1.0:
            assert (row["macs"] > base) == (w > 1.0)


def test_count_macs_on_a_tiny_net():
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3, padding=1, groups=2), torch.nn.Flatten(),
                              torch.nn.Linear(6 * 5 * 5, 10))
    assert zoo.count_macs(net, (1, 4, 5, 5)) == 6 * 5 * 5 * 2 * 9 + 150 * 10
    assert zoo.count_params(net) == 6 * 2 * 9 + 6 + 1500 + 10


def test_stage_channels_rounding():
    assert shufflenet_v1.stage_channels(3, 1.0) == (24, (240, 480, 960))
    assert shufflenet_v1.stage_channels(8, 1.0) == (24, (384, 768, 1536))
    assert shufflenet_v1.stage_channels(3, 0.25) == (12, (60, 120, 240))
    assert shufflenet_v1.stage_channels(4, 0.25) == (12, (80, 144, 272))  # 68 → 80, 136 → 144
    assert shufflenet_v1.stage_channels(8, 0.5) == (16, (192, 384, 768))  # conv1 12 → 16
    for g in shufflenet_v1.GROUPS:
        for w in shufflenet_v1.WIDTHS:
            conv1, stages = shufflenet_v1.stage_channels(g, w)
            c_in = conv1
            for c in stages:
                assert c % g == 0 and (c // 4) % g == 0 and (c - c_in) % g == 0
                c_in = c


@pytest.mark.parametrize("name", sorted(zoo.MODELS))
def test_output_shape(name):
    model = zoo.get_model(name)
    assert not model.training
    with torch.no_grad():
        y = model(torch.randn(SMALL_INPUT))
    assert y.shape == (1, 1000)
    assert torch.isfinite(y).all()


def test_channel_shuffle_permutation():
    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert channel_shuffle(x, 3).flatten().tolist() == [0, 2, 4, 1, 3, 5]
    assert channel_shuffle(x, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5]
    with pytest.raises(ValueError):
        channel_shuffle(x, 4)


def _count_shuffles(monkeypatch, module, name):
    """Shuffle calls (channels, groups) of one forward pass of zoo model ``name``."""
    model = zoo.get_model(name)  # built (and BN-calibrated) before patching
    calls = []

    def counting(x, groups):
        calls.append((x.shape[1], groups))
        return channel_shuffle(x, groups)

    monkeypatch.setattr(module, "channel_shuffle", counting)
    with torch.no_grad():
        model(torch.randn(SMALL_INPUT))
    return calls


@pytest.mark.parametrize("groups", [1, 2, 3, 4, 8])
def test_v1_shuffle_placement(monkeypatch, groups):
    calls = _count_shuffles(monkeypatch, shufflenet_v1, f"shufflenet_v1_g{groups}_x0_5")
    if groups == 1:
        assert calls == []  # the shuffle is the identity for g = 1 and is left out
        return
    # one shuffle in each of the 16 units, on the bottleneck (stage channels // 4), g groups
    _, stages = shufflenet_v1.stage_channels(groups, 0.5)
    expected = [(c // 4, groups) for c, n in zip(stages, shufflenet_v1.STAGE_REPEATS) for _ in range(n)]
    assert len(calls) == 16
    assert calls == expected


def test_v1_shuffle_sits_between_gconv_and_depthwise(monkeypatch):
    model = zoo.get_model("shufflenet_v1_g3_x1_0")
    order = []
    for unit in (model.stage2[0], model.stage3[1]):
        unit.gconv1.register_forward_hook(lambda *_: order.append("gconv1"))
        unit.dwconv.register_forward_hook(lambda *_: order.append("dwconv"))
        unit.gconv2.register_forward_hook(lambda *_: order.append("gconv2"))
    monkeypatch.setattr(shufflenet_v1, "channel_shuffle",
                        lambda x, g: (order.append(f"shuffle{g}"), channel_shuffle(x, g))[1])
    with torch.no_grad():
        model.stage2[0](torch.randn(1, 24, 28, 28))
        model.stage3[1](torch.randn(1, 480, 7, 7))
    assert order == ["gconv1", "shuffle3", "dwconv", "gconv2"] * 2
    first, unit = model.stage2[0], model.stage3[1]
    assert first.gconv1.groups == 1 and first.gconv2.groups == 3  # stage 2's first 1x1 is not grouped
    assert unit.gconv1.groups == 3 and unit.gconv2.groups == 3
    assert unit.dwconv.groups == unit.dwconv.in_channels == 480 // 4


def test_v2_shuffles_every_unit_with_two_groups(monkeypatch):
    calls = _count_shuffles(monkeypatch, shufflenet_v2, "shufflenet_v2_x0_5")
    assert len(calls) in (16, 32) and all(g == 2 for _, g in calls)


def test_get_model_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = zoo.get_model("shufflenet_v1_g3_x0_25")
    assert torch.equal(torch.rand(3), expected_next)
    b = zoo.get_model("shufflenet_v1_g3_x0_25")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


# --------------------------------------------------------------------------- errors


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UserError) as info:
        zoo.get_model("shufflenet_v1_g3_x1")
    message = str(info.value)
    assert "shufflenet_v1_g3_x1" in message and "shufflenet_v1_g3_x1_0" in message
    with pytest.raises(UserError, match="resnet50"):
        zoo.get_model("resnet50")


def test_missing_weights_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(UserError, match="nope.pt"):
        zoo.get_model("shufflenet_v2_x0_5", weights=str(path))


def test_corrupt_weights_file(tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"this is not a torch file")
    with pytest.raises(UserError, match="corrupt.pt"):
        zoo.get_model("shufflenet_v2_x0_5", weights=str(path))


def test_weights_for_another_model(tmp_path):
    path = tmp_path / "v2.pt"
    torch.save(zoo.get_model("shufflenet_v2_x0_5").state_dict(), path)
    with pytest.raises(UserError, match="v2.pt") as info:
        zoo.get_model("shufflenet_v2_x1_0", weights=str(path))
    assert "shufflenet_v2_x1_0" in str(info.value)


def test_weights_round_trip(tmp_path):
    name = "shufflenet_v1_g3_x0_25"
    source = zoo.get_model(name)
    with torch.no_grad():  # make the saved weights differ from the seeded defaults
        for p in source.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    loaded = zoo.get_model(name, weights=str(path))
    assert not loaded.training
    x = torch.randn(SMALL_INPUT)
    with torch.no_grad():
        assert torch.equal(loaded(x), source.eval()(x))
        assert not torch.equal(loaded(x), zoo.get_model(name)(x))
