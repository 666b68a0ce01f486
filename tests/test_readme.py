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


def test_readme_says_what_a_test_run_covers_and_ci_requires_every_interpreter() -> None:
    """tox skips an interpreter it cannot find: the README must not let a run on one
    Python pass for all three, and CI must fail on a missing one."""
    root = Path(__file__).parent.parent
    readme = " ".join((root / "README.md").read_text().split())
    assert "py311-313" in readme
    assert "*skips* the ones this machine lacks" in readme
    assert "TOX_SKIP_MISSING_INTERPRETERS=false python3 -m tox" in readme
    ci = (root / ".ci" / "run").read_text()
    required = ci.index("export TOX_SKIP_MISSING_INTERPRETERS=false")
    assert required < ci.index("python3 -m tox")
    tox = (root / "tox.ini").read_text()
    assert re.search(r"^envlist = .*py311, py312, py313", tox, re.M)
