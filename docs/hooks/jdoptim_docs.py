"""mkdocs hooks that keep the documentation in step with the package.

Everything listed here is read from jdoptim at build time, so a newly registered method or a new
public name appears in the site without editing any page:

- one page per module of registered methods, ``aggregators/<name>.md`` (an aggregator and the
  weighting defined beside it share a page), appended to the "Aggregators" section of the nav
  (methods of other kinds, such as scalarizers, in a sub-section per kind); a hand-written page
  at the same path takes precedence;
- the table of the registered methods of each kind with their declared properties
  (``jdoptim.get_spec``), in place of ``<!-- jdoptim:table KIND -->`` where KIND is
  ``aggregator``, ``weighting``, ... (`Spec.kind`), and a titled table for each other kind
  present in place of ``<!-- jdoptim:other-tables -->``;
- the index of ``jdoptim.__all__`` in place of ``<!-- jdoptim:api-index -->``, and one page per
  public submodule, ``reference/<name>.md``, appended to the "API reference" section;
- the list of benchmark pages found in ``docs/benchmarks/`` in place of
  ``<!-- jdoptim:benchmark-pages -->``, each appended to the "Benchmarks" section.
"""

from __future__ import annotations

import inspect
import json
import posixpath
import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jdoptim
from jdoptim.registry import Spec

TABLE = re.compile(r"<!-- jdoptim:table (\w+) -->")
OTHER_TABLES = "<!-- jdoptim:other-tables -->"
API_INDEX = "<!-- jdoptim:api-index -->"
# Kinds of registered methods with a table and nav entries of their own on the Aggregators page.
MAIN_KINDS = ("aggregator", "weighting")
BENCHMARK_PAGES = "<!-- jdoptim:benchmark-pages -->"

# Public submodules documented on their own page even when not re-exported in jdoptim.__all__.
EXTRA_MODULES = ("linalg",)
# Section titles of the API index, by defining module; other modules use their own name.
MODULE_TITLES = {
    "jdoptim.optimizer": "Optimizer",
    "jdoptim.registry": "Registry and configuration",
    "jdoptim.aggregation._bases": "Base classes",
}
PROPERTIES = (
    ("non_conflicting", "Non-conflicting"),
    ("linear_under_scaling", "Linear under scaling"),
    ("permutation_invariant", "Permutation invariant"),
    ("stateful", "Stateful"),
    ("randomised", "Randomised"),
)


@dataclass
class MethodPage:
    """The registered classes defined in one module, documented on one page."""

    slug: str
    title: str
    specs: list[Spec]

    @property
    def src_uri(self) -> str:
        return f"aggregators/{self.slug}.md"

    @property
    def kind(self) -> str:
        return self.specs[0].kind


def _specs() -> list[Spec]:
    """The specs of jdoptim's own registered methods, of every kind the registry lists."""
    names: list[str] = []
    for kind in ("aggregators", "weightings", "scalarizers"):
        lister = getattr(jdoptim.registry, f"list_{kind}", None)
        names += lister() if lister is not None else []
    specs = [jdoptim.get_spec(name) for name in names]
    return [spec for spec in specs if spec.cls.__module__.startswith("jdoptim.")]


def method_pages() -> list[MethodPage]:
    """One page per module holding registered methods, aggregators first, sorted by slug."""
    by_module: dict[str, list[Spec]] = {}
    for spec in _specs():
        by_module.setdefault(spec.cls.__module__, []).append(spec)
    pages = []
    for specs in by_module.values():
        specs.sort(key=lambda spec: (spec.kind != "aggregator", spec.name))
        pages.append(MethodPage(slug=specs[0].name, title=specs[0].cls.__name__, specs=specs))
    return sorted(pages, key=lambda page: page.slug)


def page_of(spec: Spec) -> MethodPage:
    return next(page for page in method_pages() if spec in page.specs)


def identifier(obj: Any) -> str:
    """The public dotted path of a class or function when jdoptim exports it, else its own."""
    name = getattr(obj, "__name__", "")
    if getattr(jdoptim, name, None) is obj:
        return f"jdoptim.{name}"
    return f"{obj.__module__}.{obj.__qualname__}"


def public_modules() -> list[str]:
    exported = [
        name for name in jdoptim.__all__ if isinstance(getattr(jdoptim, name), types.ModuleType)
    ]
    return sorted(set(exported) | set(EXTRA_MODULES))


def _link(from_uri: str, to_uri: str) -> str:
    return posixpath.relpath(to_uri, posixpath.dirname(from_uri) or ".")


def _mark(value: bool) -> str:
    return "✓" if value else "✗"


def paper_link(url: str | None) -> str:
    if not url:
        return ""
    match = re.search(r"arxiv\.org/(?:abs|pdf)/([\w.]+?)(?:v\d+)?(?:\.pdf)?$", url)
    label = f"arXiv:{match.group(1)}" if match else re.sub(r"^https?://(www\.)?", "", url)
    return f"[{label}]({url})"


def properties_table(specs: list[Spec], from_uri: str, *, link: bool = True) -> str:
    header = ["Method", "Registry name", "Gramian-based"] + [title for _, title in PROPERTIES]
    rows = ["| " + " | ".join([*header, "Paper"]) + " |", "|" + " --- |" * (len(header) + 1)]
    for spec in specs:
        name = f"`{spec.cls.__name__}`"
        if link:
            name = f"[{name}]({_link(from_uri, page_of(spec).src_uri)})"
        cells = [name, f"`{spec.name}`", _mark(spec.gramian_based)]
        cells += [_mark(getattr(spec, field)) for field, _ in PROPERTIES]
        cells.append(paper_link(spec.paper))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def config_example(spec: Spec) -> str:
    """The configuration of a default instance, or of the registry's example for three
    objectives when the constructor has required arguments."""
    name = spec.cls.__name__
    try:
        config = jdoptim.to_config(spec.cls())
        text = f'`jdoptim.build("{spec.name}")` builds `{name}` with its defaults:'
    except TypeError:
        example = getattr(spec, "example", None)
        if example is None:
            parameters = inspect.signature(spec.cls.__init__).parameters
            arguments = ", ".join(f"`{p}`" for p in parameters if p != "self")
            return f"`{name}` has no defaults; configure it with the arguments {arguments}."
        config = jdoptim.to_config(example(3))
        text = f"`{name}` needs arguments; for example, for three objectives:"
    return f"{text}\n\n```json\n{json.dumps(config, indent=2)}\n```"


def method_page_markdown(page: MethodPage) -> str:
    parts = [
        f"# {page.title}",
        properties_table(page.specs, page.src_uri, link=False),
        "See [the table of all methods](index.md) for what the properties mean.",
    ]
    parts += [config_example(spec) for spec in page.specs]
    parts += [f"::: {identifier(spec.cls)}" for spec in page.specs]
    return "\n\n".join(parts) + "\n"


def module_page_markdown(name: str) -> str:
    return (
        f"# `jdoptim.{name}`\n\n::: jdoptim.{name}\n    options:\n      show_root_heading: false\n"
    )


def api_index(from_uri: str) -> str:
    registered = {spec.cls: spec for spec in _specs()}
    sections: dict[str, list[str]] = {}
    methods: list[Spec] = []
    modules: list[str] = []
    for name in jdoptim.__all__:
        obj = getattr(jdoptim, name)
        if isinstance(obj, types.ModuleType):
            modules.append(name)
        elif obj in registered:
            methods.append(registered[obj])
        elif inspect.isclass(obj) or inspect.isfunction(obj):
            sections.setdefault(obj.__module__, []).append(f"::: jdoptim.{name}")
    order = [m for m in MODULE_TITLES if m in sections] + sorted(set(sections) - set(MODULE_TITLES))
    parts = []
    for module in order:
        parts.append(f"## {MODULE_TITLES.get(module, f'`{module}`')}")
        parts += [block + "\n    options:\n      heading_level: 3" for block in sections[module]]
    parts.append("## Aggregators and weightings")
    parts.append(
        "Each registered method has its own page, listed under Aggregators; "
        "all of them are importable from `jdoptim`:"
    )
    parts.append(
        "\n".join(
            f"- [`{spec.cls.__name__}`]({_link(from_uri, page_of(spec).src_uri)})"
            for spec in sorted(methods, key=lambda spec: spec.cls.__name__.lower())
        )
    )
    parts.append("## Submodules")
    parts.append(
        "\n".join(
            f"- [`jdoptim.{name}`]({_link(from_uri, f'reference/{name}.md')})"
            for name in public_modules()
        )
    )
    return "\n\n".join(parts)


def benchmark_pages(docs_dir: str) -> list[tuple[str, str]]:
    """``(title, src_uri)`` of every page in docs/benchmarks/ other than its index."""
    pages = []
    for path in sorted(Path(docs_dir, "benchmarks").glob("*.md")):
        if path.name == "index.md":
            continue
        heading = re.search(r"^# (.+)$", path.read_text(encoding="utf-8"), flags=re.MULTILINE)
        title = heading.group(1).strip() if heading else path.stem.replace("_", " ").capitalize()
        pages.append((title, f"benchmarks/{path.name}"))
    return pages


def _extend_section(nav: list, title: str, entries: list[dict[str, Any]]) -> None:
    for item in nav:
        if isinstance(item, dict) and title in item:
            section = item[title]
            present = [next(iter(e.values())) if isinstance(e, dict) else e for e in section]
            section += [e for e in entries if next(iter(e.values())) not in present]
            return
    raise ValueError(f"mkdocs.yml's nav has no section {title!r} for the generated pages.")


def on_config(config: Any) -> Any:
    nav = config["nav"]
    pages = method_pages()
    entries: list[dict[str, Any]] = [{p.title: p.src_uri} for p in pages if p.kind in MAIN_KINDS]
    for kind in sorted({p.kind for p in pages} - set(MAIN_KINDS)):
        of_kind = [{p.title: p.src_uri} for p in pages if p.kind == kind]
        entries.append({f"{kind.capitalize()}s": of_kind})
    _extend_section(nav, "Aggregators", entries)
    _extend_section(
        nav,
        "API reference",
        [{f"jdoptim.{name}": f"reference/{name}.md"} for name in public_modules()],
    )
    _extend_section(
        nav, "Benchmarks", [{title: uri} for title, uri in benchmark_pages(config["docs_dir"])]
    )
    return config


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    generated = {page.src_uri: method_page_markdown(page) for page in method_pages()}
    generated |= {f"reference/{name}.md": module_page_markdown(name) for name in public_modules()}
    for src_uri, content in generated.items():
        if files.get_file_from_path(src_uri) is None:
            files.append(File.generated(config, src_uri, content=content))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    uri = page.file.src_uri
    specs = _specs()

    def table(match: re.Match) -> str:
        of_kind = [spec for spec in specs if spec.kind == match.group(1)]
        return properties_table(of_kind, uri) if of_kind else f"No {match.group(1)} yet."

    markdown = TABLE.sub(table, markdown)
    if OTHER_TABLES in markdown:
        kinds = sorted({spec.kind for spec in specs} - set(MAIN_KINDS))
        sections = [
            f"### {kind.capitalize()}s\n\n"
            + properties_table([spec for spec in specs if spec.kind == kind], uri)
            for kind in kinds
        ]
        markdown = markdown.replace(OTHER_TABLES, "\n\n".join(sections))
    if API_INDEX in markdown:
        markdown = markdown.replace(API_INDEX, api_index(uri))
    if BENCHMARK_PAGES in markdown:
        pages = benchmark_pages(config["docs_dir"])
        listing = "\n".join(f"- [{title}]({_link(uri, target)})" for title, target in pages)
        markdown = markdown.replace(BENCHMARK_PAGES, listing or "No benchmark page yet.")
    return markdown
