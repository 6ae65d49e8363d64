"""The README's quickstart runs as written, and its two commands stay at the top."""

import re
from pathlib import Path

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_quickstart_runs():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    namespace: dict = {}
    exec(compile(blocks[0], "README quickstart", "exec"), namespace)
    assert namespace["loss"].item() < 2.5


def test_the_two_commands_open_the_readme():
    commands = re.findall(r"```bash\n(.*?)```", README, flags=re.S)[:2]
    assert "hesscale reproduce" in commands[0]
    assert "pytest" in commands[1]
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    assert "pytest" in ci
