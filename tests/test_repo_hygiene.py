"""The repository's own text: every repository path cited in the docs and in the comments
and docstrings of the code exists, and no issue-tracker numbers of ours are cited (they
mean nothing to a reader of the code; upstream ones, pytorch/pytorch#N, may explain a
workaround)."""

import io
import re
import subprocess
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CODE_DIRS = ("fastreg", "csrc", "tests", "tools", "benchmarks", ".ci")
CODE_FILES = ("Makefile", "setup.py", "pyproject.toml", "MANIFEST.in")
TEXT_SUFFIXES = (".py", ".h", ".cuh", ".cpp", ".cu", ".md", ".toml", ".in", "")


def repo_files():
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sorted(p for p in out.splitlines() if (ROOT / p).is_file())


FILES = repo_files()


def code_files():
    return [
        p
        for p in FILES
        if (p in CODE_FILES or p.split("/")[0] in CODE_DIRS)
        and Path(p).suffix in TEXT_SUFFIXES
        and not p.startswith("benchmarks/results/")
        or p.startswith("benchmarks/results/")
        and p.endswith(".md")
    ]


def doc_files():
    return ["README.md"] + [p for p in FILES if re.fullmatch(r"docs/[^/]+\.md", p)]


def python_comments(text):
    """The comments and docstrings of a Python file."""
    parts, previous = [], tokenize.NEWLINE
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.COMMENT:
            parts.append(token.string)
        elif token.type == tokenize.STRING and previous in (
            tokenize.NEWLINE,
            tokenize.INDENT,
            tokenize.DEDENT,
            tokenize.NL,
        ):
            parts.append(token.string)
        if token.type not in (tokenize.COMMENT, tokenize.NL):
            previous = token.type
    return "\n".join(parts)


def c_comments(text):
    return "\n".join(m.group(0) for m in re.finditer(r"//[^\n]*|/\*.*?\*/", text, re.S))


def shell_comments(text):
    return "\n".join(m.group(1) for m in re.finditer(r"(?:^|\s)(#[^\n]*)", text))


def prose(path):
    """The text of `path` that cites: comments and docstrings of code, all of a doc."""
    text = (ROOT / path).read_text(encoding="utf-8")
    suffix = Path(path).suffix
    if suffix == ".py":
        return python_comments(text)
    if suffix in (".h", ".cuh", ".cpp", ".cu"):
        return c_comments(text)
    if suffix == ".md":
        return text
    return shell_comments(text)  # Makefile, .ci scripts, toml, MANIFEST.in


# A repository path: from a top-level folder; or a file name with a source suffix, which
# must name some file of the repository (csrc/ files cite each other by their name or by
# their path under csrc/).
TOP = r"(?:\.ci|csrc|fastreg|docs|tests|tools|benchmarks)"
PATH = re.compile(rf"(?<![\w./<>-]){TOP}/[\w./<>*{{}}$-]*[\w>*}}]")
# a section cited by its heading: README, "Install"; docs/penalty.md, "API"
SECTION = re.compile(r"\b(README|docs/[\w-]+\.md), \"([^\"]+)\"")
NAME = re.compile(r"(?<![\w.<>*/-])((?:[\w-]+/)*[\w-]+\.(?:py|h|cuh|cpp|cu|md))\b(?![\w/*-])")
LINK = re.compile(r"\]\(([^)#\s:]+\.(?:md|png|txt))(?:#[^)]*)?\)")
# what other projects' files are called, and what the runs write
NOT_OURS = {
    "cpp_extension.py",
    "conftest.py",
    "setup.py",
    "README.md",
    "__init__.py",
    "__main__.py",
    "sitecustomize.py",
}
WRITTEN = re.compile(
    r"benchmarks/results/[\w.-]*\.json|docs/bench-[\w-]+\.png|fastreg/_C\b.*"
    r"|fastreg/csrc(/.*)?|\S*[*<>{}$].*"
)
UPSTREAM_PATH = re.compile(r"(torch|aten|c10)/.*")  # PyTorch's sources


def exists(cited, folder):
    cited = cited.rstrip(".")
    if (ROOT / cited).exists() or (ROOT / folder / cited).exists():
        return True
    return any(f == cited or f.endswith("/" + cited) for f in FILES)


def citations(path):
    text = prose(path)
    folder = str(Path(path).parent)
    found = set(PATH.findall(text)) | set(NAME.findall(text))
    if path.endswith(".md"):
        found |= {link for link in LINK.findall(text)}
    missing = [
        c
        for c in found
        if c not in NOT_OURS
        and not WRITTEN.fullmatch(c)
        and not UPSTREAM_PATH.fullmatch(c)
        and not exists(c, folder)
    ]
    for doc, title in SECTION.findall(" ".join(text.split())):
        doc = "README.md" if doc == "README" else doc
        headings = [
            line.replace("`", "").lower()
            for line in (ROOT / doc).read_text().splitlines()
            if line.startswith("#")
        ]
        if (ROOT / doc).exists() and not any(title.replace("`", "").lower() in h for h in headings):
            missing.append(f'{doc}, "{title}"')
    return sorted(missing)


@pytest.mark.parametrize("path", code_files() + doc_files())
def test_cited_paths_exist(path):
    assert citations(path) == [], f"{path} cites paths that do not exist"


# Our own tracker's numbers: "issue 14", "issues 14 and 15", "task #3", "#14".
TRACKER = re.compile(r"\b(?:issue|task)s? ?#?\d+|(?<![\w/&])#\d{1,4}\b", re.I)
UPSTREAM = re.compile(r"pytorch/pytorch#\d+|pytorch issue \d+", re.I)
THIS_FILE = "tests/test_repo_hygiene.py"


def tracker_numbers(path):
    text = UPSTREAM.sub("", (ROOT / path).read_text(encoding="utf-8"))
    return [m.group(0) for m in TRACKER.finditer(text)]


@pytest.mark.parametrize("path", [p for p in code_files() + doc_files() if p != THIS_FILE])
def test_no_tracker_numbers(path):
    assert tracker_numbers(path) == []
