"""The code's references to the design document point at docs/architecture.md and its sections."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCH = ROOT / "docs" / "architecture.md"
SOURCES = [p for folder in ("n3sets", "n3images", "data_prep", "pipelines", "benchmarks") for p in (ROOT / folder).glob("*.py")]
SOURCES.append(ROOT / "hubconf.py")


def test_references_name_the_repository_file_and_existing_sections():
    sections = set(re.findall(r"^## (.+?)\s*$", ARCH.read_text(), flags=re.M))
    cited = 0
    for path in SOURCES:
        text = path.read_text()
        for m in re.finditer(r"(\S*)architecture\.md(?:, (\w+))?", text):
            assert m.group(1).endswith("docs/"), f"{path.name}: {m.group(0)!r} should name docs/architecture.md"
            if m.group(2):
                assert m.group(2) in sections, f"{path.name}: no section {m.group(2)!r} in docs/architecture.md"
            cited += 1
    assert cited >= 5


def test_layout_lists_every_program():
    text = ARCH.read_text()
    for path in (ROOT / "pipelines").glob("*.py"):
        assert path.name in text, f"docs/architecture.md does not list pipelines/{path.name}"
