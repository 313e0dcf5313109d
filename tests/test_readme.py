"""The README's list of config groups names every group and every option in conf/."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def config_groups_paragraph() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("Config groups (`conf/`)")
    return text[start : text.index("\n\n", start)]


def test_readme_lists_every_config_group_and_option() -> None:
    paragraph = config_groups_paragraph()
    named = set(re.findall(r"`([^`]+)`", paragraph))
    missing = []
    for group in sorted(p for p in (ROOT / "conf").iterdir() if p.is_dir() and p.name != "local"):
        if group.name not in named:
            missing.append(f"group {group.name}")
        for option in sorted(group.glob("*.yaml")):
            if option.stem not in named:
                missing.append(f"{group.name}={option.stem}")
        for sub in sorted(p for p in group.iterdir() if p.is_dir()):
            for fragment in sorted(sub.glob("*.yaml")):
                name = f"{group.name}/{sub.name}"
                shown = {f"{name}/{fragment.name}", name}
                if not shown & named:
                    missing.append(f"{name}/{fragment.name}")
                elif sub.name != "base":  # a nested group (hydra/launcher): its options too
                    if fragment.stem not in named:
                        missing.append(f"{name}={fragment.stem}")
    assert not missing, f"README's config-group paragraph does not name: {missing}"
