"""README.md and docs/ stay true to the repo: every `sam3ft` option, `-S` params key, `make` target,
repo path and relative link they mention exists, the README stays short, and benchmark bookkeeping
stays in bench/. The README's offline commands also run as written on the pipeline's clone
(tests/test_pipeline.py, as litgpt's test_readme.py runs its README)."""

from __future__ import annotations

import dataclasses
import itertools
import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO, recipe_trainer
from sam3ft.__main__ import main

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINKED = [*DOCS, REPO / "bench" / "README.md", REPO / "bench" / "LOG.md"]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"(?<!`)`([^`\n]+(?:\n[^`\n]+)*)`(?!`)")
REPO_PATH = re.compile(r"(?<![\w./-])((?:src|configs|bench|docs|tests)/[\w./*{},-]*[\w*}])")
# a benchmark's bookkeeping (the word call and a number, an ordinal and the word session), not the
# word session in code (pytest's scope="session", AWS_SESSION_TOKEN)
CALL = re.compile(r"calls? [0-9]+")  # the same pattern as `git grep -nE "calls? [0-9]+"`
ORDINALS = "first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|\\w+teenth"
SESSION = re.compile(
    rf"\b(?:{ORDINALS}|\d+(?:st|nd|rd|th)|this|previous|last|next) session\b|\bsessions? \d", re.I
)


def text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def code_spans(path: Path) -> list[str]:
    """Fenced blocks (any language) and inline code spans outside them."""
    body = text(path)
    fences = [m.group(2) for m in FENCE.finditer(body)]
    return fences + INLINE.findall(FENCE.sub("", body))


def help_text(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_sam3ft_commands_name_existing_subcommands_and_options(capsys):
    subcommands = set(re.search(r"\{([\w,]+)\}", help_text(capsys)).group(1).split(","))
    options = {sub: set(re.findall(r"(--[\w-]+)", help_text(capsys, sub))) for sub in subcommands}
    used = 0
    for path in DOCS:
        for span in code_spans(path):
            for sub, rest in re.findall(r"\bsam3ft ([a-z]+)([^\n|#]*)", span):
                where = f"{path.name}: `sam3ft {sub}{rest}`"
                assert sub in subcommands, f"{where}: no subcommand {sub!r} (have {sorted(subcommands)})"
                for flag in re.findall(r"(?<![\w-])(--[\w-]+)", rest):
                    assert flag in options[sub], f"{where}: `sam3ft {sub}` has no option {flag}"
                used += 1
    assert used >= 5  # the docs do show the CLI


def test_set_params_name_keys_of_params_yaml():
    params = yaml.safe_load(text(REPO / "params.yaml"))
    used = 0
    for path in DOCS:
        for span in code_spans(path):
            for section, key in re.findall(r"-S\s+'?([a-z_]+)\.([a-z_]+)=", span):
                assert key in params.get(section, {}), f"{path.name}: -S {section}.{key}: not in params.yaml"
                used += 1
    assert used >= 5


def test_make_targets_exist():
    makefile = text(REPO / "Makefile")
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    used = 0
    for path in DOCS:
        for span in code_spans(path):
            for target in re.findall(r"\bmake ([a-z][\w-]*)", span):
                assert target in targets, f"{path.name}: `make {target}`: no such target in the Makefile"
                used += 1
    assert used >= 2


def expand(pattern: str) -> list[str]:
    """`a/{b,c}.py` -> [a/b.py, a/c.py]."""
    parts = re.split(r"\{([^}]*)\}", pattern)
    choices = [p.split(",") if i % 2 else [p] for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def test_repo_paths_in_code_exist():
    used = 0
    for path in DOCS:
        for span in code_spans(path):
            for mention in REPO_PATH.findall(span):
                if "<" in mention:
                    continue
                for one in expand(mention):
                    found = (
                        list(REPO.glob(one)) if "*" in one else [REPO / one] if (REPO / one).exists() else []
                    )
                    assert found, f"{path.name}: `{mention}` does not exist in the repo"
                used += 1
    assert used >= 20


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_and_anchors_resolve():
    for path in LINKED:
        for target in re.findall(r"\]\(([^)\s]+)\)", FENCE.sub("", text(path))):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            assert dest.exists(), f"{path.relative_to(REPO)}: link {target} does not resolve"
            if anchor:
                headings = re.findall(r"^#+ (.+)$", FENCE.sub("", text(dest)), re.M)
                assert anchor in {slug(h) for h in headings}, (
                    f"{path.relative_to(REPO)}: no #{anchor} in {file}"
                )


def test_layout_lists_every_package_entry():
    readme = text(REPO / "README.md")
    layout = readme.split("## Layout", 1)[1].split("```")[1]
    listed = {one for line in layout.splitlines() for one in expand(line.split(" ")[0])}
    package = REPO / "src" / "sam3ft"
    for entry in package.iterdir():
        if entry.name in ("__init__.py", "__pycache__"):
            continue
        name = f"src/sam3ft/{entry.name}" + ("/" if entry.is_dir() else "")
        assert name in listed, f"README Layout does not list {name}"


def test_readme_is_short():
    lines = len(text(REPO / "README.md").splitlines())
    assert lines <= 250, f"README.md has {lines} lines; move detail to docs/"


def test_no_benchmark_bookkeeping_outside_bench():
    files = [*DOCS, REPO / "params.yaml", REPO / "dvc.yaml", REPO / "Makefile"]
    for folder in ("src", "configs", "tests"):
        files += [
            p for p in (REPO / folder).rglob("*") if p.is_file() and p.suffix in (".py", ".yaml", ".md")
        ]
    assert len(files) > 30
    for path in files:
        for n, line in enumerate(text(path).splitlines(), 1):
            where = f"{path.relative_to(REPO)}:{n}"
            assert not CALL.search(line), f"{where}: cites a benchmark call; say it in bench/LOG.md instead"
            assert not SESSION.search(line), f"{where}: cites a work session; say it in bench/LOG.md instead"


def largest_batches(trainer, cards: list[int]) -> list[int]:
    """For each card (GB), the largest batch whose estimated peak (train/memory.py, the sam3 preset
    on one GPU) stays within 93% of it; 0: not even batch 1."""
    from sam3ft.model.spec import load_preset
    from sam3ft.stages.fetch import bundled_vocab
    from sam3ft.train.memory import param_sizes, training_peak_gb

    spec = load_preset("sam3")
    sizes = param_sizes(spec, bundled_vocab(), trainer.trainable, trainer.lora_rank)
    peaks = [
        training_peak_gb(spec, *sizes[:2], dataclasses.replace(trainer, batch_size=b), sizes[2])[0]
        for b in range(1, 100)
    ]
    return [sum(peak <= 0.93 * card for peak in peaks) for card in cards]  # peaks grow with batch


@pytest.mark.parametrize("doc", ["README.md", "docs/training.md"])
def test_the_recipe_tables_batches_are_the_memory_estimates(doc):
    """The recipe tables' "largest batch by the estimate" columns (README: 12/16/24 GB, docs: more
    cards): for each recipe and card, the largest batch whose estimated peak (train/memory.py, the
    sam3 preset on one GPU) stays within 93% of the card ("—": not even batch 1)."""
    from sam3ft import params

    body = text(REPO / doc)
    header = re.search(r"^\| recipe \|.*largest batch by the estimate: ([\d /]+) GB card \|$", body, re.M)
    assert header, f"{doc}: the recipe table's header moved"
    cards = [int(c) for c in header.group(1).split("/")]
    table = body[header.end() :].split("\n\n", 1)[0]  # the table ends at the first blank line
    rows = dict(re.findall(r"^\| `([\w-]+)`[^|]*\|.*\| ([—\d /]+) \|$", table, re.M))
    assert set(rows) == set(params.recipes()), f"{doc}: every recipe has a row, and only recipes do"
    for recipe, cells in rows.items():
        expected = largest_batches(recipe_trainer(recipe, "sam3"), cards)
        shown = [0 if c.strip() == "—" else int(c) for c in cells.split("/")]
        assert shown == expected, f"{doc}, `{recipe}`: {shown} but the estimate gives {expected}"


def test_the_unchecked_trunks_batches_are_the_memory_estimates():
    """docs/training.md's batches for `lean` with `act_ckpt_trunk: false` (and checked) on 40 and 80
    GB cards are what the estimate gives, by the recipe table's 93% rule."""
    found = re.search(
        r"`lean` then fits batch (\d+) on a 40 GB card and\s+(\d+) on an 80 GB one"
        r" \(checked: (\d+) and (\d+)\)",
        text(REPO / "docs/training.md"),
    )
    assert found, "docs/training.md: the unchecked trunk's sentence moved"
    unchecked = largest_batches(recipe_trainer("lean", "sam3", act_ckpt_trunk=False), [40, 80])
    checked = largest_batches(recipe_trainer("lean", "sam3"), [40, 80])
    assert [int(n) for n in found.groups()] == unchecked + checked
