"""The README's promises that code can check."""

import re
from pathlib import Path

from gwms.config import reference_markdown

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_configuration_reference_matches_the_code():
    block = README.split("<!-- config-reference -->\n", 1)[1].split("<!-- /config-reference -->", 1)[0]
    assert block.strip() == reference_markdown().strip()


def test_ci_runs_the_readme_test_command_verbatim():
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```sh\n(.+?)\n```", quick)
    assert len(commands) == 2
    assert commands[1] in (ROOT / ".ci" / "run").read_text()
