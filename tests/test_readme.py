"""The README's examples run as written."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _block(heading: str) -> str:
    text = README.read_text()
    section = text.split(f"## {heading}", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_first_block_has_exactly_the_two_commands():
    first = re.search(r"```sh\n(.*?)```", README.read_text(), re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first.strip().splitlines()]
    assert commands == ["make run", "make test"]


def test_fifteen_line_tunnel_example_runs():
    code = _block("A tunnel in 15 lines")
    assert len([line for line in code.splitlines() if line.strip()]) <= 15
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    assert "status: SERVING" in out.getvalue()
