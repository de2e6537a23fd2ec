import pytest

from robustkit.errors import ConfigError, UnknownNameError
from robustkit.registry import Registry, parse_number


def make_registry():
    reg = Registry("widget")

    @reg.register("box")
    class Box:
        def __init__(self, size: float = 1.0, count: int = 2, label: str | None = None, flag: bool = False):
            if size > 100:
                raise ValueError("size must be <= 100")
            self.size, self.count, self.label, self.flag = size, count, label, flag

    @reg.register()
    def needs_arg(value: int):
        return value

    return reg, Box


def test_build_by_name_and_mapping():
    reg, Box = make_registry()
    assert isinstance(reg.build("box"), Box)
    b = reg.build({"name": "box", "size": "8/255", "count": 3})
    assert b.size == pytest.approx(8 / 255) and b.count == 3
    assert reg.build("box", size=2.0).size == 2.0
    assert reg.names() == ["box", "needs_arg"]
    assert "box" in reg and len(reg) == 2


def test_unknown_name_lists_known_and_suggests():
    reg, _ = make_registry()
    with pytest.raises(UnknownNameError, match=r"unknown widget 'bxo'.*Did you mean 'box'.*Known widgets: box, needs_arg"):
        reg.build("bxo")
    # also a KeyError and a ValueError for generic handlers
    with pytest.raises(KeyError):
        reg.get("nope")
    with pytest.raises(ValueError):
        reg.get("nope")


def test_unknown_parameter_is_named_with_path():
    reg, _ = make_registry()
    with pytest.raises(ConfigError, match=r"^cfg.sise: unknown parameter.*Did you mean 'size'.*Accepted: size, count, label, flag"):
        reg.build({"name": "box", "sise": 2}, "cfg")


def test_type_errors_are_named():
    reg, _ = make_registry()
    with pytest.raises(ConfigError, match=r"cfg.count: expected int, got 'three'"):
        reg.build({"name": "box", "count": "three"}, "cfg")
    with pytest.raises(ConfigError, match=r"cfg.size: expected float"):
        reg.build({"name": "box", "size": "big"}, "cfg")
    with pytest.raises(ConfigError, match=r"cfg.flag: expected bool"):
        reg.build({"name": "box", "flag": "yes"}, "cfg")
    # integral floats are accepted for int, None for Optional
    assert reg.build({"name": "box", "count": 4.0, "label": None}).count == 4


def test_missing_required_and_factory_value_errors():
    reg, _ = make_registry()
    with pytest.raises(ConfigError, match="needs parameter.*value"):
        reg.build("needs_arg")
    with pytest.raises(ConfigError, match="size must be <= 100"):
        reg.build({"name": "box", "size": 1000})


def test_spec_without_name():
    reg, _ = make_registry()
    with pytest.raises(ConfigError, match="needs a 'name' key"):
        reg.build({"size": 2})
    with pytest.raises(ConfigError, match="must be a name or a mapping"):
        reg.build(3)


def test_duplicate_registration_refused():
    reg, Box = make_registry()
    with pytest.raises(ValueError, match="already registered"):
        reg.register("box")(type("Other", (), {}))


@pytest.mark.parametrize("value,expected", [(0.5, 0.5), (8, 8.0), ("8/255", 8 / 255), ("0.25", 0.25), (" 1 / 2 ", 0.5)])
def test_parse_number(value, expected):
    assert parse_number(value) == pytest.approx(expected)


@pytest.mark.parametrize("value", ["abc", "1/0", True, None, [1]])
def test_parse_number_rejects(value):
    with pytest.raises(ConfigError):
        parse_number(value)


def test_global_registries_have_builtins():
    import robustkit

    assert "pgd" in robustkit.ATTACKS
    assert "gaussian_noise" in robustkit.PREPROCESSORS
    assert {"train", "evaluate", "save_model", "load_model"} <= set(robustkit.STEPS.names())
