"""Build a `jdoptim.JDOptimizer` from a JSON or YAML configuration file.

Without arguments, the script writes a JSON configuration (and a YAML one if PyYAML is
installed) to a temporary folder, builds an optimizer from each file, takes a few steps with
it, and prints the configuration the optimizer writes back (``to_config``), which builds the
same optimizer again. With ``--config PATH`` it reads your own file instead. A configuration
looks like::

    {"aggregator": {"name": "upgrad"}, "chunk_size": null, "nonfinite": "raise"}

where ``"aggregator"`` is a registry name or ``{"name": ..., **arguments}`` (see
``jdoptim.list_aggregators()``) and the other keys are keyword arguments of `JDOptimizer`.

Run ``python examples/config_from_file.py``; see ``--help``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

import jdoptim
from jdoptim import JDOptimizer

try:
    import yaml
except ImportError:  # PyYAML is optional: JSON alone is enough
    yaml = None

EXAMPLE = {
    "aggregator": {"name": "upgrad", "reg_eps": 0.0001},
    "chunk_size": None,
    "nonfinite": "skip",
}


def read_config(path: Path) -> dict[str, Any]:
    """Parse a ``.json``, ``.yaml`` or ``.yml`` file into a mapping."""
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        if yaml is None:
            raise SystemExit(f"Reading {path} needs PyYAML: pip install pyyaml")
        return yaml.safe_load(text)
    if path.suffix == ".json":
        return json.loads(text)
    raise SystemExit(f"Unknown configuration format {path.suffix!r}; use .json, .yaml or .yml.")


def train_a_little(config: dict[str, Any], steps: int) -> JDOptimizer:
    """Build a small two-output regression model's optimizer from ``config`` and step it."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    optimizer = JDOptimizer.from_config(torch.optim.SGD(model.parameters(), lr=0.1), config)
    x, y = torch.randn(64, 8), torch.randn(64, 2)
    with torch.no_grad():
        initial = ((model(x) - y) ** 2).mean(dim=0)
    for _ in range(steps):
        losses = ((model(x) - y) ** 2).mean(dim=0)
        optimizer.zero_grad()
        optimizer.step(losses)
    with torch.no_grad():
        final = ((model(x) - y) ** 2).mean(dim=0)
    print(f"  losses {initial.numpy().round(4)} -> {final.numpy().round(4)} after {steps} steps")
    return optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="a .json, .yaml or .yml file to read")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        paths = [args.config] if args.config else []
        if not paths:
            paths.append(Path(folder, "jd.json"))
            paths[-1].write_text(json.dumps(EXAMPLE, indent=2), encoding="utf-8")
            if yaml is not None:
                paths.append(Path(folder, "jd.yaml"))
                paths[-1].write_text(yaml.safe_dump(EXAMPLE), encoding="utf-8")
            else:
                print("PyYAML is not installed: skipping the YAML file.")
        for path in paths:
            config = read_config(path)
            print(f"From {path.name}: {config}")
            optimizer = train_a_little(config, args.steps)
            written = optimizer.to_config()
            print(f"  aggregator: {optimizer.aggregator!r}")
            print(f"  to_config(): {json.dumps(written)}")
            rebuilt = JDOptimizer.from_config(torch.optim.SGD([torch.zeros(1)], lr=0.1), written)
            assert rebuilt.to_config() == written
            assert jdoptim.to_config(jdoptim.build(written["aggregator"])) == written["aggregator"]
    print("Every configuration round-tripped.")


if __name__ == "__main__":
    main()
