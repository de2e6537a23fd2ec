"""Property-based tests (hypothesis) of the toolkit's contracts over wrap, preprocessors, attacks,
metrics, loaders and triggers.

Invariants checked on generated inputs:

- shape, dtype and device are kept; images stay in [0, 1]; attacks stay inside the eps-ball;
- the same seed gives the same output;
- the caller's tensors and arrays are never modified;
- invalid input raises a :class:`~robustkit.errors.RobustkitError` subclass whose message names
  the problem, never a raw torch / numpy error.

Every test is derandomized (the same examples on every run and machine) and small: a few
hundred examples in all, on tiny images and a tiny model. No assertion depends on float
reduction order: only equalities of two runs in one process, bounds with a tolerance, and
exact integer / uint8 round trips. (That modules' modes and buffers are left unchanged is
tested elsewhere.)
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import robustkit  # noqa: E402
from robustkit.attacks import PGD  # noqa: E402
from robustkit.backdoor import defense_effectiveness_rating  # noqa: E402
from robustkit.backdoor.metrics import backdoor_metrics  # noqa: E402
from robustkit.data import ArrayDataset, class_balanced_subset, stratified_split, to_tensors  # noqa: E402
from robustkit.data.npz import images_to_tensor, load_npz, save_npz  # noqa: E402
from robustkit.errors import RobustkitError  # noqa: E402
from robustkit.inference import accuracy, predict  # noqa: E402
from robustkit.wrap import wrap  # noqa: E402

TOL = 1e-6


def cfg(n: int):
    """Derandomized settings with ``n`` examples, no example database and no deadline (shared CPUs)."""
    return settings(max_examples=n, derandomize=True, database=None, deadline=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@st.composite
def image_batches(draw, min_side: int = 6, max_side: int = 10, channels=(1, 3)):
    """A float N x C x H x W batch in [0, 1] (float32 or float64), with exact 0s and 1s mixed in."""
    n = draw(st.integers(1, 3))
    c = draw(st.sampled_from(channels))
    h = draw(st.integers(min_side, max_side))
    w = draw(st.integers(min_side, max_side))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, h, w, generator=g, dtype=dtype)
    if draw(st.booleans()):  # saturated pixels: the clip / range edges
        mask = torch.rand(n, c, h, w, generator=g) < 0.3
        x = torch.where(mask, x.round(), x)
    return x


def tiny_model(channels: int, classes: int = 3, seed: int = 0) -> nn.Module:
    """A shape-agnostic classifier (conv, global pooling, linear) in eval mode."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, classes)).eval()


def _same_model_dtype(model: nn.Module, x: torch.Tensor) -> nn.Module:
    return model.to(device=x.device, dtype=x.dtype)


# ----------------------------------------------------------------------------- preprocessors and wrap
def _preprocessor(name: str, seed: int) -> nn.Module:
    if name == "compose":
        return robustkit.PREPROCESSORS.build({"name": "compose", "parts": [{"name": "gaussian_noise", "sigma": 0.1},
                                                                            "quantize"], "seed": seed})
    params = robustkit.PREPROCESSORS.parameters(name)
    return robustkit.PREPROCESSORS.build({"name": name, **({"seed": seed} if "seed" in params else {})})


PREPROCESSOR_NAMES = sorted(robustkit.PREPROCESSORS.names())


@pytest.mark.parametrize("name", PREPROCESSOR_NAMES)
@pytest.mark.parametrize("device", DEVICES)
@cfg(12)
@given(x=image_batches(), seed=st.integers(0, 1000))
def test_preprocessor_contract(name, device, x, seed):
    x = x.to(device)
    before = x.clone()
    out = _preprocessor(name, seed)(x)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert float(out.min()) >= -TOL and float(out.max()) <= 1 + TOL
    assert torch.equal(x, before)  # the caller's tensor is untouched
    again = _preprocessor(name, seed)(x)  # a fresh instance with the same seed: the same output
    assert torch.equal(out, again)


@cfg(20)
@given(x=image_batches(), seed=st.integers(0, 1000), names=st.lists(st.sampled_from(["quantize", "bilateral"]),
                                                                       min_size=0, max_size=2))
def test_wrap_contract_and_flattening(x, seed, names):
    model = _same_model_dtype(tiny_model(x.shape[1], seed=seed), x)
    before = x.clone()
    parts = [_preprocessor(n, seed) for n in names]
    defended = wrap(model, *parts)
    logits = defended(x)
    assert logits.shape == (x.shape[0], 3) and logits.dtype == x.dtype and logits.device == x.device
    assert torch.equal(x, before)
    # wrapping again keeps one flat wrapper whose new preprocessors run first
    extra = _preprocessor("quantize", seed)
    nested = wrap(defended, extra)
    expected = x
    for p in [extra, *parts]:
        expected = p(expected)
    assert torch.equal(nested(x), model(expected))


# ----------------------------------------------------------------------------- attacks
@pytest.mark.parametrize("device", DEVICES)
@cfg(25)
@given(x=image_batches(min_side=4, max_side=8), norm=st.sampled_from(["linf", "l2"]),
       eps=st.sampled_from([0.0, 1 / 255, 4 / 255, 16 / 255, 0.25]), steps=st.integers(1, 3),
       seed=st.integers(0, 1000), targeted=st.booleans(), random_start=st.booleans())
def test_pgd_contract(device, x, norm, eps, steps, seed, targeted, random_start):
    x = x.to(device)
    model = _same_model_dtype(tiny_model(x.shape[1], seed=seed), x)
    y = torch.arange(x.shape[0], device=device) % 3
    xb, yb = x.clone(), y.clone()
    attack = PGD(eps=eps, steps=steps, norm=norm, seed=seed, targeted=targeted, random_start=random_start,
                 alpha=eps / 4 if eps else None)
    adv = attack(model, x, y)
    assert adv.shape == x.shape and adv.dtype == x.dtype and adv.device == x.device
    assert float(adv.min()) >= -TOL and float(adv.max()) <= 1 + TOL
    delta = (adv - x).flatten(1).double()
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert float(size.max()) <= eps * (1 + 1e-4) + 1e-5  # inside the eps-ball
    assert torch.equal(x, xb) and torch.equal(y, yb)  # caller's tensors untouched
    assert torch.equal(attack(model, x, y), adv)  # same seed, same adversarial images


# ----------------------------------------------------------------------------- metrics
@cfg(25)
@given(x=image_batches(), seed=st.integers(0, 1000), batch_size=st.integers(1, 4))
def test_accuracy_and_predict_contract(x, seed, batch_size):
    x = x.float()
    model = tiny_model(x.shape[1], seed=seed)
    y = torch.randint(0, 3, (x.shape[0],), generator=torch.Generator().manual_seed(seed))
    xb, yb = x.clone(), y.clone()
    pred = predict(model, x, batch_size=batch_size)
    assert pred.shape == (x.shape[0],) and pred.dtype == torch.int64
    assert int(pred.min()) >= 0 and int(pred.max()) < 3
    acc = accuracy(model, (x, y), batch_size=batch_size)
    assert 0.0 <= acc <= 1.0
    assert acc == accuracy(model, ArrayDataset(x, y, ["a", "b", "c"]), batch_size=batch_size)
    assert acc == accuracy(model, (x, y.int()), batch_size=batch_size)  # int32 labels: same answer, no crash
    assert torch.equal(x, xb) and torch.equal(y, yb)


@cfg(10)
@given(x=image_batches(min_side=4, max_side=6, channels=(3,)), seed=st.integers(0, 1000),
       eps=st.sampled_from([0.0, 2 / 255, 8 / 255]))
def test_robust_accuracy_bounded_by_clean_accuracy(x, seed, eps):
    from robustkit.eval import robust_accuracy

    x = x.float()
    model = tiny_model(3, seed=seed)
    y = torch.arange(x.shape[0]) % 3
    xb, yb = x.clone(), y.clone()
    attack = PGD(eps=eps, steps=2, alpha=eps / 4 if eps else None, seed=seed)
    r = robust_accuracy(model, attack, x, y, progress=False, seed=seed)
    assert 0.0 <= r.robust_accuracy <= r.clean_accuracy <= 1.0
    assert r.clean_accuracy == pytest.approx(accuracy(model, (x, y)), abs=1e-6)  # a float32 mean vs a fraction
    assert r.robust_accuracy == robust_accuracy(model, attack, x, y, progress=False, seed=seed).robust_accuracy
    assert torch.equal(x, xb) and torch.equal(y, yb)


@cfg(40)
@given(vals=st.lists(st.floats(0, 1, allow_nan=False), min_size=4, max_size=4))
def test_der_is_a_rating_in_unit_interval(vals):
    before = {"acc": vals[0], "asr": vals[1]}
    after = {"acc": vals[2], "asr": vals[3]}
    der = defense_effectiveness_rating(before, after)
    assert 0.0 <= der <= 1.0
    assert before == {"acc": vals[0], "asr": vals[1]}  # inputs untouched


@cfg(20)
@given(bad=st.one_of(st.floats(1.0001, 100.0), st.floats(-100, -1e-6), st.just(math.nan), st.just(math.inf),
                     st.just("0.5"), st.just(None)),
       key=st.sampled_from(["acc", "asr"]), side=st.sampled_from(["before", "after"]))
def test_der_refuses_non_fractions(bad, key, side):
    good = {"acc": 0.9, "asr": 0.5}
    broken = {**good, key: bad}
    args = (broken, good) if side == "before" else (good, broken)
    with pytest.raises(RobustkitError, match=rf"{side}\['{key}'\]"):
        defense_effectiveness_rating(*args)


@cfg(15)
@given(x=image_batches(min_side=6, max_side=8, channels=(3,)), name=st.sampled_from(["badnets", "blended", "sig", "wanet"]),
       seed=st.integers(0, 1000))
def test_backdoor_metrics_are_fractions(x, name, seed):
    x = x.float()
    n = x.shape[0]
    y = torch.arange(n) % 3
    test = ArrayDataset(torch.cat([x, x]), torch.cat([y, (y + 1) % 3]), ["a", "b", "c"])
    before = test.images.clone()
    m = backdoor_metrics(tiny_model(3, seed=seed), robustkit.BACKDOORS.build({"name": name, "target": 0}), test)
    assert 0 <= m.acc <= 1 and 0 <= m.asr <= 1 and 0 <= m.ra <= 1 and m.asr + m.ra <= 1 + TOL
    assert m.n_clean == 2 * n and 0 < m.n_triggered <= 2 * n
    assert torch.equal(test.images, before)


# ----------------------------------------------------------------------------- loaders
@cfg(30)
@given(n=st.integers(1, 4), c=st.sampled_from([1, 3]), h=st.integers(1, 6), w=st.integers(1, 6),
       layout=st.sampled_from(["nchw", "nhwc", "nhw"]), seed=st.integers(0, 2**16))
def test_images_to_tensor_uint8_exact_in_every_layout(n, c, h, w, layout, seed):
    rng = np.random.default_rng(seed)
    if layout == "nhw":
        c = 1
    nchw = rng.integers(0, 256, size=(n, c, h, w), dtype=np.uint8)
    arr = {"nchw": nchw, "nhwc": nchw.transpose(0, 2, 3, 1), "nhw": nchw[:, 0]}[layout].copy()
    before = arr.copy()
    t = images_to_tensor(arr)
    if layout == "nchw" and h in (1, 3) and c not in (1, 3):  # pragma: no cover - c is always 1 or 3 here
        return
    ambiguous = layout == "nhwc" and h in (1, 3)  # N x H x W x C with H = 1 or 3 reads as channels-first
    if not ambiguous:
        assert t.shape == (n, c, h, w) and t.dtype == torch.float32
        assert torch.equal(t, torch.from_numpy(nchw).float() / 255)
    assert float(t.min()) >= 0 and float(t.max()) <= 1
    assert np.array_equal(arr, before)


@cfg(15)
@given(n=st.integers(2, 12), k=st.integers(1, 4), seed=st.integers(0, 1000),
       label_dtype=st.sampled_from([np.int64, np.int32, np.uint8]))
def test_npz_round_trip_keeps_every_image_in_order(tmp_path_factory, n, k, seed, label_dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 3, 3), generator=g).float() / 255
    y = (torch.arange(n) % k).numpy().astype(label_dtype)
    path = save_npz(tmp_path_factory.mktemp("npz") / "d.npz", x, y)
    b = load_npz(path)
    xt, yt = to_tensors(b.test)
    assert torch.equal(xt, x) and yt.dtype == torch.int64 and yt.tolist() == y.tolist()
    assert b.test_is_train and b.num_classes == min(n, k)  # no class names stored: max(label) + 1


@cfg(25)
@given(per_class=st.integers(2, 10), k=st.integers(2, 4), frac=st.floats(0.1, 0.6), seed=st.integers(0, 1000),
       dtype=st.sampled_from([torch.int64, torch.int32, torch.uint8]))
def test_dataset_helpers_deterministic_and_int64(per_class, k, frac, seed, dtype):
    n = per_class * k  # at least two samples per class, so both splits are non-empty
    y = (torch.arange(n) % k).to(dtype)
    x = torch.rand(n, 1, 2, 2, generator=torch.Generator().manual_seed(seed))
    yb = y.clone()
    ds = ArrayDataset(x, y)
    assert ds.labels.dtype == torch.int64 and torch.equal(y, yb)
    xt, yt = to_tensors(ds)
    assert yt.dtype == torch.int64 and torch.equal(yt, y.long())
    tr, te = stratified_split(y, frac, seed)
    tr2, te2 = stratified_split(y, frac, seed)
    assert np.array_equal(tr, tr2) and np.array_equal(te, te2)
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(n))
    sub = class_balanced_subset(ds, frac, seed)
    assert torch.equal(sub.images, class_balanced_subset(ds, frac, seed).images)
    assert sub.labels.dtype == torch.int64 and set(sub.labels.tolist()) == set(range(k))


# ----------------------------------------------------------------------------- triggers
TRIGGER_PARAMS = {
    "badnets": lambda d: {"size": d(st.integers(1, 3)), "pattern": d(st.sampled_from(["white", "black", "checkerboard"])),
                          "position": d(st.sampled_from(["bottom-right", "top-left", [1, 2]])), "margin": d(st.integers(0, 1))},
    "blended": lambda d: {"alpha": d(st.floats(0, 1)), "seed": d(st.integers(0, 100))},
    "sig": lambda d: {"delta": d(st.floats(0, 1)), "frequency": d(st.floats(0.5, 10))},
    "wanet": lambda d: {"s": d(st.floats(0.1, 4)), "k": d(st.integers(2, 5)), "grid_rescale": d(st.floats(0.5, 1.5)),
                        "seed": d(st.integers(0, 100))},
}


@pytest.mark.parametrize("name", sorted(robustkit.BACKDOORS.names()))
@cfg(15)
@given(x=image_batches(), data=st.data())
def test_trigger_contract_and_exact_rebuild(name, x, data):
    params = TRIGGER_PARAMS.get(name, lambda d: {})(data.draw)
    attack = robustkit.BACKDOORS.build({"name": name, **params})
    before = x.clone()
    out = attack.apply(x)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert torch.equal(x, before)
    # the configuration a manifest records (through JSON) rebuilds the identical trigger
    config = json.loads(json.dumps(attack.config()))
    rebuilt = robustkit.BACKDOORS.build({"name": name, **config})
    assert torch.equal(rebuilt.apply(x), out)


BAD_TRIGGER_PARAMS = {
    "badnets": [("size", 0), ("size", 1.5), ("margin", -1), ("pattern", "plaid"), ("position", "middle"), ("target", -1)],
    "blended": [("alpha", math.nan), ("alpha", 2.0), ("seed", -3), ("target", 1.5)],
    "sig": [("delta", math.nan), ("delta", -0.1), ("frequency", 0.0), ("frequency", math.inf)],
    "wanet": [("s", math.nan), ("s", 0.0), ("k", 1), ("grid_rescale", math.nan), ("grid_rescale", -1.0),
              ("cross_ratio", -1.0), ("cross_ratio", math.inf)],
}


@pytest.mark.parametrize("name", sorted(robustkit.BACKDOORS.names()))
def test_invalid_trigger_parameters_name_the_parameter(name):
    cases = BAD_TRIGGER_PARAMS.get(name)
    if not cases:
        pytest.skip(f"no invalid parameters listed for {name}")

    @cfg(len(cases) * 2)
    @given(case=st.sampled_from(cases), via_registry=st.booleans())
    def check(case, via_registry):
        key, value = case
        with pytest.raises(RobustkitError, match=key):
            if via_registry:
                robustkit.BACKDOORS.build({"name": name, key: value})
            else:
                type(robustkit.BACKDOORS.build(name))(**{key: value})

    check()


# ----------------------------------------------------------------------------- invalid input
@st.composite
def invalid_images(draw):
    """``(bad input, regex the error must match)``: each way a caller gets the image contract wrong."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 1000)))
    x = torch.rand(2, 3, 6, 6, generator=g)
    kind = draw(st.sampled_from(["255", "negative", "nan", "inf", "uint8", "3d", "numpy", "list", "empty", "int64"]))
    if kind == "255":
        return x * 255, r"\[0, 1\]"
    if kind == "negative":
        return x - 0.5, r"\[0, 1\]"
    if kind in ("nan", "inf"):
        bad = x.clone()
        bad[draw(st.integers(0, 1)), draw(st.integers(0, 2)), draw(st.integers(0, 5)), draw(st.integers(0, 5))] = (
            math.nan if kind == "nan" else -math.inf)
        return bad, "NaN or infinite"
    if kind == "uint8":
        return (x * 255).to(torch.uint8), "floating-point"
    if kind == "int64":
        return (x * 255).long(), "floating-point"
    if kind == "3d":
        return x[0], "N x C x H x W"
    if kind == "numpy":
        return x.numpy(), "torch.Tensor"
    if kind == "list":
        return x.tolist(), "torch.Tensor"
    return x[:0], "empty"


def _model3():
    return tiny_model(3)


ENTRY_POINTS = {
    **{f"preprocessor:{n}": (lambda n: lambda x: _preprocessor(n, 0)(x))(n) for n in PREPROCESSOR_NAMES},
    **{f"trigger:{n}": (lambda n: lambda x: robustkit.BACKDOORS.build(n).apply(x))(n)
       for n in sorted(robustkit.BACKDOORS.names())},
    "wrap": lambda x: wrap(_model3(), "quantize")(x),
    "pgd": lambda x: PGD(eps=2 / 255, steps=1, seed=0)(_model3(), x, torch.zeros(2, dtype=torch.long)),
    "predict": lambda x: predict(_model3(), x),
    "accuracy": lambda x: accuracy(_model3(), (x, torch.zeros(2, dtype=torch.long))),
    "ArrayDataset": lambda x: ArrayDataset(x, torch.zeros(2, dtype=torch.long)),
}


def _entry_params():
    yield from sorted(ENTRY_POINTS)


@pytest.mark.parametrize("entry", list(_entry_params()))
@cfg(12)
@given(case=invalid_images())
def test_invalid_images_raise_a_robustkit_error_naming_the_problem(entry, case):
    bad, pattern = case
    if entry in ("pgd", "accuracy", "ArrayDataset") and pattern == "N x C x H x W":
        pattern = "N x C x H x W|labels"  # a 3-D x may first be seen to mismatch the 2 labels
    try:
        ENTRY_POINTS[entry](bad)
    except RobustkitError as exc:
        import re

        assert re.search(pattern, str(exc)), f"{entry}: {exc!r} does not name the problem ({pattern})"
    except Exception as exc:  # a raw torch / numpy / Python error escaped
        pytest.fail(f"{entry} raised a raw {type(exc).__name__}: {exc}")
    else:
        pytest.fail(f"{entry} accepted invalid input ({pattern})")


@st.composite
def invalid_labels(draw):
    kind = draw(st.sampled_from(["float", "2d", "short", "negative", "beyond", "bool", "list", "int32"]))
    if kind == "int32":
        return torch.tensor([0, 1], dtype=torch.int32), "int64"
    if kind == "float":
        return torch.tensor([0.0, 1.0]), "integer"
    if kind == "2d":
        return torch.zeros(2, 1, dtype=torch.long), "1-D"
    if kind == "short":
        return torch.zeros(1, dtype=torch.long), "1 labels but there are 2 images"
    if kind == "negative":
        return torch.tensor([0, -draw(st.integers(1, 5))]), "negative"
    if kind == "beyond":
        return torch.tensor([0, draw(st.integers(3, 50))]), "class index"
    if kind == "bool":
        return torch.tensor([True, False]), "integer"
    return [0, 1], "torch.Tensor"


LABEL_ENTRY_POINTS = {
    "pgd": lambda x, y: PGD(eps=2 / 255, steps=1, seed=0)(_model3(), x, y),
    "accuracy": lambda x, y: accuracy(_model3(), (x, y)),
}


@pytest.mark.parametrize("entry", sorted(LABEL_ENTRY_POINTS))
@cfg(12)
@given(case=invalid_labels())
def test_invalid_labels_raise_a_robustkit_error_naming_the_problem(entry, case):
    bad, pattern = case
    x = torch.rand(2, 3, 6, 6)
    if entry == "pgd" and pattern == "class index":
        return  # an attack only needs labels to be indices; the class count is checked by the evaluators
    if entry == "accuracy" and pattern == "int64":
        assert 0 <= LABEL_ENTRY_POINTS[entry](x, bad) <= 1  # accuracy converts int32 labels (documented)
        return
    try:
        LABEL_ENTRY_POINTS[entry](x, bad)
    except RobustkitError as exc:
        assert pattern in str(exc), f"{entry}: {exc!r} does not name the problem ({pattern})"
    except Exception as exc:
        pytest.fail(f"{entry} raised a raw {type(exc).__name__}: {exc}")
    else:
        pytest.fail(f"{entry} accepted invalid labels ({pattern})")


@cfg(25)
@given(kind=st.sampled_from(["nan", "range", "int16", "ndim", "empty", "bool"]), seed=st.integers(0, 100))
def test_invalid_arrays_raise_a_robustkit_error_in_the_loader(kind, seed):
    rng = np.random.default_rng(seed)
    arr = rng.random((2, 4, 4, 3)).astype(np.float32)
    bad, pattern = {
        "nan": (np.where(arr > 0.5, np.nan, arr), "NaN"),
        "range": (arr * 255, r"\[0, 1\]"),
        "int16": ((arr * 255).astype(np.int16), "uint8"),
        "ndim": (arr[0, 0, 0], "dimensions"),
        "empty": (arr[:0], "no images"),
        "bool": (arr > 0.5, "uint8"),
    }[kind]
    with pytest.raises(RobustkitError, match=pattern):
        images_to_tensor(bad)
