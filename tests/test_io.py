import json

import pytest
import torch

from robustkit.io import atomic_path, atomic_torch_save, atomic_write_json, atomic_write_text


def test_atomic_text_and_json(tmp_path):
    p = atomic_write_text(tmp_path / "sub" / "a.txt", "hello")
    assert p.read_text() == "hello"
    atomic_write_json(tmp_path / "b.json", {"t": torch.tensor([1.0, 2.0]), "p": tmp_path})
    assert json.loads((tmp_path / "b.json").read_text())["t"] == [1.0, 2.0]


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_unserializable_json_keeps_old(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("{}")
    with pytest.raises(TypeError):
        atomic_write_json(target, {"x": object()})
    assert target.read_text() == "{}"
    assert len(list(tmp_path.iterdir())) == 1


def test_atomic_torch_save(tmp_path):
    atomic_torch_save({"w": torch.ones(2)}, tmp_path / "m.pt")
    assert torch.equal(torch.load(tmp_path / "m.pt")["w"], torch.ones(2))


@pytest.mark.skipif(not hasattr(__import__("os"), "umask") or __import__("sys").platform == "win32",
                    reason="POSIX permissions")
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_umask_mode_not_0600(tmp_path, umask):
    """Issue #12: every report and model.pt was written with mode 0600 (mkstemp)."""
    import os
    import stat

    from robustkit.data import save_npz
    from robustkit.io import current_umask

    old = os.umask(umask)
    try:
        assert current_umask() == umask
        expected = 0o666 & ~umask
        written = [
            atomic_write_text(tmp_path / "report.md", "# r"),
            atomic_write_json(tmp_path / "results.json", {"a": 1}),
            atomic_torch_save({"w": torch.zeros(1)}, tmp_path / "model.pt"),
            save_npz(tmp_path / "d.npz", torch.zeros(2, 1, 2, 2), torch.tensor([0, 1])),
        ]
        for p in written:
            assert stat.S_IMODE(p.stat().st_mode) == expected, p.name
        # replacing an existing file keeps that file's own mode, as open(path, "w") would
        os.chmod(tmp_path / "report.md", 0o640)
        atomic_write_text(tmp_path / "report.md", "# again")
        assert stat.S_IMODE((tmp_path / "report.md").stat().st_mode) == 0o640
    finally:
        os.umask(old)
