import pytest
import torch
from torch import nn

import robustkit
from robustkit.errors import DataNotFoundError, InputError
from robustkit.models import (
    Normalize,
    PreActResNet18,
    SmallCNN,
    SmallViT,
    load_checkpoint,
    save_checkpoint,
    torchvision_model,
)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("factory", [
    lambda c: SmallCNN(in_channels=c, num_classes=7, width=8),
    lambda c: PreActResNet18(in_channels=c, num_classes=7),
    lambda c: SmallViT(image_size=16, patch_size=4, in_channels=c, num_classes=7, dim=32, depth=2, heads=2),
])
def test_output_shapes_and_features(factory, channels):
    m = factory(channels).eval()
    x = torch.rand(3, channels, 16, 16)
    assert m(x).shape == (3, 7)
    f = m.features(x)
    assert f.dim() == 2 and f.shape[0] == 3
    head = getattr(m, "classifier", None) or getattr(m, "linear", None) or m.head
    assert torch.allclose(head(f), m(x), atol=1e-5)


def test_normalization_is_inside_the_model():
    torch.manual_seed(0)
    m = SmallCNN(in_channels=3, width=8, mean=[0.1, 0.2, 0.3], std=[0.5, 0.25, 0.125]).eval()
    x = torch.rand(2, 3, 16, 16)
    manual = (x - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.25, 0.125]).view(1, 3, 1, 1)
    out = m.classifier(m.pool(m.body(manual)).flatten(1))
    assert torch.allclose(m(x), out, atol=1e-5)
    # PreActResNet18 defaults to CIFAR-10 statistics on 3 channels
    assert torch.allclose(PreActResNet18().normalize.mean.flatten(), torch.tensor([0.4914, 0.4822, 0.4465]))


def test_wrong_channels_and_sizes_are_clear():
    with pytest.raises(InputError, match="expects 3-channel images, got 1"):
        SmallCNN(in_channels=3)(torch.rand(1, 1, 16, 16))
    with pytest.raises(InputError, match="N x C x H x W"):
        SmallCNN(in_channels=1)(torch.rand(1, 16, 16))
    with pytest.raises(InputError, match="built for 32x32 images, got \\(16, 16\\)"):
        SmallViT(image_size=32, in_channels=1, dim=32, depth=1, heads=2)(torch.rand(1, 1, 16, 16))
    with pytest.raises(InputError, match="divisible by patch_size"):
        SmallViT(image_size=30, patch_size=4)
    with pytest.raises(InputError, match="one per input channel"):
        SmallCNN(in_channels=3, mean=[0.5])
    with pytest.raises(InputError, match="std must be > 0"):
        Normalize([0.5], [0.0])


def test_vit_attention_maps():
    torch.manual_seed(0)
    m = SmallViT(image_size=16, patch_size=4, in_channels=1, num_classes=3, dim=32, depth=3, heads=2).eval()
    x = torch.rand(2, 1, 16, 16)
    logits, maps = m(x, return_attention=True)
    assert torch.allclose(logits, m(x))
    assert len(maps) == 3
    t = 1 + (16 // 4) ** 2
    for a in maps:
        assert a.shape == (2, 2, t, t)
        assert float(a.detach().min()) >= 0
        assert torch.allclose(a.sum(-1), torch.ones(2, 2, t), atol=1e-5)
    # hooks can read the maps without editing the model
    seen = []
    for blk in m.blocks:
        blk.attn.register_forward_hook(lambda mod, inp, out: seen.append(out[1].detach()))
    m(x)
    assert len(seen) == 3 and torch.allclose(seen[0], maps[0])
    m.blocks[0].attn.keep_attention = True
    m(x)
    assert torch.allclose(m.blocks[0].attn.last_attention, maps[0])


def test_preact_shortcut_hooks_fire_and_scale():
    torch.manual_seed(0)
    m = PreActResNet18(in_channels=1, num_classes=4).eval()
    x = torch.rand(2, 1, 16, 16)
    base = m(x)
    calls = []

    def scale(mod, inp, out):
        calls.append(type(mod).__name__)
        return out * 0.0

    handles = [m.layer1[0].shortcut.register_forward_hook(scale), m.layer2[0].shortcut.register_forward_hook(scale)]
    changed = m(x)
    assert calls == ["Identity", "Sequential"]
    assert not torch.allclose(base, changed)
    for h in handles:
        h.remove()
    assert torch.allclose(m(x), base)


def test_gradients_reach_the_input():
    for m in (SmallCNN(in_channels=1, width=8), SmallViT(image_size=16, in_channels=1, dim=32, depth=1, heads=2)):
        x = torch.rand(2, 1, 16, 16, requires_grad=True)
        m(x).sum().backward()
        assert x.grad is not None and float(x.grad.abs().sum()) > 0


@pytest.mark.parametrize("model", [
    SmallCNN(in_channels=1, num_classes=5, width=8),
    SmallViT(image_size=16, in_channels=1, num_classes=5, dim=32, depth=2, heads=2),
    PreActResNet18(in_channels=1, num_classes=5),
])
def test_checkpoint_roundtrip(tmp_path, model):
    model.eval()
    x = torch.rand(2, 1, 16, 16)
    save_checkpoint(model, tmp_path / "m.pt", note="hi")
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert type(loaded) is type(model) and not loaded.training
    assert torch.allclose(loaded(x), model(x), atol=1e-6)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(DataNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x00garbage")
    with pytest.raises(InputError, match="not a readable torch checkpoint"):
        load_checkpoint(tmp_path / "garbage.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not a robustkit checkpoint.*weights"):
        load_checkpoint(tmp_path / "other.pt")
    m = SmallCNN(in_channels=1, width=8)
    save_checkpoint(m, tmp_path / "m.pt")
    blob = torch.load(tmp_path / "m.pt")
    blob["state_dict"].pop("classifier.weight")
    torch.save(blob, tmp_path / "broken.pt")
    with pytest.raises(InputError, match="missing \\['classifier.weight'\\]"):
        load_checkpoint(tmp_path / "broken.pt")
    with pytest.raises(InputError, match="pass name="):
        save_checkpoint(nn.Linear(2, 2), tmp_path / "lin.pt")


def test_registry_and_torchvision(tmp_path):
    m = robustkit.MODELS.build({"name": "small_cnn", "in_channels": 1, "width": 8})
    assert isinstance(m, SmallCNN)
    tv = torchvision_model("resnet18", num_classes=3).eval()
    assert tv(torch.rand(1, 3, 32, 32)).shape == (1, 3)
    torch.save(tv[1].state_dict(), tmp_path / "w.pt")
    tv2 = torchvision_model("resnet18", num_classes=3, weights_path=str(tmp_path / "w.pt")).eval()
    x = torch.rand(1, 3, 32, 32)
    assert torch.allclose(tv2(x), tv(x), atol=1e-5)
    with pytest.raises(DataNotFoundError, match="never downloads"):
        torchvision_model("resnet18", weights_path=str(tmp_path / "missing.pt"))
    with pytest.raises(robustkit.ConfigError, match="unknown torchvision model"):
        torchvision_model("resnet_9000")


@pytest.mark.slow
def test_small_cnn_learns_digits(digits16):
    from robustkit.eval import accuracy
    from robustkit.training import train_classifier

    torch.manual_seed(0)
    m = SmallCNN(in_channels=1, num_classes=10, width=16)
    hist = train_classifier(m, digits16.train, epochs=5, progress=False, val_data=digits16.test)
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert accuracy(m, digits16.test) > 0.9
