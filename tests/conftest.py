import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Child processes (twistd, the gwms CLI) must import this tree and find its twistd plugins.
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

from hypothesis import settings  # noqa: E402

# CI runs the same examples every time (a failure there is reproducible, never a coin toss);
# developers' runs explore new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
