"""mkdocs hooks (mkdocs.yml `hooks:`): links from a docs page to a file of the repository
outside docs/ (``[its README](../benchmarks/results/README.md)``), which mkdocs cannot
resolve and reports as not found.

Such a link whose target exists in the repository is rewritten: to the file on the
repository's web page when mkdocs.yml sets ``repo_url`` (``<repo_url>/blob/<branch>/...``,
the branch from ``extra.repo_branch``, default main), else to its text followed by the path
as code. A target that does not exist is a warning, so that `mkdocs build --strict`
fails on it as on any broken link. Links inside code spans and fenced blocks are left
alone; links within docs/ are mkdocs' own to check.

And the Sphinx roles of the docstrings (``:func:`fastreg.dropout```), which mkdocstrings
prints as they are: the role is dropped and a name that the API reference documents
becomes a link to it (an optional cross-reference: an unknown name stays plain code).
"""

import logging
import os
import re

log = logging.getLogger("mkdocs.hooks.repo_links")

LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"(`+).*?\1")
FENCE = re.compile(r"^\s*(```+|~~~+)")


def _rewrite(text, page, config):
    docs = os.path.realpath(config["docs_dir"])
    root = os.path.dirname(os.path.realpath(config["config_file_path"]))
    page_dir = os.path.dirname(os.path.join(docs, page.file.src_path))

    def link(match):
        bang, label, target = match.groups()
        path, _, anchor = target.partition("#")
        if not path or re.match(r"^[a-z][a-z0-9+.-]*:", path) or path.startswith("/"):
            return match.group(0)  # an anchor, a URL or an absolute link: mkdocs' to check
        full = os.path.realpath(os.path.join(page_dir, path))
        if full == docs or full.startswith(docs + os.sep):
            return match.group(0)  # within docs/: mkdocs checks it
        rel = os.path.relpath(full, root)
        if rel.startswith(".."):
            log.warning(
                "%s: the link '%s' points outside the repository", page.file.src_path, target
            )
            return match.group(0)
        if not os.path.exists(full):
            log.warning(
                "%s: the link '%s' points to '%s', which is not in the repository",
                page.file.src_path,
                target,
                rel,
            )
            return match.group(0)
        repo_url = config.get("repo_url")
        if repo_url:
            branch = (config.get("extra") or {}).get("repo_branch", "main")
            kind = "tree" if os.path.isdir(full) else "blob"
            url = f"{repo_url.rstrip('/')}/{kind}/{branch}/{rel}" + (f"#{anchor}" if anchor else "")
            return f"{bang}[{label}]({url})"
        if label.strip("`") in (rel, os.path.basename(rel)):
            return f"`{rel}`"
        return f"{label} (`{rel}`)"

    out, fence = [], None
    for line in text.split("\n"):
        ticks = FENCE.match(line)
        if ticks and (fence is None or ticks.group(1).startswith(fence)):
            fence = ticks.group(1) if fence is None else None
            out.append(line)
            continue
        if fence is not None:
            out.append(line)
            continue
        pieces, last = [], 0
        for span in CODE_SPAN.finditer(line):
            pieces.append(LINK.sub(link, line[last : span.start()]))
            pieces.append(span.group(0))
            last = span.end()
        pieces.append(LINK.sub(link, line[last:]))
        out.append("".join(pieces))
    return "\n".join(out)


ROLE = re.compile(r":(?:func|class|meth|mod|attr|exc|data):<code>([^<]+)</code>")
DIRECTIVE = re.compile(r"^:::\s+([\w.]+)", re.M)
API_PAGE = "api.md"


def _api_names(config):
    """{name as written in a docstring: identifier of its entry in the API reference}:
    `fastreg.channel.dropout1d` is also `fastreg.dropout1d` and `dropout1d`."""
    try:
        with open(os.path.join(config["docs_dir"], API_PAGE)) as f:
            paths = DIRECTIVE.findall(f.read())
    except OSError:
        return {}
    names = {}
    for path in paths:
        short = path.rsplit(".", 1)[-1]
        for alias in (short, f"fastreg.{short}", path):
            names.setdefault(alias, path)
    return names


def on_page_content(html, page, config, files, **kwargs):
    names = _api_names(config)

    def role(match):
        name = match.group(1)
        target = names.get(name.strip().lstrip("~"))
        code = f"<code>{name}</code>"
        return f'<autoref identifier="{target}" optional>{code}</autoref>' if target else code

    return ROLE.sub(role, html)


def on_page_markdown(markdown, page, config, files, **kwargs):
    return _rewrite(markdown, page, config)
