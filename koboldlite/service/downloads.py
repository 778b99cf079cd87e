"""Getting models: downloads that resume and are checked."""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import sys
import threading
import urllib.error
import urllib.parse
from typing import Callable

from ..version import __version__
from ..model_files import model_name_of


class DownloadError(Exception):
    pass


class ModelDownload:
    """One GGUF file fetched from an http(s) URL into the models folder. The bytes go to NAME.gguf.part (never
    taken for a model), an interrupted transfer goes on from where it stopped with a Range request (within one
    call, and in a later one), the file is checked against the size and SHA-256 the server states (Hugging
    Face: X-Linked-Size, X-Linked-ETag, on the redirect to its CDN), and only then renamed into place."""

    CHUNK = 1 << 20
    ATTEMPTS = 5            # connections for one download before it gives up (each one resumes)
    TIMEOUT = 60.0
    _locks: dict[str, threading.Lock] = {}
    _locks_guard = threading.Lock()

    def __init__(self, url: str, folder: str, progress: Callable[[int, int], None] = lambda done, total: None,
                 stage: Callable[[str], None] = lambda what: None):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise DownloadError(f"not an http(s) URL: {url}")
        file = os.path.basename(urllib.parse.unquote(parsed.path))
        if not re.fullmatch(r"[\w.+-]+\.gguf", file, re.I) or file.startswith("."):
            raise DownloadError(f"the URL must name a .gguf file, not {file or parsed.path!r}")
        self.url, self.folder, self.progress, self.stage = url, folder, progress, stage
        self.path = os.path.join(folder, file)
        self.part = self.path + ".part"
        self.name = model_name_of(self.path)
        self.total = 0
        self.sha256: str | None = None

    def run(self) -> str:
        """The downloaded file's path (at once if it is already there)."""
        with self._locks_guard:
            lock = self._locks.setdefault(self.path, threading.Lock())
        with lock:                      # two pulls of one file: the second finds it done
            if os.path.isfile(self.path):
                return self.path
            for attempt in range(self.ATTEMPTS):
                have = os.path.getsize(self.part) if os.path.isfile(self.part) else 0
                try:
                    if self._transfer(have):
                        break
                except (OSError, http.client.HTTPException) as e:   # a dropped connection: resume
                    if attempt == self.ATTEMPTS - 1:
                        raise DownloadError(f"download of {self.url} failed after {self.ATTEMPTS} tries: "
                                            f"{e}; run it again to resume") from None
            self._verify()
            os.replace(self.part, self.path)
            return self.path

    def _open(self, have: int):
        """The response, following redirects by hand: the first hop carries Hugging Face's size and hash."""
        import urllib.request
        stated: dict[str, str] = {}

        class Remember(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, req, fp, code, msg, headers, newurl):
                for key in ("X-Linked-Size", "X-Linked-ETag"):
                    if headers.get(key):
                        stated[key] = headers[key]
                return super().redirect_request(req, fp, code, msg, headers, newurl)
        opener = urllib.request.build_opener(Remember)
        request = urllib.request.Request(self.url, headers={"User-Agent": f"koboldlite/{__version__}",
                                                            **({"Range": f"bytes={have}-"} if have else {})})
        try:
            response = opener.open(request, timeout=self.TIMEOUT)
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:          # the part is all there is: check it
                return None, stated
            raise DownloadError(f"{self.url}: HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            raise DownloadError(f"cannot reach {self.url}: {e.reason}") from None
        for key in ("X-Linked-Size", "X-Linked-ETag"):
            stated.setdefault(key, response.headers.get(key) or "")
        return response, stated

    def _transfer(self, have: int) -> bool:
        """One connection's worth; True when the file is complete."""
        response, stated = self._open(have)
        if response is None:
            return True
        with response:
            if have and response.status != 206:
                have = 0                           # the server ignored the Range: start again
            if response.status == 206:
                start = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
                if not start or int(start.group(1)) != have:
                    raise DownloadError(f"{self.url}: the server resumed at the wrong place")
            length = int(response.headers.get("Content-Length") or 0)
            self.total = int(stated.get("X-Linked-Size") or 0) or (have + length if length else 0)
            etag = (stated.get("X-Linked-ETag") or response.headers.get("ETag") or "").strip('W/"')
            self.sha256 = etag.lower() if re.fullmatch(r"[0-9a-fA-F]{64}", etag) else None
            free = shutil.disk_usage(self.folder).free
            if self.total and self.total - have > free:
                raise DownloadError(f"not enough disk space for {os.path.basename(self.path)}: it needs "
                                    f"{(self.total - have) >> 20} MiB more, {free >> 20} MiB are free in "
                                    f"{self.folder}")
            done = have
            with open(self.part, "ab" if have else "wb") as out:
                self.progress(done, self.total)
                while True:
                    data = response.read(self.CHUNK)
                    if not data:
                        break
                    out.write(data)
                    done += len(data)
                    self.progress(done, self.total)
            return not self.total or done >= self.total

    def _verify(self):
        """Size, then the hash the server stated, then the GGUF magic; a bad file is removed."""
        self.stage("verifying sha256 digest")
        size = os.path.getsize(self.part)
        problem = None
        if self.total and size != self.total:
            problem = f"it is {size} bytes, the server said {self.total}"
        elif self.sha256:
            digest = hashlib.sha256()
            with open(self.part, "rb") as f:
                while block := f.read(self.CHUNK):
                    digest.update(block)
            if digest.hexdigest() != self.sha256:
                problem = f"its SHA-256 is {digest.hexdigest()}, the server said {self.sha256}"
        if problem is None:
            with open(self.part, "rb") as f:
                if f.read(4) != b"GGUF":
                    problem = "it is not a GGUF file"
        if problem:
            os.remove(self.part)
            raise DownloadError(f"download of {self.url} refused: {problem}")


class ConsoleProgress:
    """A download's progress on stderr, redrawn when a step of the bar fills."""

    WIDTH = 30

    def __init__(self, name: str):
        self.name, self._shown = name, None

    def __call__(self, done: int, total: int):
        filled = int(done / total * self.WIDTH) if total else 0
        shown = (filled, done >> 24 if not total else 0)
        if shown == self._shown:
            return
        self._shown = shown
        bar = f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {done / total * 100:3.0f}% " if total else ""
        end = "\n" if total and done >= total else ""
        print(f"\rDownloading {self.name} {bar}{done >> 20}/{total >> 20 if total else '?'} MiB", end=end,
              file=sys.stderr, flush=True)
