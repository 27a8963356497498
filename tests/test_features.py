import pytest
import torch
from torch import nn

from mkfkit.features import FeatureCollector


def make_model():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 2),
    )


def hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_records_outputs_in_name_order_with_their_graph(device):
    model = make_model().to(device)
    x = torch.randn(2, 3, 4, 4, device=device)
    with FeatureCollector(model, ["1.0", "0"]) as feats:
        out = model(x)
        assert list(feats) == ["1.0", "0"] and len(feats) == 2
        torch.testing.assert_close(feats["0"], model[0](x))
        torch.testing.assert_close(feats["1.0"], model[1][0](model[0](x)))
        values = list(feats.values())
    assert values[0] is feats["1.0"]
    assert hook_count(model) == 0
    # The recorded tensors keep their graph: a loss on them trains the model.
    (values[0].pow(2).mean() + out.sum()).backward()
    assert model[0].weight.grad.abs().sum() > 0


def test_hooks_removed_on_exception():
    model = make_model()
    with pytest.raises(RuntimeError, match="boom"):
        with FeatureCollector(model, ["0", "3"]):
            assert hook_count(model) == 2
            raise RuntimeError("boom")
    assert hook_count(model) == 0


def test_clear_and_missing_outputs():
    model = make_model()
    feats = FeatureCollector(model, ["0", "3"])
    with feats:
        model(torch.randn(1, 3, 4, 4))
        feats.clear()
        assert len(feats) == 0 and list(feats) == [] and "0" not in feats
        with pytest.raises(KeyError, match="'0' has not run since the collector was entered or cleared"):
            feats["0"]
        with pytest.raises(KeyError, match=r"'2' is not recorded by this collector; it records \['0', '3'\]"):
            feats["2"]
        assert repr(feats) == "FeatureCollector(names=['0', '3'], recorded=[], active=True)"
        with pytest.raises(RuntimeError, match="^this FeatureCollector is already active; it "
                           "cannot be entered twice$"):
            feats.__enter__()
        assert hook_count(model) == 2  # the refused entry added no hooks
        model(torch.randn(1, 3, 4, 4))
    assert feats["3"].shape == (1, 2)  # readable after exit
    assert repr(feats) == "FeatureCollector(names=['0', '3'], recorded=['0', '3'], active=False)"
    # Re-entering the same collector works (e.g. once per step).
    with feats:
        assert hook_count(model) == 2


def test_module_run_twice_keeps_latest():
    shared = nn.Linear(3, 3)
    model = nn.ModuleDict({"shared": shared})
    x1, x2 = torch.randn(1, 3), torch.randn(1, 3)
    with FeatureCollector(model, ["shared"]) as feats:
        shared(x1)
        latest = shared(x2)
    assert torch.equal(feats["shared"], latest)


def test_unknown_name_lists_close_matches():
    model = nn.Sequential()
    model.add_module("layer1", nn.Linear(2, 2))
    model.add_module("layer2", nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"`names` holds 'layr1', which is not a submodule of the model; close matches: 'layer1'"):
        FeatureCollector(model, ["layr1"])
    with pytest.raises(ValueError, match=r"`names` holds 'head', which is not a submodule of the model$"):
        FeatureCollector(model, ["head"])
    for index in range(3, 8):
        model.add_module(f"layer{index}", nn.Linear(2, 2))
    # at most five, the closest first (equally close ones in reverse order, as difflib ranks)
    with pytest.raises(ValueError, match=r"close matches: 'layer7', 'layer6', 'layer5', 'layer4', "
                       r"'layer3'$"):
        FeatureCollector(model, ["layer"])


def test_remove_is_safe_before_entering_and_twice():
    model = make_model()
    feats = FeatureCollector(model, ["0"])
    feats.remove()
    with feats:
        feats.remove()  # hooks gone inside the block; leaving it removes nothing more
        assert hook_count(model) == 0
    feats.remove()
    with feats:
        model(torch.randn(1, 3, 4, 4))
    assert list(feats) == ["0"] and hook_count(model) == 0


def test_a_submodule_named_like_a_wrapper_prefix_is_found_by_its_own_name():
    # "module.0" names a real submodule here: it must not be read as DataParallel's "module."
    # prefix in front of the top-level "0", a different layer.
    model = nn.Sequential()
    model.add_module("0", nn.Linear(3, 4))
    model.add_module("module", nn.Sequential(nn.Linear(4, 2)))
    x = torch.randn(2, 3)
    with FeatureCollector(model, ["module.0", "0"]) as feats:
        model(x)
    assert feats["module.0"].shape == (2, 2) and feats["0"].shape == (2, 4)


def test_bad_arguments():
    model = make_model()
    with pytest.raises(ValueError, match="`names` must be a non-empty list of submodule names, but got \\[\\]"):
        FeatureCollector(model, [])
    with pytest.raises(ValueError, match="`names` must be a non-empty list"):
        FeatureCollector(model, "0")
    with pytest.raises(ValueError, match="`names` must not repeat a name"):
        FeatureCollector(model, ["0", "0"])
    with pytest.raises(TypeError, match="`names` must hold strings, but got 0"):
        FeatureCollector(model, [0])
    with pytest.raises(TypeError, match=r"`model` must be a torch.nn.Module, but got <function .*> \(function\)"):
        FeatureCollector(lambda x: x, ["0"])


def test_data_parallel_names_with_and_without_prefix():
    model = make_model()
    wrapped = nn.DataParallel(model)  # on CPU it simply calls the module; with CUDA it moves it
    x = torch.randn(2, 3, 4, 4, device=next(model.parameters()).device)
    with FeatureCollector(wrapped, ["module.0", "1"]) as feats:
        wrapped(x)
    assert list(feats) == ["module.0", "1"]
    torch.testing.assert_close(feats["module.0"], model[0](x))


class CompiledLike(nn.Module):
    """Stands in for torch.compile's OptimizedModule (which keeps the model as `_orig_mod`)
    without paying for a real compilation in the test budget."""

    def __init__(self, model):
        super().__init__()
        self._orig_mod = model

    def forward(self, x):
        return self._orig_mod(x)


def test_compile_wrapper_names_with_and_without_prefix():
    model = make_model()
    wrapped = CompiledLike(model)
    x = torch.randn(2, 3, 4, 4)
    with FeatureCollector(wrapped, ["_orig_mod.1.0", "0"]) as feats:
        wrapped(x)
    torch.testing.assert_close(feats["_orig_mod.1.0"], model[1][0](model[0](x)))
    torch.testing.assert_close(feats["0"], model[0](x))


def test_nested_wrappers_names_with_their_prefixes_in_either_order():
    model = make_model()
    x = torch.randn(2, 3, 4, 4)
    for wrapped in (CompiledLike(nn.DataParallel(model)), nn.DataParallel(CompiledLike(model))):
        with FeatureCollector(wrapped, ["_orig_mod.module.1.0", "module._orig_mod.0", "3"]) as feats:
            wrapped(x)
        torch.testing.assert_close(feats["_orig_mod.module.1.0"], model[1][0](model[0](x)))
        torch.testing.assert_close(feats["module._orig_mod.0"], model[0](x))
        assert feats["3"].shape == (2, 2)


def test_distributed_data_parallel_names():
    # A real DistributedDataParallel instance without a process group: a one-process gloo group
    # can hang in its destructor (pt_gloo_runloop join) on a busy CI machine, and the collector
    # only relies on the wrapper's type and its `.module`.
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)
    nn.Module.__init__(ddp)
    ddp.module = model
    x = torch.randn(2, 3, 4, 4)
    with FeatureCollector(ddp, ["0", "module.1"]) as feats:
        assert hook_count(model) == 2
        out = ddp.module(x)
    torch.testing.assert_close(feats["0"], model[0](x))
    (feats["module.1"].mean() + out.sum()).backward()
    assert model[0].weight.grad is not None
    assert hook_count(ddp) == 0
