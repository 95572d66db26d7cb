"""The documentation's code runs, and the site builds without a warning.

Every ```python block of a page under docs/ and of README.md runs, the blocks of one page in
order in one namespace (a page reads as one script). A block preceded by the line
``<!-- no-test -->`` is skipped (for code of other libraries, such as TorchJD's in the migration
guide).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md")) + ([ROOT / "README.md"] if (ROOT / "README.md").exists() else [])
# Packages of the optional extras that some pages use (PyYAML comes with mkdocs).
OPTIONAL_MODULES = ("yaml", "sklearn", "matplotlib", "tqdm", "lightning")
FENCE = re.compile(
    r"^(?P<skip><!-- no-test -->\n)?(?P<indent>[ \t]*)```python[^\n]*\n"
    r"(?P<code>.*?)^(?P=indent)```",
    flags=re.MULTILINE | re.DOTALL,
)


def python_blocks(text: str, *, skipped: bool = False) -> list[str]:
    """The code of the ```python blocks of a Markdown text, without the skipped ones unless
    ``skipped``."""
    blocks = []
    for match in FENCE.finditer(text):
        if match.group("skip") and not skipped:
            continue
        indent = len(match.group("indent"))
        blocks.append("".join(line[indent:] for line in match.group("code").splitlines(True)))
    return blocks


def test_python_blocks_are_found_and_skipped() -> None:
    text = (
        "Intro\n```python\nx = 1\n```\n<!-- no-test -->\n```python\nimport torchjd\n```\n"
        '- item\n\n    ```python title="indented"\n    y = x + 1\n    ```\n```bash\nls\n```\n'
    )
    assert python_blocks(text) == ["x = 1\n", "y = x + 1\n"]


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_python_fence_is_found(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert len(python_blocks(text, skipped=True)) == text.count("```python"), page


@pytest.mark.parametrize(
    "page", [p for p in PAGES if python_blocks(p.read_text(encoding="utf-8"))], ids=_page_id
)
def test_code_blocks_run(page: Path) -> None:
    blocks = python_blocks(page.read_text(encoding="utf-8"))
    namespace: dict[str, object] = {"__name__": "__docs__"}
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: more threads only wait on each other
    try:
        for number, code in enumerate(blocks, start=1):
            try:
                exec(compile(code, f"{_page_id(page)}, block {number}", "exec"), namespace)
            except ModuleNotFoundError as error:
                if error.name not in OPTIONAL_MODULES:
                    raise
                pytest.skip(f"{_page_id(page)} needs {error.name}, which is not installed")
            except Exception as error:
                raise AssertionError(
                    f"Block {number} of {_page_id(page)} failed:\n{code}"
                ) from error
    finally:
        torch.set_num_threads(threads)


def test_every_page_is_in_the_nav_or_generated() -> None:
    # mkdocs --strict reports pages left out of the nav; this points at the file directly.
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    listed = set(re.findall(r"([\w/.-]+\.md)\s*$", config, flags=re.MULTILINE))
    for page in DOCS.rglob("*.md"):
        uri = page.relative_to(DOCS).as_posix()
        if uri.startswith("benchmarks/"):
            continue  # the hook adds every benchmark page to the nav
        if uri.startswith("snippets/"):
            continue  # included into pages, not pages themselves
        assert uri in listed, f"{uri} is not in mkdocs.yml's nav"


def _hooks():
    """The docs hook module, which knows what pages it generates."""
    spec = importlib.util.spec_from_file_location(
        "jdoptim_docs", DOCS / "hooks" / "jdoptim_docs.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built once with ``mkdocs build --strict``."""
    missing = [
        name
        for name in ("mkdocs", "material", "mkdocstrings", "latex2mathml")
        if importlib.util.find_spec(name) is None
    ]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (the docs extra)")
    tmp_path = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-6000:]
    return tmp_path


def test_mkdocs_build_strict(site: Path) -> None:
    tmp_path = site
    assert (tmp_path / "index.html").exists()
    hooks = _hooks()
    # Every registered method is documented on its generated page, under its own anchor.
    for page in hooks.method_pages():
        html = (tmp_path / page.src_uri.removesuffix(".md") / "index.html").read_text("utf-8")
        for spec in page.specs:
            assert f'id="{hooks.identifier(spec.cls)}"' in html, spec.name
    # ... and listed, with a link, in the table of its kind.
    tables = {
        "aggregator": tmp_path / "aggregators" / "index.html",
        "weighting": tmp_path / "aggregators" / "index.html",
        "scalarizer": tmp_path / "scalarizers" / "index.html",
    }
    for spec in hooks._specs():
        table = tables.get(spec.kind, tables["aggregator"]).read_text(encoding="utf-8")
        assert f"<code>{spec.name}</code>" in table, f"{spec.name} is missing from its table"
    for name in hooks.public_modules():
        assert (tmp_path / "reference" / name / "index.html").exists(), name
    assert "Unreleased" in (tmp_path / "changelog" / "index.html").read_text(encoding="utf-8")


# An address outside the site: "//host/..." or a scheme such as "https:".
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", flags=re.IGNORECASE)


def test_the_site_loads_nothing_from_the_network(site: Path) -> None:
    """Scripts, style sheets, fonts and images come from the site itself, so that it reads the
    same offline; links to papers may point anywhere."""
    loaded = re.compile(
        r"<(?:script|img|iframe|source)\b[^>]*?\bsrc=[\"']([^\"']+)"
        r"|<link\b[^>]*?\bhref=[\"']([^\"']+)[^>]*>"
        r"|@import\s+(?:url\()?[\"']?([^\"')\s]+)"
        r"|url\([\"']?([^\"')]+)",
        flags=re.IGNORECASE,
    )
    pages = sorted(site.rglob("*.html")) + sorted(site.rglob("*.css"))
    assert len(pages) > 50, "the site has fewer pages than expected"
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for match in loaded.finditer(text):
            address = next(group for group in match.groups() if group)
            tag = match.group(0)
            if tag.lower().startswith("<link") and not re.search(
                r"rel=[\"']?(?:stylesheet|preload|preconnect|icon|modulepreload)", tag, re.I
            ):
                continue  # canonical, alternate: not loaded
            if address.startswith("data:"):
                continue
            assert not EXTERNAL.match(address), f"{page.relative_to(site)} loads {address}"


def test_formulas_are_rendered_into_mathml(site: Path) -> None:
    """No formula is left as LaTeX for a script to typeset."""
    formulas = 0
    for page in site.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        for element in re.findall(r'class="arithmatex">(.*?)</(?:span|div)>', text, re.DOTALL):
            formulas += 1
            assert element.startswith("<math"), f"{page.relative_to(site)}: {element[:200]}"
            assert not re.search(r"<m[io][^>]*>\\[A-Za-z]", element), element[:300]
            # MathML Core (Chromium) ignores every mathvariant but "normal".
            assert not re.search(r'mathvariant="(?!normal")', element), element[:300]
        assert "mathjax" not in text.lower(), page.relative_to(site)
    assert formulas > 100, formulas


def test_the_table_of_costs_lists_every_aggregator() -> None:
    """The table is generated by tests/benchmarks/bench_methods.py: a method registered since
    it was generated needs it generated again."""
    import jdoptim

    table = (DOCS / "snippets" / "method_costs.md").read_text(encoding="utf-8")
    assert "python tests/benchmarks/bench_methods.py" in table
    listed = set(re.findall(r"\]\(\.\./aggregators/(\w+)\.md\)", table))
    missing = set(jdoptim.list_aggregators()) - listed
    assert not missing, f"run python tests/benchmarks/bench_methods.py: {sorted(missing)} missing"
    assert (DOCS / "guides" / "choosing.md").read_text(encoding="utf-8").count(
        '--8<-- "docs/snippets/method_costs.md"'
    ) == 1


def test_the_cite_page_has_the_paper_of_every_registered_method() -> None:
    import jdoptim

    cite = re.sub(r" +", " ", (DOCS / "cite.md").read_text(encoding="utf-8"))
    assert f"version = {{{jdoptim.__version__}}}" in cite
    names = jdoptim.list_aggregators() + jdoptim.list_weightings() + jdoptim.list_scalarizers()
    for name in names:
        paper = jdoptim.get_spec(name).paper
        if paper is None:
            continue
        arxiv = re.search(r"arxiv\.org/abs/([\d.]+)", paper)
        key = f"eprint = {{{arxiv.group(1)}}}" if arxiv else paper
        assert key in cite, f"cite.md has no entry for {name} ({paper})"


def test_the_home_page_lists_every_example() -> None:
    home = (DOCS / "index.md").read_text(encoding="utf-8")
    for script in sorted((ROOT / "examples").glob("*.py")):
        assert f"`{script.name}`" in home, f"docs/index.md does not list examples/{script.name}"


def test_every_included_file_is_included(site: Path) -> None:
    """A file included with pymdownx.snippets (``--8<-- "path"``) appears in the built page,
    and no snippet marker is left, for instance in a code block a formatter rewrote."""
    for page in DOCS.rglob("*.md"):
        text = page.read_text(encoding="utf-8")
        assert not re.search(r"--8\s+<|<\s+--\s*\"", text), f"a rewritten snippet marker in {page}"
        included = re.findall(r'^--8<-- "([^"]+)"$', text, re.M)
        if not included or page.parent.name == "snippets":
            continue
        uri = page.relative_to(DOCS).with_suffix("").as_posix()
        html = (site / uri.removesuffix("index") / "index.html").read_text(encoding="utf-8")
        for path in included:
            first_line = (ROOT / path).read_text(encoding="utf-8").splitlines()[0]
            words = re.findall(r"[A-Za-z]{4,}", first_line)[:3]
            assert all(word in html for word in words), f"{path} is not in {uri}"
    for page in site.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        assert not re.search(r"--8\s*&lt;", text), f"an unexpanded snippet in {page}"


def test_every_page_has_a_title_of_its_own(site: Path) -> None:
    titles: dict[str, Path] = {}
    for page in sorted(site.rglob("index.html")):
        match = re.search(r"<title>(.*?)</title>", page.read_text(encoding="utf-8"), re.S)
        if match is None or page.parent.name == "404":
            continue
        title = match.group(1).strip()
        assert title not in titles, f"{page} and {titles[title]} are both titled {title!r}"
        titles[title] = page
    assert len(titles) > 50
