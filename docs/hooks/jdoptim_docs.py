"""mkdocs hooks that keep the documentation in step with the package.

Everything listed here is read from jdoptim at build time, so a newly registered method or a new
public name appears in the site without editing any page:

- one page per module of registered methods (an aggregator and the weighting defined beside it
  share a page): ``aggregators/<name>.md`` for aggregators and weightings, appended to the
  "Aggregators" section of the nav, ``scalarizers/<name>.md`` for loss scalarizers, appended to
  the "Loss scalarizers" section; a method of another kind goes to a sub-section of
  "Aggregators". A hand-written page at the same path takes precedence;
- the table of the registered methods of a kind with their declared properties
  (``jdoptim.get_spec``) in place of ``<!-- jdoptim:table KIND -->`` (KIND is `Spec.kind`:
  ``aggregator``, ``weighting``, ``scalarizer``), and a titled table for each kind without a
  section of its own in place of ``<!-- jdoptim:other-tables -->``;
- the index of ``jdoptim.__all__`` in place of ``<!-- jdoptim:api-index -->``, and one page per
  other public submodule, ``reference/<name>.md``, appended to the "API reference" section (the
  registered methods of a submodule are linked there, not documented twice);
- the list of benchmark pages found in ``docs/benchmarks/`` in place of
  ``<!-- jdoptim:benchmark-pages -->``, each appended to the "Benchmarks" section.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import posixpath
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jdoptim
from jdoptim.registry import Spec

TABLE = re.compile(r"<!-- jdoptim:table (\w+) -->")
OTHER_TABLES = "<!-- jdoptim:other-tables -->"
API_INDEX = "<!-- jdoptim:api-index -->"
BENCHMARK_PAGES = "<!-- jdoptim:benchmark-pages -->"

# The nav section and folder of each kind of registered method; other kinds go to a
# sub-section of "Aggregators", in the aggregators/ folder.
SECTIONS = {
    "aggregator": ("Aggregators", "aggregators"),
    "weighting": ("Aggregators", "aggregators"),
    "scalarizer": ("Loss scalarizers", "scalarizers"),
}
DEFAULT_SECTION = ("Aggregators", "aggregators")
# Kinds whose methods act on the Jacobian or its Gramian, for which "Gramian-based" applies.
GRAMIAN_KINDS = ("aggregator", "weighting")
# Public submodules documented by the API index itself rather than on a page of their own.
INDEXED_MODULES = ("aggregation", "optimizer", "registry")
# Section titles of the API index, by defining module; other modules use their own name.
MODULE_TITLES = {
    "jdoptim.optimizer": "Optimizer",
    "jdoptim.registry": "Registry and configuration",
    "jdoptim.aggregation._bases": "Base classes",
}
# The names the papers give methods whose class names cannot spell them; the site titles pages,
# nav entries and table rows with these, and the classes keep their Python names.
DISPLAY_NAMES = {
    "AlignedMTL": "Aligned-MTL",
    "CRMOGM": "CR-MOGM",
    "IMTLG": "IMTL-G",
    "IMTLL": "IMTL-L",
    "NashMTL": "Nash-MTL",
    "MoDoWeighting": "MoDo",
    "SDMGradWeighting": "SDMGrad",
}
PROPERTIES = (
    ("non_conflicting", "Non-conflicting"),
    ("linear_under_scaling", "Linear under scaling"),
    ("permutation_invariant", "Permutation invariant"),
    ("stateful", "Stateful"),
    ("randomised", "Randomised"),
)


def display_name(spec: Spec) -> str:
    """The method's name as its paper writes it; a loss scalarizer named like an aggregator
    says what it is, so that no two pages have the same title."""
    name = DISPLAY_NAMES.get(spec.cls.__name__, spec.cls.__name__)
    if spec.kind == "scalarizer" and any(
        other.kind != "scalarizer" and display_name(other) == name for other in _specs()
    ):
        return f"{name} (scalarizer)"
    return name


@dataclass(frozen=True)
class MethodPage:
    """The registered classes defined in one module, documented on one page."""

    src_uri: str
    title: str
    specs: tuple[Spec, ...]

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


@cache
def method_pages() -> tuple[MethodPage, ...]:
    """One page per module holding registered methods, aggregators first, sorted by path."""
    by_module: dict[str, list[Spec]] = {}
    for spec in _specs():
        by_module.setdefault(spec.cls.__module__, []).append(spec)
    pages: dict[str, MethodPage] = {}
    for specs in by_module.values():
        specs.sort(key=lambda spec: (spec.kind != "aggregator", spec.name))
        first = specs[0]
        folder = SECTIONS.get(first.kind, DEFAULT_SECTION)[1]
        # Registry names such as "scalarization.mean" are namespaced; the folder says it already.
        src_uri = f"{folder}/{first.name.rsplit('.', 1)[-1]}.md"
        if src_uri in pages:
            raise ValueError(f"{first.name!r} and {pages[src_uri].specs[0].name!r} need one page")
        pages[src_uri] = MethodPage(src_uri, display_name(first), tuple(specs))
    return tuple(sorted(pages.values(), key=lambda page: page.src_uri))


def page_of(spec: Spec) -> MethodPage:
    return next(page for page in method_pages() if spec in page.specs)


def identifier(obj: Any) -> str:
    """The shortest public dotted path under which jdoptim exports ``obj``, else its own."""
    public = [part for part in obj.__module__.split(".") if not part.startswith("_")]
    for end in range(1, len(public) + 1):
        path = ".".join(public[:end])
        if getattr(importlib.import_module(path), obj.__name__, None) is obj:
            return f"{path}.{obj.__name__}"
    return f"{obj.__module__}.{obj.__qualname__}"


def public_modules() -> list[str]:
    """The public submodules of jdoptim that get a page of their own."""
    names = {module.name for module in pkgutil.iter_modules(jdoptim.__path__)}
    return sorted(name for name in names - set(INDEXED_MODULES) if not name.startswith("_"))


def _link(from_uri: str, to_uri: str) -> str:
    return posixpath.relpath(to_uri, posixpath.dirname(from_uri) or ".")


def _mark(value: bool) -> str:
    return "✓" if value else "✗"


# Short labels of the publishers of papers without an arXiv version, by host.
PUBLISHERS = {
    "proceedings.neurips.cc": "NeurIPS",
    "openreview.net": "OpenReview",
    "ieeexplore.ieee.org": "IEEE",
}


def paper_link(url: str | None) -> str:
    """A short link to a paper: its arXiv number, or its publisher."""
    if not url:
        return ""
    match = re.search(r"arxiv\.org/(?:abs|pdf)/([\w.]+?)(?:v\d+)?(?:\.pdf)?$", url)
    if match:
        label = f"arXiv {match.group(1)}"
    else:
        host = re.sub(r"^https?://(www\.)?", "", url).split("/", 1)[0]
        label = PUBLISHERS.get(host, host)
    return f"[{label}]({url})"


def properties_table(
    specs: list[Spec], from_uri: str, *, link: bool = True, paper: bool = True
) -> str:
    gramian = all(spec.kind in GRAMIAN_KINDS for spec in specs)
    # The registry name goes under the method's name rather than in a column of its own, so
    # that the table fits the content column of a laptop's screen.
    header = ["Method<br>registry name", *(["Gramian-based"] if gramian else [])]
    header += [title for _, title in PROPERTIES]
    marks = len(header) - 1  # the columns of ✓ and ✗, centred
    rows = ["| " + " | ".join(header + ["Paper"] * paper) + " |"]
    rows.append("| --- |" + " :-: |" * marks + " --- |" * paper)
    for spec in specs:
        name = display_name(spec)
        if link:
            name = f"[{name}]({_link(from_uri, page_of(spec).src_uri)})"
        cells = [f"{name}<br>`{spec.name}`", *([_mark(spec.gramian_based)] if gramian else [])]
        cells += [_mark(getattr(spec, field)) for field, _ in PROPERTIES]
        if paper:
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
        # The docstrings below cite the paper.
        properties_table(list(page.specs), page.src_uri, link=False, paper=False),
        "See [the table of all methods](index.md) for what the properties mean.",
    ]
    parts += [config_example(spec) for spec in page.specs]
    parts += [f"::: {identifier(spec.cls)}" for spec in page.specs]
    return "\n\n".join(parts) + "\n"


def module_page_markdown(name: str) -> str:
    """The page of ``jdoptim.<name>``: its docstring and members, with links to the pages of
    its registered methods instead of a second copy of their documentation."""
    src_uri = f"reference/{name}.md"
    module = importlib.import_module(f"jdoptim.{name}")
    registered = {spec.cls: spec for spec in _specs()}
    members = getattr(module, "__all__", None)
    if members is None:
        members = [m for m in vars(module) if not m.startswith("_")]
    methods = [registered[getattr(module, m)] for m in members if getattr(module, m) in registered]
    others = [m for m in members if getattr(module, m) not in registered]
    options = "    options:\n      show_root_heading: false\n"
    if methods:
        listed = ", ".join(f'"{m}"' for m in others)
        options += f"      members: [{listed}]\n" if others else "      members: false\n"
    parts = [f"# `jdoptim.{name}`", f"::: jdoptim.{name}\n{options}"]
    if methods:
        parts.append("## Registered methods")
        parts.append(
            "\n".join(
                f"- [`{spec.cls.__name__}`]({_link(src_uri, page_of(spec).src_uri)}) "
                f"(`{spec.name}`)"
                for spec in sorted(methods, key=lambda spec: spec.cls.__name__.lower())
            )
        )
    return "\n\n".join(parts) + "\n"


def api_index(from_uri: str) -> str:
    registered = {spec.cls: spec for spec in _specs()}
    sections: dict[str, list[str]] = {}
    methods: list[Spec] = []
    for name in jdoptim.__all__:
        obj = getattr(jdoptim, name)
        if isinstance(obj, type) and obj in registered:
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
        "these are importable from `jdoptim`:"
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
    method_pages.cache_clear()  # `mkdocs serve` rebuilds in the same process
    nav = config["nav"]
    pages = method_pages()
    by_section: dict[str, list[dict[str, Any]]] = {}
    weightings = [{p.title: p.src_uri} for p in pages if p.kind == "weighting"]
    for page in pages:
        if page.kind in SECTIONS and page.kind != "weighting":
            by_section.setdefault(SECTIONS[page.kind][0], []).append({page.title: page.src_uri})
    if weightings:  # pages of weightings defined without an aggregator of their own
        by_section.setdefault(SECTIONS["weighting"][0], []).append({"Weightings": weightings})
    for kind in sorted({page.kind for page in pages} - set(SECTIONS)):
        of_kind = [{p.title: p.src_uri} for p in pages if p.kind == kind]
        by_section.setdefault(DEFAULT_SECTION[0], []).append({f"{kind.capitalize()}s": of_kind})
    for section, entries in by_section.items():
        _extend_section(nav, section, entries)
    modules = [{f"jdoptim.{name}": f"reference/{name}.md"} for name in public_modules()]
    _extend_section(nav, "API reference", modules)
    benchmarks = [{title: uri} for title, uri in benchmark_pages(config["docs_dir"])]
    _extend_section(nav, "Benchmarks", benchmarks)
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
        kinds = sorted({spec.kind for spec in specs} - set(SECTIONS))
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
