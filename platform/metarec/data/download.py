"""Fetch MovieLens archives from GroupLens, only when the user asks (``--download``).

MovieLens' license forbids redistribution, so metarec never ships the data: it reads a local
directory, or downloads the official zip into a cache and checks its MD5 before unpacking.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from metarec.errors import DataError

__all__ = ["ARCHIVES", "default_cache_dir", "fetch_movielens", "resolve_movielens_dir"]

log = logging.getLogger(__name__)
BASE_URL_ENV = "METAREC_MOVIELENS_URL"  # mirror base URL (tests point it at a loopback server)
DEFAULT_BASE_URL = "https://files.grouplens.org/datasets/movielens"


@dataclass(frozen=True)
class Archive:
    zip_name: str
    folder: str  # top-level folder inside the zip
    marker: str  # a file that proves the folder is complete
    md5: str | None  # None: the archive is updated over time; check GroupLens' published .md5


ARCHIVES = {
    "ml-100k": Archive("ml-100k.zip", "ml-100k", "u.data", "0e33842e24a9c977be4e0107933c0723"),
    "ml-1m": Archive("ml-1m.zip", "ml-1m", "ratings.dat", "c4d9eecfca2ab87c1945afe126590906"),
    "ml-latest": Archive("ml-latest-small.zip", "ml-latest-small", "ratings.csv", None),
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("METAREC_CACHE", Path.home() / ".cache" / "metarec"))


def resolve_movielens_dir(
    source: str, input_dir: str | None, *, download: bool, cache_dir: Path | None = None
) -> Path:
    """Return a directory holding the ``source`` files: ``input_dir``, the cache, or a download."""
    archive = ARCHIVES[source]
    if input_dir is not None:
        path = Path(input_dir)
        if (path / archive.marker).is_file():
            return path
        if (path / archive.folder / archive.marker).is_file():
            return path / archive.folder
        if not download:
            raise DataError(
                f"--input {path}: no {archive.marker} found there; expected an "
                f"unpacked {archive.zip_name}. Pass --download to fetch it."
            )
    cache = cache_dir or default_cache_dir()
    cached = cache / archive.folder
    if (cached / archive.marker).is_file():
        return cached
    if not download:
        raise DataError(
            f"{source}: no local copy (give --input DIR, or --download to fetch "
            f"{archive.zip_name} from GroupLens into {cache})"
        )
    return fetch_movielens(source, cache)


def fetch_movielens(source: str, cache: Path) -> Path:
    """Download, verify and unpack one archive into ``cache`` atomically."""
    archive = ARCHIVES[source]
    base = os.environ.get(BASE_URL_ENV, DEFAULT_BASE_URL).rstrip("/")
    url = f"{base}/{archive.zip_name}"
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        zip_path = Path(tmp) / archive.zip_name
        log.info("downloading %s", url)
        _get(url, zip_path)
        expected = archive.md5 or _get_text(f"{url}.md5").split()[0]
        actual = _md5(zip_path)
        if actual != expected.lower():
            raise DataError(
                f"{url}: MD5 {actual} does not match the published {expected}; the "
                "download is corrupt or the mirror changed. Nothing was unpacked."
            )
        try:
            with zipfile.ZipFile(zip_path) as zf:
                zf.extractall(tmp)
        except zipfile.BadZipFile as e:
            raise DataError(f"{url}: not a valid zip archive ({e})") from e
        unpacked = Path(tmp) / archive.folder
        if not (unpacked / archive.marker).is_file():
            raise DataError(f"{url}: archive has no {archive.folder}/{archive.marker}")
        target = cache / archive.folder
        if target.exists():
            shutil.rmtree(target)
        unpacked.rename(target)
    return target


def _get(url: str, dest: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(dest, "wb") as f:
            shutil.copyfileobj(resp, f)
    except (urllib.error.URLError, OSError) as e:
        raise DataError(
            f"{url}: download failed ({getattr(e, 'reason', e)}). Are you offline? "
            "Download the zip by hand, unpack it and pass --input DIR."
        ) from e


def _get_text(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            return resp.read().decode()
    except (urllib.error.URLError, OSError) as e:
        raise DataError(
            f"{url}: could not fetch the published checksum ({getattr(e, 'reason', e)})"
        ) from e


def _md5(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.md5(usedforsecurity=False)).hexdigest()
