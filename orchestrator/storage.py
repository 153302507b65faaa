"""Where a sweep's durable files live: a local (or NFS) directory, or an object store (s3://, gs://).

Every durable write of a sweep goes through a Storage: whole objects in, whole objects out (bytes), so that
checks on what is read (checksums, set-aside files) have one place to live. Keys are relative paths
("results/<trial_id>.parquet"). A local write goes to a temp file that is renamed into place; an object
store has no rename, so an object is serialised in memory first and then written under its final key in one
request (an exception inside an open output stream would still commit a partial object). Either way a killed
writer leaves nothing a reader could take for finished.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs


class StorageError(ValueError):
    """A storage location that cannot be used; one line naming it."""


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
            path = Path(self._key(name))
            path.parent.mkdir(parents=True, exist_ok=True)
            # A leading dot and the .tmp suffix hide the temp file from names() and from pyarrow's data sets.
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.chmod(tmp, 0o644)  # mkstemp makes it private; the storage is shared by every worker
                os.replace(tmp, path)
            finally:
                Path(tmp).unlink(missing_ok=True)
        else:
            with self.fs.open_output_stream(self._key(name)) as f:
                f.write(data)

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
