"""Rules about the repository as a whole (issues 17 and 23), each a test that fails when broken.

- every "SPEC section N" (and "SPEC N.M", "docs/spec.md section N", a bare "section N" in code)
  names a numbered section of docs/spec.md; a document's own "section N" one of its own;
- no file of the repository names a path outside the clone;
- no import cycle between our modules, and the floors hold:
  metastate_core <- weights <- backends <- metastate;
- the decay constant and the LayerNorm and L2 epsilons are written once, in
  metastate_core/constants.py;
- `pip install -e .` alone (no torch, no mlx) runs `metastate prepare-data` and `metastate chat`.

"Files of the repository" are those git knows or would add: `git ls-files --cached --others
--exclude-standard`, as they are in the working tree.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import textwrap
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPEC = "docs/spec.md"
THIS = Path(__file__).resolve().relative_to(ROOT).as_posix()
PACKAGES = ("metastate_core", "weights", "backends", "metastate")
# What each floor may import of ours (besides itself): metastate_core <- weights <- backends <- metastate.
FLOORS = {"metastate_core": set(), "weights": {"metastate_core"},
          "backends": {"metastate_core", "weights"}, "metastate": {"metastate_core", "weights", "backends"}}


# -- the files -------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def repo_files() -> tuple[str, ...]:
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the repository rules need `git ls-files`")
    return tuple(sorted(p for p in out.decode().split("\0") if p and (ROOT / p).is_file()))


@lru_cache(maxsize=None)
def text_of(path: str) -> str | None:
    """A repository file's text, or None for a binary file (NUL bytes, or not UTF-8)."""
    data = (ROOT / path).read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def text_files() -> list[tuple[str, str]]:
    return [(p, t) for p in repo_files() if (t := text_of(p)) is not None]


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


# -- a. section citations --------------------------------------------------------------------

NUM = r"\d+(?:\.\d+)*(?![\w.]*\d)(?!\w)"          # 5, 5.1; not 1e-4, 2e-6 or 3x
NUMS = rf"{NUM}(?:\s*(?:and|or|-|–)\s*{NUM})*"    # "1 and 2", "5-7"
DOC = r"(?:\b[\w./-]*\.md\b|\bSPEC\b)"
MARKUP = r"(?:[`*_\]]|\]\([^)\s]*\))*"     # closing backticks, emphasis, a Markdown link's (target)
CITATIONS = [
    # "SPEC section 4", "SPEC's section 6", "SPEC sections 1 and 2", "SPEC 5.1"
    re.compile(rf"\b(?P<doc>SPEC)(?:'s)?{MARKUP}\s+(?:sections?\s+)?(?P<nums>{NUMS})"),
    # "docs/spec.md section 4", "[results.md](results.md) section 2", "`spec.md` §3"
    re.compile(rf"(?P<doc>\b[\w./-]*\.md){MARKUP}\s+(?:sections?\s+|§\s*)(?P<nums>{NUMS})", re.I),
    # "section 4 of SPEC", "sections 5 and 6 of [docs/spec.md](docs/spec.md)"
    re.compile(rf"\b(?:sections?\s+|§\s*)(?P<nums>{NUMS})\s+of\s+(?:the\s+)?[\[`*_]*(?P<doc>{DOC})", re.I),
    # a bare "section 3" or "§3": the spec from code, the document itself from a document
    re.compile(rf"(?:\bsections?\s+|§\s*)(?P<nums>{NUMS})", re.I),
]
HEADING = re.compile(r"#{1,6}\s+(\d+(?:\.\d+)*)\.?\s")
MD_LINK = re.compile(r"\]\((?P<target>[^)\s#]*)#(?P<anchor>[^)\s]+)\)")


def numbers(spec: str) -> list[str]:
    """'1 and 2' -> ['1', '2']; '5-7' -> ['5', '6', '7']."""
    out = []
    parts = re.split(r"\s*(and|or|-|–)\s*", spec)
    nums, ops = parts[::2], parts[1::2]
    out.append(nums[0])
    for op, n in zip(ops, nums[1:]):
        if op in "-–" and n.isdigit() and out[-1].isdigit():
            out.extend(str(i) for i in range(int(out[-1]) + 1, int(n) + 1))
        else:
            out.append(n)
    return out


def headings(path: str) -> list[str]:
    """The heading lines of a Markdown file (not the `#` lines of its fenced code blocks)."""
    out, fenced = [], False
    for line in (text_of(path) or "").splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6}\s", line):
            out.append(line)
    return out


def numbered_sections(path: str) -> set[str]:
    return {m.group(1) for line in headings(path) if (m := HEADING.match(line))}


def slugs(path: str) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file."""
    out = set()
    for line in headings(path):
        title = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line).group(1)
        out.add(re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-"))
    return out


def resolve_doc(doc: str, citing: str) -> str | None:
    """The repository path a citation's document names (SPEC is docs/spec.md), or None."""
    files = set(repo_files())
    if doc == "SPEC" or Path(doc).name.lower() == "spec.md":
        return SPEC if SPEC in files else None
    for candidate in ((Path(citing).parent / doc).as_posix(), doc.lstrip("./"), f"docs/{Path(doc).name}"):
        candidate = str(Path(candidate))
        if candidate in files:
            return candidate
    return None


def find_citations(text: str):
    """(offset, text, document named or None for a bare citation, section numbers)."""
    taken: list[tuple[int, int]] = []
    for pattern in CITATIONS:
        for m in pattern.finditer(text):
            if any(a < m.end() and m.start() < b for a, b in taken):
                continue
            taken.append(m.span())
            yield m.start(), m.group(0), m.groupdict().get("doc"), numbers(m.group("nums"))


def citations():
    """(citing file, line, text, document cited or None, its section numbers)."""
    for path, text in text_files():
        for offset, cited, doc, nums in find_citations(text):
            if doc is not None:
                target = resolve_doc(doc, path)
            else:  # bare: a document's own section, or the spec's from code
                target = path if path.endswith(".md") else resolve_doc("SPEC", path)
            yield path, line_of(text, offset), cited, target, nums


def test_spec_exists_with_the_sections_the_code_cites():
    assert SPEC in repo_files(), f"{SPEC} is missing"
    # The section numbers of the product owner's text, which the code's citations follow.
    assert {"1", "2", "3", "4", "5", "5.1", "5.2", "5.3", "5.4", "6", "7"} <= numbered_sections(SPEC)


def test_every_cited_section_exists():
    broken, count = [], 0
    for path, line, cited, target, nums in citations():
        count += 1
        if target is None:
            broken.append(f"{path}:{line}: {cited!r} cites a document that is not in the repository")
            continue
        sections = numbered_sections(target)
        if not sections:
            broken.append(f"{path}:{line}: {cited!r} cites {target}, which has no numbered sections "
                          "(say which document is meant)")
            continue
        missing = [n for n in nums if n not in sections]
        if missing:
            broken.append(f"{path}:{line}: {cited!r}: {target} has no section {', '.join(missing)}")
    assert count > 20, f"only {count} section citations found: is the pattern still right?"
    assert not broken, "\n".join(broken)


def test_every_markdown_anchor_exists():
    broken = []
    for path, text in text_files():
        for m in MD_LINK.finditer(text):
            target = m.group("target")
            if "://" in target:
                continue
            doc = path if not target else str(Path(Path(path).parent, target))
            doc = str(Path(doc))  # normalise "docs/../README.md"
            if Path(doc).suffix != ".md":
                continue
            if doc not in repo_files():
                broken.append(f"{path}:{line_of(text, m.start())}: link to {target}, not in the repository")
            elif m.group("anchor").lower() not in slugs(doc):
                broken.append(f"{path}:{line_of(text, m.start())}: {doc} has no heading #{m.group('anchor')}")
    assert not broken, "\n".join(broken)


def test_citation_patterns():
    # The patterns themselves: what counts as a citation and which document it names.
    def found(text):
        return [(doc, nums) for _, _, doc, nums in find_citations(text)]

    assert found("(SPEC section 6's 1e-4)") == [("SPEC", ["6"])]
    assert found("SPEC sections 1 and 2") == [("SPEC", ["1", "2"])]
    assert found("SPEC 5.1: n -> n'") == [("SPEC", ["5.1"])]
    assert found("float32-accurate dots (SPEC 1e-4)") == []
    assert found("docs/results.md section 2") == [("docs/results.md", ["2"])]
    assert found("sections 2-4 of docs/spec.md") == [("docs/spec.md", ["2", "3", "4"])]
    assert found("over a prompt (section 3)") == [(None, ["3"])]
    assert found("see [docs/spec.md](docs/spec.md) section 4") == [("docs/spec.md", ["4"])]
    assert found("`SPEC` section 5.2") == [("SPEC", ["5.2"])]


# -- b. no path outside the clone ------------------------------------------------------------

# The product owner's copy of the spec, beside the clone: a clone does not have it.
OWNER_SPEC = re.compile(r"(?:\.\./)+shared\b|\bshared/SPEC\b|\bSPEC\.md\b")
# Machine-specific absolute paths (a scratch /tmp path is not a reference and stays allowed).
ABSOLUTE = re.compile(r"(?<![\w.~%$-])/(?:work|home|Users|root|mnt|opt)/|\b[A-Z]:\\\\?Users\b")
RELATIVE = re.compile(r"(?<![\w./-])((?:\.\./)+)([\w.-]*)")


def test_no_file_names_a_path_outside_the_clone():
    bad = []
    for path, text in text_files():
        if path == THIS:  # this file spells the patterns out
            continue
        for pattern, why in ((OWNER_SPEC, "the product owner's spec, outside the clone (use docs/spec.md)"),
                             (ABSOLUTE, "an absolute path on one machine")):
            for m in pattern.finditer(text):
                bad.append(f"{path}:{line_of(text, m.start())}: {m.group(0)!r}: {why}")
        if path.startswith("tests/"):  # tests feed escaping paths to loaders on purpose
            continue
        for m in RELATIVE.finditer(text):
            target = (ROOT / Path(path).parent / m.group(1) / m.group(2)).resolve()
            if not target.is_relative_to(ROOT):
                bad.append(f"{path}:{line_of(text, m.start())}: {m.group(0)!r} leads outside the repository")
    assert not bad, "\n".join(bad)


# -- c. imports: no cycle, and the floors ----------------------------------------------------

@lru_cache(maxsize=None)
def our_modules() -> dict[str, str]:
    """module name -> file, for every module of our packages."""
    out = {}
    for path in repo_files():
        parts = Path(path).parts
        if parts[0] in PACKAGES and path.endswith(".py"):
            name = ".".join(parts)[: -len(".py")]
            out[name.removesuffix(".__init__")] = path
    return out


def _imported(node: ast.AST, module: str, is_package: bool):
    """(module, name or None) pairs that an import statement or an importlib.import_module("...")
    call in `module` names, relative imports resolved: `from a import b` gives (a, b)."""
    if isinstance(node, ast.Import):
        return [(a.name, None) for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            package = module if is_package else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{node.module}" if node.module else package
        else:
            base = node.module or ""
        return [(base, a.name) for a in node.names]
    if (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        name = node.args[0].value
        if name.startswith("."):
            level = len(name) - len(name.lstrip("."))
            package = module if is_package else module.rpartition(".")[0]
            for _ in range(level - 1):
                package = package.rpartition(".")[0]
            name = f"{package}.{name.lstrip('.')}"
        return [(name, None)]
    return []


@lru_cache(maxsize=None)
def import_graph() -> tuple[dict[str, dict[str, int]], list[str]]:
    """module -> {our module it imports: line}, top-level and function-level imports alike,
    and the imports of ours that name no module we have."""
    mods = our_modules()
    graph: dict[str, dict[str, int]] = {m: {} for m in mods}
    unresolved = []
    for module, path in mods.items():
        tree = ast.parse(text_of(path), path)
        is_package = path.endswith("__init__.py")
        for node in ast.walk(tree):
            for base, name in _imported(node, module, is_package):
                if base.split(".")[0] not in PACKAGES:
                    continue
                if name is not None and f"{base}.{name}" in mods:
                    target = f"{base}.{name}"       # from package import submodule
                elif base in mods:
                    target = base                   # import module / from module import name
                else:
                    problem = f"{path}:{node.lineno}: imports {base}, which is not one of our modules"
                    if problem not in unresolved:
                        unresolved.append(problem)
                    continue
                if target != module:
                    graph[module].setdefault(target, node.lineno)
    return graph, unresolved


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_imports_of_our_modules_resolve():
    graph, unresolved = import_graph()
    assert len(graph) > 20, f"only {len(graph)} modules found"
    assert not unresolved, "\n".join(unresolved)


def test_no_import_cycle():
    graph, _ = import_graph()
    mods = our_modules()
    described = []
    for component in find_cycles(graph):
        edges = [f"    {mods[a]}:{graph[a][b]} imports {b}" for a in component for b in graph[a] if b in component]
        described.append(f"cycle between {', '.join(component)}:\n" + "\n".join(edges))
    assert not described, "\n".join(described)


def test_floors():
    graph, _ = import_graph()
    mods = our_modules()
    bad = []
    for module, targets in graph.items():
        floor = module.split(".")[0]
        for target, line in targets.items():
            other = target.split(".")[0]
            if other != floor and other not in FLOORS[floor]:
                bad.append(f"{mods[module]}:{line}: {floor} imports {target}")
    assert not bad, "\n".join(bad)


def test_import_walker_sees_function_level_and_relative_imports():
    source = textwrap.dedent("""
        import metastate_core.config
        from . import sibling
        from ..weights import format as fmt
        def f():
            from .other import thing
            importlib.import_module(".lazy", __name__)
    """)
    found = [pair for node in ast.walk(ast.parse(source)) for pair in _imported(node, "backends.cuda.model", False)]
    assert ("metastate_core.config", None) in found
    assert ("backends.cuda", "sibling") in found
    assert ("backends.weights", "format") in found
    assert ("backends.cuda.other", "thing") in found
    assert ("backends.cuda.lazy", None) in found
    assert find_cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]


# -- d. the shared constants are written once ------------------------------------------------

SOURCE_DIRS = ("metastate_core", "weights", "backends", "metastate", "bench", "scripts")
CONSTANTS = "metastate_core/constants.py"
DECAY = 0.6065306597126334  # |DECAY_SCALE|
# A float literal inside kernel source text (Metal, C): 1e-5, 1.0e-12f, 0.60653066f
C_FLOAT = re.compile(r"(?<![\w.])(\d+\.\d*(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+|\.\d+(?:[eE][-+]?\d+)?)[fFhH]?(?![\w.])")
# A string that is kernel source, not prose: C statements or Metal keywords.
KERNEL_SOURCE = re.compile(r";\s*\n.*;\s*(\n|$)|metal_stdlib|\bconstexpr\b|\bkernel void\b|thread_position_in_grid",
                           re.S)
# Literals that are not one of the shared constants, with the reason (path, enclosing function).
ALLOWED = {
    # The SSE epsilon N * 1e-5 is its own quantity, a config property, and so is the GroupNorm
    # epsilon of a config written before ln_x_eps existed.
    ("metastate_core/config.py", "eps_sse"),
    ("metastate_core/config.py", "legacy_ln_x_eps"),
}


def constant_named(value: float) -> str | None:
    if abs(abs(value) - DECAY) < 1e-4:  # also a rounded copy such as 0.606531
        return "the decay constant (DECAY_SCALE)"
    if value == 1e-5:
        return "the LayerNorm epsilon (LN_EPS)"
    if value == 1e-12:
        return "the L2 epsilon (L2_EPS)"
    return None


def constant_copies(path: str, text: str) -> list[str]:
    """Where `text` (Python) writes one of the shared constants as a literal: a number in code
    (f-string expressions included), exp(-0.5) (the decay constant computed), or a float literal
    in kernel source text (a string of C/Metal statements). Comments and docstrings are prose
    and do not count."""
    tree = ast.parse(text, path)
    prose = {id(n.value) for n in ast.walk(tree)
             if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)}
    functions = [(n.lineno, n.end_lineno, n.name) for n in ast.walk(tree)
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]

    def allowed(line):
        return any((path, name) in ALLOWED for a, b, name in functions if a <= line <= b)

    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "exp":
            arg = node.args[0] if node.args else None
            if (isinstance(arg, ast.UnaryOp) and isinstance(arg.op, ast.USub) and isinstance(arg.operand, ast.Constant)
                    and arg.operand.value == 0.5 and not allowed(node.lineno)):
                out.append(f"{path}:{node.lineno}: exp(-0.5) is the decay constant (DECAY_SCALE), computed")
        if not isinstance(node, ast.Constant) or allowed(node.lineno):
            continue
        value = node.value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            what = constant_named(float(value))
            if what:
                literal = ast.get_source_segment(text, node) or repr(value)
                out.append(f"{path}:{node.lineno}: {literal} is {what}")
        elif isinstance(value, str) and id(node) not in prose and KERNEL_SOURCE.search(value):
            for m in C_FLOAT.finditer(value):
                what = constant_named(float(m.group(1)))
                if what:
                    line = node.lineno + value.count("\n", 0, m.start())
                    out.append(f"{path}:{line}: {m.group(0)} in kernel source is {what}")
    return sorted(out, key=lambda c: int(c.split(":")[1]))


def test_shared_constants_are_written_once():
    files = [p for p in repo_files() if p.endswith(".py") and p.split("/")[0] in SOURCE_DIRS]
    assert CONSTANTS in files
    copies = [c for p in files if p != CONSTANTS for c in constant_copies(p, text_of(p))]
    assert not copies, "\n".join(copies)
    # ... and constants.py does define them, once each.
    defined = constant_copies("constants.py", text_of(CONSTANTS))
    assert len(defined) == 3 and sorted(c.split(" is ")[1] for c in defined) == [
        "the L2 epsilon (L2_EPS)", "the LayerNorm epsilon (LN_EPS)", "the decay constant (DECAY_SCALE)"], defined


def test_constant_scanner():
    source = textwrap.dedent('''
        """Docstring: w = exp(-0.6065306597126334 * sigmoid(x)), eps 1e-5."""
        A = -0.606531  # comment: 1e-12
        B = x / max(n, 1e-12)
        C = np.exp(-0.5)
        SRC = """
            constexpr float D = -0.6065306597126334f;
            float e = 1e-5f;
        """
        MSG = f"eps {1e-5}; not a kernel"
        def eps_sse(self):
            return self.head_size * 1e-5
    ''')
    found = [c.split(": ", 1)[1] for c in constant_copies("metastate_core/config.py", source)]
    assert found == ["0.606531 is the decay constant (DECAY_SCALE)", "1e-12 is the L2 epsilon (L2_EPS)",
                     "exp(-0.5) is the decay constant (DECAY_SCALE), computed",
                     "0.6065306597126334f in kernel source is the decay constant (DECAY_SCALE)",
                     "1e-5f in kernel source is the LayerNorm epsilon (LN_EPS)",
                     "1e-5 is the LayerNorm epsilon (LN_EPS)"], found


# -- e. `pip install -e .` alone: prepare-data and chat without torch or mlx -----------------

def _requirement_names(requirements) -> list[str]:
    """Distribution names of the requirements that apply here (extras left out)."""
    try:
        from packaging.markers import Marker
    except ImportError:
        try:
            from pip._vendor.packaging.markers import Marker
        except ImportError:
            Marker = None
    out = []
    for req in requirements or ():
        name, _, marker = req.partition(";")
        if "extra" in marker:
            continue
        if marker.strip() and Marker is not None and not Marker(marker.strip()).evaluate():
            continue
        out.append(re.match(r"[A-Za-z0-9_.-]+", name.strip()).group(0))
    return out


def base_install(site: Path) -> list[str]:
    """Link into `site` what `pip install -e .` installs besides our code: the distributions of
    pyproject's [project] dependencies and theirs, nothing else. Returns their names."""
    import importlib.metadata as md

    try:
        import tomllib
    except ImportError:  # Python 3.10: tomli is one of our dependencies there
        import tomli as tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo, seen = _requirement_names(project.get("dependencies")), []
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.append(key)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            pytest.fail(f"dependency {name} is not installed here")
        todo.extend(_requirement_names(dist.requires))
        tops = {f.parts[0] for f in dist.files or () if f.parts[0] not in ("..", "bin", "__pycache__")}
        for top in tops:
            link = site / top
            if not link.exists():
                link.symlink_to(Path(dist.locate_file(top)).resolve())
    return seen


def run_installed(site: Path, argv: list[str], stdin: str = "", cwd: Path | None = None):
    """`metastate ARGV` in a fresh interpreter that sees the standard library, `site` and this
    repository only (-S: no site-packages; -I: no PYTHONPATH, no user site)."""
    code = textwrap.dedent(f"""
        import sys
        sys.path += [{str(site)!r}, {str(ROOT)!r}]
        from metastate.cli import main
        sys.exit(main({argv!r}))
    """)
    return subprocess.run([sys.executable, "-S", "-I", "-B", "-c", code], input=stdin, capture_output=True,
                          text=True, timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def base_site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site-packages")
    names = base_install(site)
    probe = subprocess.run([sys.executable, "-S", "-I", "-c", textwrap.dedent(f"""
        import importlib.util, sys
        sys.path += [{str(site)!r}, {str(ROOT)!r}]
        print([m for m in ("torch", "triton", "mlx", "matplotlib", "safetensors") if importlib.util.find_spec(m)])
    """)], capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0 and probe.stdout.strip() == "[]", (names, probe.stdout, probe.stderr)
    return site


def test_prepare_data_without_torch(base_site, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
                      "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles.\n" * 40)
    out = tmp_path / "data"
    run = run_installed(base_site, ["prepare-data", str(corpus), "--vocab-size", "320", "--out", str(out)],
                        cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == 320
    assert (out / "tokenizer.model").is_file()


def test_chat_without_torch(base_site, tmp_path):
    run = run_installed(base_site, ["chat", "--max-tokens", "8", "--seed", "0"], stdin="Good morrow\n/quit\n",
                        cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    turns = run.stdout.split("> ")
    assert len(turns) >= 3 and turns[1].strip(), run.stdout + run.stderr  # an answer between two prompts
