"""setup.cfg and environment.yml must install the same set of packages."""

import configparser
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def names(requirements: list[str]) -> set[str]:
    out = set()
    for req in requirements:
        req = req.strip()
        if not req or req.startswith("-e"):
            continue
        out.add(re.split(r"[<>=!~ \[]", req, maxsplit=1)[0].lower().replace("_", "-"))
    return out


def test_setup_cfg_and_environment_yml_agree():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    setup = names(cfg["options"]["install_requires"].splitlines())
    setup |= names(cfg["options.extras_require"]["dev"].splitlines())
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda, pip = [], []
    for dep in env["dependencies"]:
        (pip.extend(dep["pip"]) if isinstance(dep, dict) else conda.append(dep))
    listed = names(conda + pip) - {"python", "pip"}
    assert listed == setup, f"only in setup.cfg: {setup - listed}; only in environment.yml: {listed - setup}"
    assert {"torch", "transformers", "diffusers", "peft", "deepspeed", "submitit", "h5py", "omegaconf",
            "safetensors", "pillow", "numpy", "tqdm", "pytest", "ruff", "hypothesis"} <= setup
