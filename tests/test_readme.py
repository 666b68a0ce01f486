"""The README's quickstart runs as written."""

import re
from pathlib import Path


def test_readme_quickstart_runs(capsys: object) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    match = re.search(r"## Quickstart\n\n```python\n(.*?)```", readme, re.S)
    assert match, "README lost its quickstart"
    code = match.group(1)
    assert len(code.strip().splitlines()) <= 15
    exec(compile(code, "README.md", "exec"), {})
