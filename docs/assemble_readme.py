"""Assemble README.md from the section files in docs/readme/ (kept for editing) and the
settings table generated from lib/settings.SCHEMA."""
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
from lib.settings import schema_markdown  # noqa: E402

parts = [p.read_text(encoding="utf-8").strip() for p in sorted((REPO / "docs/readme").glob("*.md"))]
text = "\n\n".join(parts) + "\n"
head = "| key | type | default | step | meaning |"
text = text.replace(head, schema_markdown(), 1)
(REPO / "README.md").write_text(text, encoding="utf-8")
print(f"README.md: {len(text.splitlines())} lines")
