"""Model URIs -> a local file or model folder.

Supported: plain paths and `file://`, `pvc://claim/path` (a PersistentVolumeClaim
the pod mounts under a root directory), and `http(s)://` (downloaded once into
a cache directory, verified against a sha256 when one is given). A path may
name a file (an ONNX or TorchScript model) or a folder (an onnxruntime-genai
or Hugging Face model folder); an `http(s)://` URL ending in .tar, .tar.gz,
.tgz or .zip is an archive of such a folder, unpacked once next to the
download (as KServe's storage initializer does). Anything else
(`s3://`, `hf://`, ...) is refused with a message that says what to do instead:
the runtime never pulls from a hub by itself.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

SUPPORTED = ("file", "pvc", "http", "https")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ModelURIError(ValueError):
    """The URI is malformed, unsupported, or points at nothing usable."""


@dataclass(frozen=True)
class ParsedURI:
    scheme: str  # "file" | "pvc" | "http" | "https"
    location: str  # a path for file, "claim/path" for pvc, the URL (no fragment) for http(s)
    sha256: str | None = None


def parse_model_uri(uri: str, sha256: str | None = None) -> ParsedURI:
    """Split a model URI; a `#sha256=<hex>` fragment or the sha256 argument pins the content."""
    if not uri:
        raise ModelURIError("model URI is empty")
    if "://" not in uri:
        return ParsedURI("file", uri, _check_sha(sha256))
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in SUPPORTED:
        raise ModelURIError(
            f"unsupported model URI scheme {scheme!r} in {uri!r}: terrace-runtime loads "
            f"{', '.join(s + '://' for s in SUPPORTED)} or a plain path; copy the model onto a "
            "PVC (pvc://claim/path) or serve it over HTTP(S) instead"
        )
    fragment_sha = None
    if parts.fragment:
        key, _, value = parts.fragment.partition("=")
        if key != "sha256":
            raise ModelURIError(f"unknown URI fragment {parts.fragment!r}; expected #sha256=<hex>")
        fragment_sha = value
    if fragment_sha and sha256 and fragment_sha.lower() != sha256.lower():
        raise ModelURIError("the URI's #sha256 and the --sha256 flag disagree")
    digest = _check_sha(sha256 or fragment_sha)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ModelURIError(f"file:// URIs name a local path, got host {parts.netloc!r}")
        return ParsedURI("file", unquote(parts.path), digest)
    if scheme == "pvc":
        claim, path = parts.netloc, unquote(parts.path).lstrip("/")
        if not claim or not path:
            raise ModelURIError(f"pvc URI must be pvc://<claim>/<path>, got {uri!r}")
        return ParsedURI("pvc", f"{claim}/{path}", digest)
    if not parts.netloc:
        raise ModelURIError(f"{scheme} URI has no host: {uri!r}")
    return ParsedURI(scheme, parts._replace(fragment="").geturl(), digest)


def _check_sha(value: str | None) -> str | None:
    if value is None or value == "":
        return None
    value = value.lower()
    if not _SHA256.match(value):
        raise ModelURIError(f"sha256 must be 64 hex characters, got {value!r}")
    return value


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pvc_candidates(location: str, mount_root: Path) -> list[Path]:
    """Where pvc://claim/path may be mounted: the claim mounted AT the root (one
    claim per pod, KServe's layout) or under root/<claim> (several claims)."""
    claim, _, path = location.partition("/")
    return [mount_root / path, mount_root / claim / path]


def resolve_model_uri(
    uri: str,
    *,
    cache_dir: Path,
    pvc_root: Path,
    sha256: str | None = None,
    timeout_s: float = 300.0,
) -> Path:
    """A local path holding the model (blocking: call it off the event loop)."""
    parsed = parse_model_uri(uri, sha256)
    if parsed.scheme == "file":
        path = Path(parsed.location)
        if not path.exists():
            raise ModelURIError(f"model file not found: {path} (no file or folder there)")
        _verify(path, parsed.sha256)
        return path
    if parsed.scheme == "pvc":
        tried = pvc_candidates(parsed.location, pvc_root)
        for path in tried:
            if path.exists():
                _verify(path, parsed.sha256)
                return path
        raise ModelURIError(
            f"model file not found for pvc://{parsed.location}: tried "
            + ", ".join(str(p) for p in tried)
            + " (is the claim mounted? set --pvc-root)"
        )
    downloaded = _download(parsed, cache_dir, timeout_s)
    return unpack(downloaded) if archive_kind(downloaded.name) else downloaded


ARCHIVES = {".tar": "tar", ".tar.gz": "tar", ".tgz": "tar", ".zip": "zip"}


def archive_kind(name: str) -> str | None:
    return next((kind for ext, kind in ARCHIVES.items() if name.endswith(ext)), None)


def unpack(archive: Path) -> Path:
    """Unpack `archive` once into a folder beside it; the model folder is the
    archive's single top-level folder when it has one, else the folder itself.
    Members that would land outside the folder (absolute paths, ``..``, links
    out) are refused: tarfile's "data" filter."""
    kind = archive_kind(archive.name)
    stem = archive.name
    for ext in ARCHIVES:
        stem = stem.removesuffix(ext)
    target = archive.parent / f"{stem}.d"
    if not target.is_dir():
        tmp = Path(tempfile.mkdtemp(dir=archive.parent, prefix=".unpack-"))
        try:
            if kind == "tar":
                with tarfile.open(archive) as tar:
                    tar.extractall(tmp, filter="data")
            else:
                with zipfile.ZipFile(archive) as zf:
                    for member in zf.namelist():
                        if member.startswith("/") or ".." in Path(member).parts:
                            raise ModelURIError(f"{archive.name}: unsafe member path {member!r}")
                    zf.extractall(tmp)
            os.replace(tmp, target)
        except (tarfile.TarError, zipfile.BadZipFile, OSError) as exc:
            raise ModelURIError(f"cannot unpack {archive.name}: {exc}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    entries = [p for p in target.iterdir() if not p.name.startswith(".")]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else target


def _verify(path: Path, expected: str | None) -> None:
    if expected is None:
        return
    if path.is_dir():
        raise ModelURIError(
            f"{path} is a folder: a sha256 pins one file (pin the archive it came in instead)"
        )
    actual = file_sha256(path)
    if actual != expected:
        raise ModelURIError(f"sha256 mismatch for {path}: expected {expected}, got {actual}")


def _download(parsed: ParsedURI, cache_dir: Path, timeout_s: float) -> Path:
    import httpx  # only needed for remote models

    url = parsed.location
    name = Path(urlsplit(url).path).name or "model"
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    target = cache_dir / key / name
    # A pinned digest makes the cache trustworthy; without one, a cached copy
    # from an earlier start is reused (the URL is the identity).
    if target.is_file() and (parsed.sha256 is None or file_sha256(target) == parsed.sha256):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".download-")
    try:
        with (
            os.fdopen(fd, "wb") as out,
            httpx.stream("GET", url, timeout=timeout_s, follow_redirects=True) as response,
        ):
            if response.status_code != 200:
                raise ModelURIError(f"downloading {url} failed: HTTP {response.status_code}")
            for chunk in response.iter_bytes(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if parsed.sha256 is not None and digest.hexdigest() != parsed.sha256:
            raise ModelURIError(
                f"sha256 mismatch for {url}: expected {parsed.sha256}, got {digest.hexdigest()}"
            )
        # Rename last, so a crash mid-download never leaves a truncated model in the cache.
        os.replace(tmp_name, target)
    except httpx.HTTPError as exc:
        raise ModelURIError(f"downloading {url} failed: {exc}") from exc
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return target
