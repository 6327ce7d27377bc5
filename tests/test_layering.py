"""The core must not import the recipe layer, transformers or peft at import time (it must start fast and stay
usable without them)."""

import subprocess
import sys


def test_core_import_is_light():
    code = (
        "import sys, adaptermerge, adaptermerge.cli, adaptermerge.engine\n"
        "bad = sorted(m for m in ('transformers', 'peft', 'weaverec', 'accelerate', 'matplotlib', 'scipy') if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"core imported: {out.stdout.strip()}"
