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


def test_importance_snippet_runs():
    import torch

    import hesscale

    block = next(b for b in re.findall(r"```python\n(.*?)```", README, flags=re.S) if "prune(" in b)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    namespace = {
        "hesscale": hesscale,
        "model": model,
        "loss_fn": torch.nn.CrossEntropyLoss(),
        "loader": [(x, y)] * 2,
        "task_loader": [(x, y)],
        "x": x,
        "y": y,
    }
    exec(compile(block, "README importance", "exec"), namespace)
    assert namespace["penalty"].tasks == 1
    assert abs(hesscale.pruning.sparsity_of(model) - 0.9) < 0.01  # 65 of the 72 weights
