"""Where a sweep's durable files live: a local (or NFS) directory, or an object store (s3://, gs://).

Every durable write of a sweep goes through a Storage: whole objects in, whole objects out (bytes), so that
checks on what is read (checksums, set-aside files) have one place to live. Keys are relative paths
("results/<trial_id>.parquet"). A local write goes to a temp file that is renamed into place; an object
store has no rename, so an object is serialised in memory first and then written under its final key in one
request (an exception inside an open output stream would still commit a partial object). Either way a killed
writer leaves nothing a reader could take for finished.

What is read back is checked: `write_checked` puts a SHA-256 of the payload in front of it, and
`read_checked` raises Corrupt where the object does not match it (flipped bytes, a torn file). An object that
does not read back whole is set aside (`set_aside`: moved to _corrupt/ beside it, with one warning line), so
that the sweep redoes what it held and the file stays for a look.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.fs as pafs


# A checked object: this prefix, the payload's SHA-256 in hex and a newline, then the payload.
CHECKED = b"sau-sha256 "
SET_ASIDE = "_corrupt"  # a leading "_": pyarrow's data sets (a results/ directory read whole) skip it


class StorageError(ValueError):
    """A storage location that cannot be used; one line naming it."""


class Corrupt(ValueError):
    """An object that does not read back whole; the message says why."""


def cache_home() -> Path:
    """This machine's cache for what cannot live on an object store (see Storage.local_dir)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "sau"


class Storage:
    """A directory of a local filesystem or an object store, named by a path or a URI.

    `storage / "results"` is the storage of a subdirectory. URIs are read by pyarrow: credentials and
    endpoints come from the usual settings (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL,
    AWS_REGION, ~/.aws; GOOGLE_APPLICATION_CREDENTIALS) or from the URI's query
    (s3://bucket/prefix?endpoint_override=host:port&scheme=http)."""

    def __init__(self, location: str | os.PathLike, _root: tuple[pafs.FileSystem, str] | None = None):
        location = str(location)
        if _root is not None:
            self.uri, (self.fs, self.root) = location, _root
        elif "://" in location:
            try:
                self.fs, root = pafs.FileSystem.from_uri(location)
            except (pa.ArrowException, ValueError) as error:
                raise StorageError(f"storage {location}: {str(error).splitlines()[0]}") from None
            self.uri, self.root = location, root.rstrip("/")
        else:
            path = Path(location).expanduser().resolve()
            self.uri, self.fs, self.root = str(path), pafs.LocalFileSystem(), str(path)

    def __reduce__(self):
        # Sent to Ray workers as its URI: each process builds its own filesystem client from its own settings.
        return Storage, (self.uri,)

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    def __truediv__(self, name: str) -> Storage:
        uri = os.path.join(self.uri, name) if self.is_local else _join_uri(self.uri, name)
        return Storage(uri, _root=(self.fs, self._key(name)))

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def local_path(self) -> Path | None:
        """The directory itself where it is on a local (or NFS) filesystem, else None."""
        return Path(self.root) if self.is_local else None

    def local_dir(self) -> Path:
        """A directory on this machine for what cannot live on an object store (an SQLite database, the Optuna
        journal): the storage itself when it is local, else a cache directory named after the URI."""
        if self.is_local:
            return Path(self.root)
        scheme = self.uri.partition("://")[0]
        return cache_home() / "storage" / scheme / re.sub(r"[^A-Za-z0-9._/-]", "_", self.root)

    def tune_storage(self) -> dict:
        """Ray Tune's RunConfig arguments for an experiment directory `tune/` in this storage."""
        if self.is_local:
            return {"storage_path": self._key("tune")}
        return {"storage_path": self._key("tune"), "storage_filesystem": self.fs}

    def _key(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    def location(self, name: str = "") -> str:
        """Where `name` is, for messages."""
        return str(self / name) if name else self.uri

    def _info(self, name: str) -> pafs.FileInfo:
        return self.fs.get_file_info(self._key(name))

    def exists(self, name: str = "") -> bool:
        return self._info(name).type != pafs.FileType.NotFound

    def is_file(self, name: str = "") -> bool:
        return self._info(name).type == pafs.FileType.File

    def read(self, name: str) -> bytes | None:
        """The bytes of `name`, or None if there is no such file."""
        try:
            with self.fs.open_input_stream(self._key(name)) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes) -> None:
        """Write `data` as `name` whole: readers see the old file or the new one, never a part."""
        if self.is_local:
            self._place_local(name, data, os.replace)
        else:
            with self.fs.open_output_stream(self._key(name)) as f:
                f.write(data)

    def create(self, name: str, data: bytes) -> bool:
        """Write `data` as `name` only if there is no `name` yet; True where this call wrote it.

        Locally this is atomic: a temp file hard-linked into place (os.link fails where the name exists).
        pyarrow offers object stores no conditional write, so there the object is written where it is absent
        and read back, and the call wrote it if it reads back `data` (which should therefore hold a random
        token). That is best effort: two writers that both find the name absent, and each read back their
        own object before the other's write lands, both count as its writer."""
        if self.is_local:
            try:
                self._place_local(name, data, os.link)
            except FileExistsError:
                return False
            return True
        if self.exists(name):
            return False
        self.write(name, data)
        return self.read(name) == data

    def _place_local(self, name: str, data: bytes, place: Callable[[str, Path], None]) -> None:
        """Write `data` to a temp file beside `name` and `place` it there (os.replace, os.link), so that no
        reader sees a part of it."""
        path = Path(self._key(name))
        path.parent.mkdir(parents=True, exist_ok=True)
        # A leading dot and the .tmp suffix hide the temp file from names() and from pyarrow's data sets.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)  # mkstemp makes it private; the storage is shared by every worker
            place(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def write_checked(self, name: str, data: bytes) -> None:
        """Write `data` as `name` with its checksum in front; read it back with read_checked."""
        self.write(name, CHECKED + hashlib.sha256(data).hexdigest().encode() + b"\n" + data)

    def read_checked(self, name: str) -> bytes | None:
        """The payload of the checked object `name`, or None if there is none; Corrupt if it does not match
        its checksum."""
        blob = self.read(name)
        if blob is None:
            return None
        header, newline, data = blob.partition(b"\n")
        if not header.startswith(CHECKED) or not newline:
            raise Corrupt("no checksum header (torn, or not written as a checked object)")
        if hashlib.sha256(data).hexdigest().encode() != header[len(CHECKED):]:
            raise Corrupt("its SHA-256 does not match the one stored with it (corrupt or torn)")
        return data

    def set_aside(self, name: str, reason: str, then: str) -> None:
        """Move the file or directory `name` that did not read back whole to _corrupt/<name> beside it, with one
        warning line: what it is, `reason`, where it went and what happens `then`. Nothing if it is gone
        already (another reader set it aside)."""
        target = f"{SET_ASIDE}/{name}"
        info = self._info(name)
        if info.type == pafs.FileType.NotFound:
            return
        if info.type == pafs.FileType.File:
            sources = [name]
        else:  # an object store moves files only
            selector = pafs.FileSelector(self._key(name), recursive=True)
            sources = [name + f.path[len(self._key(name)):] for f in self.fs.get_file_info(selector)
                       if f.type == pafs.FileType.File]
        try:
            for source in sources:
                self.fs.create_dir(self._key(f"{SET_ASIDE}/{source}").rpartition("/")[0])
                self.fs.move(self._key(source), self._key(f"{SET_ASIDE}/{source}"))
        except FileNotFoundError:
            return
        if info.type == pafs.FileType.Directory:
            (self / name).delete_tree()
        print(f"warning: {self.location(name)}: {reason}; set aside as {self.location(target)}; {then}",
              file=sys.stderr)

    def check_writable(self) -> None:
        """Write a probe file into this directory and remove it (and any directory made for it) again: a storage
        that cannot be written fails in one line before anything of a sweep is written."""
        probe = f".probe-{uuid.uuid4().hex}.tmp"
        created = [] if not self.is_local else [p for p in (Path(self.root), *Path(self.root).parents)
                                                if not p.exists()]  # deepest first
        try:
            self.write(probe, b"")
            self.delete(probe)
        except OSError as error:
            raise StorageError(f"storage {self}: not writable ({error.strerror or str(error).splitlines()[0]})"
                               ) from None
        finally:
            for path in created:
                with contextlib.suppress(OSError):
                    path.rmdir()

    def names(self, suffix: str = "") -> list[str]:
        """Names of the files directly in this directory that end with `suffix` (none if it does not exist)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return sorted(i.base_name for i in infos
                      if i.type == pafs.FileType.File and i.base_name.endswith(suffix)
                      and not i.base_name.startswith("."))

    def delete(self, name: str) -> None:
        """Remove the file `name`, if there is one."""
        try:
            self.fs.delete_file(self._key(name))
        except FileNotFoundError:
            pass

    def delete_tree(self) -> None:
        """Remove this directory and everything in it, if it exists."""
        if self.exists():
            self.fs.delete_dir(self.root)


def _join_uri(uri: str, name: str) -> str:
    base, sep, query = uri.partition("?")
    return f"{base.rstrip('/')}/{name}" + (sep + query)
