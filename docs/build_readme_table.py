"""Regenerate the settings table at the end of README.md from lib/settings.SCHEMA."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lib.settings import schema_markdown  # noqa: E402

readme = REPO / "README.md"
text = readme.read_text(encoding="utf-8")
start = text.index("| key | type | default | step | meaning |")
end = text.find("\n\n", start)
end = len(text) if end < 0 else end
readme.write_text(text[:start] + schema_markdown() + text[end:], encoding="utf-8")
