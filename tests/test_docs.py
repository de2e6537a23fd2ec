"""The README's Python example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    text = README.read_text()
    match = re.search(r"## Wrap a model in Python\n\n```python\n(.*?)```", text, re.S)
    assert match, "README lost its Python example"
    namespace: dict = {}
    exec(compile(match.group(1), "README.md", "exec"), namespace)
    res = namespace["res"]
    assert 0.0 <= res.robust_accuracy <= res.clean_accuracy <= 1.0
    assert namespace["logits"].shape == (8, 10)


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert 'pip install -e . && robustkit demo' in text
    assert 'pip install -e ".[test]" && pytest' in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'pip install torch==2.14.1 torchvision==0.29.1 && pip install -e ".[test]" && pytest' in ci
