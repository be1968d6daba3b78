"""The README's usage example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_usage_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "the README has a Python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    assert namespace["G"].shape == namespace["H"].shape == (73, 73)  # 10*5+5 + 5*3+3
    assert (
        "torch.Size([8, 5, 10]) torch.Size([3, 8, 5, 10]) torch.Size([5, 10])"
        in capsys.readouterr().out
    )
