"""mkdocs hook: the docs link to repository files outside docs/ (benchmarks/results/, recipes/, integrations/) with
ordinary relative links, which also work when the Markdown is read on a code host. This hook adds every such file
that exists to the site under its repository path (Markdown files become pages, whose own links are followed in
turn) and rewrites the links to it, so `mkdocs build --strict` checks them like any other link: a link to a file that
does not exist stays as written and fails the build."""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

LINK = re.compile(r"(\]\()(?P<url>[^)\s#]+)(?P<rest>[^)]*\))")


def _root(config) -> Path:
    return Path(config["docs_dir"]).resolve().parent


def _repo_target(src_uri: str, url: str, prefix: str) -> str | None:
    """The repository path a relative link from `prefix/src_uri` points to, if it leaves docs/ (else None)."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", url) or url.startswith("/"):
        return None  # absolute URL or site-absolute path
    target = posixpath.normpath(posixpath.join(prefix, posixpath.dirname(src_uri), url))
    if target.startswith("docs/") or target.startswith("../"):
        return None
    return target


def on_files(files: Files, config) -> Files:
    root = _root(config)
    todo = [(f.src_uri, "docs") for f in files.documentation_pages()]
    added: set[str] = set()
    while todo:
        src_uri, prefix = todo.pop()
        text = (root / prefix / src_uri).read_text() if prefix else (root / src_uri).read_text()
        for match in LINK.finditer(text):
            target = _repo_target(src_uri, match["url"], prefix)
            if target is None or target in added or not (root / target).is_file():
                continue
            added.add(target)
            files.append(File(target, str(root), config["site_dir"], config["use_directory_urls"]))
            if target.endswith(".md"):
                todo.append((target, ""))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    src_uri = page.file.src_uri
    if not page.file.abs_src_path.startswith(str(Path(config["docs_dir"]).resolve())):
        return markdown  # a repository file: its links already are repository paths

    def rewrite(match: re.Match) -> str:
        target = _repo_target(src_uri, match["url"], "docs")
        if target is None or files.get_file_from_path(target) is None:
            return match.group(0)
        return match[1] + posixpath.relpath(target, posixpath.dirname(src_uri) or ".") + match["rest"]

    return LINK.sub(rewrite, markdown)
