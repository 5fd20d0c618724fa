"""Downloads: checksum verified before unpacking, clear messages offline (loopback only)."""

import hashlib
import http.server
import socket
import threading
import zipfile
from functools import partial

import pytest

from metarec.data.download import BASE_URL_ENV, resolve_movielens_dir
from metarec.errors import DataError


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A GroupLens stand-in on 127.0.0.1 serving files from a temp dir."""
    root = tmp_path / "mirror"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv(BASE_URL_ENV, f"http://127.0.0.1:{server.server_port}")
    yield root
    server.shutdown()
    server.server_close()


def _zip(path, folder, files):
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(f"{folder}/{name}", text)
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_verifies_published_md5_and_caches(mirror, tmp_path):
    md5 = _zip(
        mirror / "ml-latest-small.zip",
        "ml-latest-small",
        {
            "ratings.csv": "userId,movieId,rating,timestamp\n1,1,4.0,1\n",
            "movies.csv": "movieId,title,genres\n1,Heat (1995),Action\n",
        },
    )
    (mirror / "ml-latest-small.zip.md5").write_text(f"{md5}  ml-latest-small.zip\n")
    cache = tmp_path / "cache"
    path = resolve_movielens_dir("ml-latest", None, download=True, cache_dir=cache)
    assert path == cache / "ml-latest-small" and (path / "ratings.csv").is_file()
    (mirror / "ml-latest-small.zip").unlink()  # second call must not touch the network
    assert resolve_movielens_dir("ml-latest", None, download=True, cache_dir=cache) == path


def test_checksum_mismatch_unpacks_nothing(mirror, tmp_path):
    _zip(mirror / "ml-100k.zip", "ml-100k", {"u.data": "1\t1\t5\t1\n"})  # not the real zip
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="does not match the published .*Nothing was unpacked"):
        resolve_movielens_dir("ml-100k", None, download=True, cache_dir=cache)
    assert list(cache.iterdir()) == []


def test_offline_download_says_what_to_do(tmp_path, monkeypatch):
    with socket.socket() as s:  # a loopback port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(BASE_URL_ENV, f"http://127.0.0.1:{port}")
    with pytest.raises(DataError, match="download failed .*Are you offline.*--input DIR"):
        resolve_movielens_dir("ml-1m", None, download=True, cache_dir=tmp_path)


def test_no_local_copy_without_download_suggests_the_flag(tmp_path):
    with pytest.raises(DataError, match="no local copy .*--download"):
        resolve_movielens_dir("ml-1m", None, download=False, cache_dir=tmp_path)


def test_input_dir_may_hold_the_unpacked_folder(tmp_path):
    (tmp_path / "ml-1m").mkdir()
    (tmp_path / "ml-1m" / "ratings.dat").write_text("1::1::5::1\n")
    assert resolve_movielens_dir("ml-1m", str(tmp_path), download=False) == tmp_path / "ml-1m"
