"""The docs a user follows: README's commands parse, .ci/run runs README's test command, and every
relative link and section anchor in README.md and docs/*.md leads somewhere."""
import glob
import os
import functools
import re
import shlex

import pytest

from conftest import ROOT
from config import parse_train_args
import sample

DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def commands(path, script):
    """The argument lists of every command in `path` that runs `python <script>`: indented lines and `code`."""
    out, text = [], read(path)
    for line in text.replace("\\\n", " ").splitlines():  # continued lines joined
        line = line.split(" #")[0].strip() if line.startswith("    ") else ""
        for part in line.split("&&"):
            words = shlex.split(part)
            if words[:2] == ["python", script]:
                out.append(words[2:])
    for span in re.findall(r"`python " + re.escape(script) + r"([^`]*)`", text):  # inline ones too
        if "--help" not in span:
            out.append(shlex.split(span))
    return out


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@functools.lru_cache(maxsize=None)
def anchors(path):
    """The anchors of a Markdown file's headings, read once however many links point into it."""
    return {slug(h) for h in re.findall(r"^#+ (.+)$", read(path), re.M)}


def check_parse(path, script, parse):
    found = commands(path, script)
    for argv in found:
        try:
            parse(argv)  # argparse exits on an unknown flag or a bad value
        except SystemExit:
            pytest.fail(f"{os.path.relpath(path, ROOT)}: `python {script} {shlex.join(argv)}` does not parse")
    return found


def test_readme_commands_parse():
    """A renamed or removed flag breaks the commands a newcomer copies first."""
    train = check_parse(DOCS[0], "train.py", parse_train_args)
    assert [] in train and len(train) >= 4
    assert check_parse(DOCS[0], "sample.py", sample.parse_args)


def test_usage_commands_parse():
    usage = os.path.join(ROOT, "docs", "usage.md")
    assert check_parse(usage, "train.py", parse_train_args)
    assert len(check_parse(usage, "sample.py", sample.parse_args)) >= 4


def test_ci_runs_the_readme_test_command():
    """.ci/run must call exactly the test command the README gives, after installing requirements.txt."""
    readme = read(DOCS[0])
    line = next(l.strip() for l in readme.splitlines() if l.startswith("    ") and "pytest" in l)
    install, test = [part.strip() for part in line.split("&&")]
    assert install == "pip install -r requirements.txt"
    ci = [l.strip() for l in read(os.path.join(ROOT, ".ci", "run")).splitlines() if l.strip() and not l.startswith("#")]
    assert ci[-1] == test
    assert any(l.startswith("pip install") and "-r requirements.txt" in l for l in ci)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: os.path.relpath(p, ROOT))
def test_links_resolve(path):
    """Every relative link or image goes to a file that exists, and every #anchor to a heading in it."""
    text = read(path)
    targets = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'<img src="([^"]+)"', text)
    broken = []
    for target in targets:
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(dest):
            broken.append(target)
        elif anchor and dest.endswith(".md"):
            if anchor not in anchors(dest):
                broken.append(target)
    assert not broken, f"{os.path.relpath(path, ROOT)}: links that lead nowhere: {broken}"
