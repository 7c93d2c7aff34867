"""
Every Python code block of `docs/*.md` runs.

The blocks of a page run in order, in one namespace, in a fresh temporary working directory, offline. A block that
cannot run offline (a real Hub id, a GPU) is marked with an HTML comment on the line before its fence, which Markdown
renderers hide:

    <!-- skip-test: why it cannot run here -->
    ```python
    model = MoERewardModel.from_backbone("Qwen/Qwen2.5-0.5B-Instruct")
    ```

The reason is mandatory, and skipped blocks must stay a minority of each page's blocks.
"""

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from huggingface_hub import constants as hub_constants


DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(DOCS.glob("*.md"))
REQUIRED_PAGES = ("index.md", "quickstart.md", "concepts.md", "hub.md", "analysis.md", "api.md")
SKIP_MARKER = re.compile(r"^<!--\s*skip-test(?::\s*(?P<reason>.*?))?\s*-->$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<ticks>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


@dataclass
class CodeBlock:
    page: str
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    skip_reason: str | None = None
    skipped: bool = False


def extract_blocks(text: str, page: str = "<page>") -> list[CodeBlock]:
    """The fenced code blocks of a Markdown text, with their language and skip marker."""
    lines = text.splitlines()
    blocks = []
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        ticks, indent = match["ticks"], len(match["indent"])
        start = index
        body = []
        index += 1
        while index < len(lines) and not lines[index].strip().startswith(ticks):
            line = lines[index]
            body.append(line[min(indent, len(line) - len(line.lstrip(" "))) :])  # the list-item indent
            index += 1
        index += 1  # closing fence
        previous = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = SKIP_MARKER.match(previous)
        blocks.append(
            CodeBlock(
                page=page,
                line=start + 1,
                language=match["info"].lower(),
                code="\n".join(body) + "\n",
                skip_reason=(marker["reason"] or "") if marker else None,
                skipped=marker is not None,
            )
        )
    return blocks


def python_blocks(path: Path) -> list[CodeBlock]:
    return [
        block
        for block in extract_blocks(path.read_text(encoding="utf-8"), path.name)
        if block.language in ("python", "py")
    ]


def run_page(path: Path, workdir: Path) -> list[CodeBlock]:
    """Runs the Python blocks of one page in order in one namespace; returns the blocks that ran."""
    namespace = {"__name__": f"docs_{path.stem}"}
    ran = []
    for block in python_blocks(path):
        if block.skipped:
            continue
        if block.code.lstrip().startswith(">>>"):
            raise AssertionError(
                f"{path.name}:{block.line}: write doc blocks as plain code, not doctest `>>>` prompts."
            )
        try:
            exec(compile(block.code, f"{path.name}:{block.line}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(
                f"The Python block at {path.name}:{block.line} failed with {type(error).__name__}: {error}\n\n"
                f"{block.code}\nMark it `<!-- skip-test: reason -->` only if it cannot run offline."
            ) from error
        ran.append(block)
    return ran


# ----------------------------------------------------------------------------------------------------------------------
# The runner itself
# ----------------------------------------------------------------------------------------------------------------------


SAMPLE = """# Title

```python
x = 1
```

<!-- skip-test: needs the Hub -->

```python
raise RuntimeError("never run")
```

```bash
echo not python
```

- a list item with code:

  ```python
  if x:
      y = x + 1
  ```

````python
z = '''```'''
````
"""


def test_extract_blocks_languages_skip_markers_and_indentation(tmp_path):
    blocks = extract_blocks(SAMPLE)
    assert [(b.language, b.skipped) for b in blocks] == [
        ("python", False),
        ("python", True),
        ("bash", False),
        ("python", False),
        ("python", False),
    ]
    assert blocks[1].skip_reason == "needs the Hub"
    assert blocks[3].code == "if x:\n    y = x + 1\n" and blocks[3].line == 19
    page = tmp_path / "sample.md"
    page.write_text(SAMPLE)
    ran = run_page(page, tmp_path)
    assert [b.line for b in ran] == [3, 19, 24]

    page.write_text("```python\n1 / 0\n```\n")
    with pytest.raises(AssertionError, match=r"sample.md:1 failed with ZeroDivisionError"):
        run_page(page, tmp_path)


# ----------------------------------------------------------------------------------------------------------------------
# The pages
# ----------------------------------------------------------------------------------------------------------------------


def test_required_pages_exist():
    missing = [name for name in REQUIRED_PAGES if not (DOCS / name).is_file()]
    assert not missing, f"missing documentation pages: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_links_resolve(page):
    text = page.read_text(encoding="utf-8")
    text = "\n".join(block_free_lines(text))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        path, _, anchor = target.partition("#")
        if not (page.parent / path).exists():
            broken.append(target)
        elif anchor and path.endswith(".md") and anchor not in heading_anchors(page.parent / path):
            broken.append(target)
    assert not broken, f"{page.name} links to missing files or headings: {broken}"


def heading_anchors(page: Path) -> set[str]:
    """GitHub-style anchors of the headings of a Markdown page."""
    anchors = set()
    for line in block_free_lines(page.read_text(encoding="utf-8")):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*$", line)
        if match:
            title = re.sub(r"[`*_]", "", match[1]).strip().lower()
            anchors.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return anchors


def test_api_page_covers_the_public_names():
    import trl_moe_rm
    import trl_moe_rm.hub

    text = (DOCS / "api.md").read_text(encoding="utf-8")
    names = [*trl_moe_rm.__all__, *trl_moe_rm.hub.__all__]
    missing = [name for name in names if not re.search(rf"`{name}[`(.]", text)]
    assert not missing, f"docs/api.md does not document {missing}"


def block_free_lines(text: str) -> list[str]:
    """The lines of a Markdown text outside fenced code blocks."""
    out, fence = [], None
    for line in text.splitlines():
        match = FENCE.match(line)
        if fence is None and match:
            fence = match["ticks"]
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is None:
            out.append(line)
    return out


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_skipped_blocks_have_a_reason_and_are_few(page):
    blocks = python_blocks(page)
    skipped = [block for block in blocks if block.skipped]
    assert all(block.skip_reason for block in skipped), f"{page.name}: give every skip-test marker a reason"
    if len(blocks) >= 3:
        assert len(skipped) * 2 <= len(blocks), (
            f"{page.name}: {len(skipped)} of {len(blocks)} Python blocks are skipped; make them run offline on tiny "
            "models instead."
        )


# Pages whose examples train a model (about 20 s of CPU each): marked slow, so that `make test-unit` stays quick.
SLOW_PAGES = {"quickstart.md", "analysis.md"}


@pytest.mark.parametrize(
    "page",
    [pytest.param(page, marks=pytest.mark.slow) if page.name in SLOW_PAGES else page for page in PAGES],
    ids=[page.name for page in PAGES],
)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    run_page(page, tmp_path)


README = DOCS.parent / "README.md"


def test_readme_blocks_run(tmp_path, monkeypatch):
    """
    The README's scoring and personalization snippets run, on a tiny model saved under the name the (skipped,
    Hub-downloading) training snippet writes.
    """
    from tiny import tiny_moe, tiny_tokenizer

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    tokenizer = tiny_tokenizer()
    tiny_moe("llama", tokenizer).save_pretrained(tmp_path / "Qwen2.5-0.5B-MoE-Reward")
    tokenizer.save_pretrained(tmp_path / "Qwen2.5-0.5B-MoE-Reward")
    ran = run_page(README, tmp_path)
    assert any("score(" in block.code for block in ran) and any("fit_user_weights" in block.code for block in ran)


def shell_command_lines(text: str, program: str) -> list[str]:
    """The `program ...` lines of a Markdown text's shell blocks, backslash continuations joined."""
    lines, fence, pending = [], None, ""
    for line in text.splitlines():
        match = FENCE.match(line)
        if fence is None:
            if match:
                fence = match["ticks"] if match["info"] in ("bash", "sh", "shell", "console") else "skip:" + match["ticks"]
            continue
        if line.strip().startswith(fence.removeprefix("skip:")):
            fence, pending = None, ""
            continue
        if fence.startswith("skip:"):
            continue
        pending += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            if pending.strip().startswith(program + " "):
                lines.append(" ".join(pending.split()))
            pending = ""
    return lines


def test_every_documented_command_line_parses():
    """Each `trl-moe-rm <command> ...` line of the README and the docs uses options the command has (but `train`)."""
    import shlex

    from trl_moe_rm.cli import build_parser

    parser, _ = build_parser()
    checked = 0
    for page in [README, *PAGES]:
        for line in shell_command_lines(page.read_text(encoding="utf-8"), "trl-moe-rm"):
            argv = [arg for arg in shlex.split(line, comments=True)[1:] if arg != "&"]
            if argv[0] == "train" or "--help" in argv:
                continue
            try:
                parser.parse_args(argv)
            except SystemExit as error:
                pytest.fail(f"{page.name}: `{line}` does not parse (exit {error.code})")
            checked += 1
    assert checked >= 10


def test_shell_command_lines_joins_continuations():
    text = "```bash\ntrl-moe-rm score --a 1 \\\n    --b 2  # note\necho hi\n```\n```python\ntrl-moe-rm x\n```\n"
    assert shell_command_lines(text, "trl-moe-rm") == ["trl-moe-rm score --a 1 --b 2 # note"]
    from trl_moe_rm.cli import build_parser

    with pytest.raises(SystemExit):  # what the test above catches: an option the command does not have
        build_parser()[0].parse_args(["score", "--model_name_or_path", "m", "--dataset_name", "d", "--output_file", "o", "--nope"])
