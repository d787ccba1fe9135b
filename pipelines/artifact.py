"""Deployment artifacts (an exported encoder, a gallery index): a folder that describes itself.

A folder holds data files and one JSON manifest, written last, that records every data file's size and
SHA-256 beside whatever the artifact needs to say about itself. A folder whose manifest is missing, does not
parse, or names a file whose size differs is not an artifact: a run killed half-way, or a copy cut short,
never looks valid. Rewriting a folder removes its manifest first. Any fsspec URI (local paths, ``s3://``).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Callable, Mapping
from typing import Any

from isa.errors import IsaError
from isa.storage import filesystem, write_bytes
from pipelines.lease import LEASE_FILE

FILES_KEY = "files"  # in the manifest: {name: {"bytes": size, "sha256": hex, or None where not recorded}}


class ArtifactError(IsaError):
    """A deployment artifact is missing, incomplete or of another kind; the message says which."""


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_folder(uri: str, kind: str, own: Callable[[str], bool], marker: str | None = None) -> bool:
    """The one rule for a stage's output folder: new, empty, or the stage's own; never a folder holding anything else.

    A folder that does not exist or is empty is new. A folder whose every entry is one the stage writes (``own``)
    and, where the stage names one, that holds its ``marker`` (the file that says what the folder is) is the
    stage's own earlier output: the stage's own rule says what happens to it (resume, rewrite, ``--overwrite``).
    Anything else is refused: a stage never mixes its files into a folder of other things.

    Args:
        kind: what the stage writes there, for messages ("teacher cache", "synthetic world").
        own: whether an entry's name (a file or a folder at the top of ``uri``) is one the stage writes.
        marker: the entry the stage's own folder always holds; None: any folder of own entries is the stage's.

    Returns:
        True when the folder holds the stage's own earlier output, False when it is new or empty.

    Raises:
        ArtifactError: ``uri`` is a file, or a folder holding entries that are not the stage's (a few named).
    """
    fs, root = filesystem(uri)
    fs.invalidate_cache(root)
    if not fs.exists(root):
        return False
    if not fs.isdir(root):
        raise ArtifactError(f"OUT {uri} is a file: name a folder to create")
    # the lease of a run writing there (pipelines.lease), or one a run killed while taking it left half-written, is
    # no entry of the folder's own
    listed = (posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False))
    names = sorted(n for n in listed if n != LEASE_FILE and not n.startswith(f".{LEASE_FILE}.tmp-"))
    marked = marker is None or marker in names
    foreign = [n for n in names if not own(n)] if marked else names
    if not foreign:
        return bool(names)
    shown = ", ".join(foreign[:3]) + (f", ... ({len(foreign)} entries)" if len(foreign) > 3 else "")
    if marker is not None and marked:
        raise ArtifactError(
            f"OUT {uri} holds other things beside its {kind} ({shown}): move them out, or name a new or empty folder"
        )
    raise ArtifactError(f"OUT {uri} is not empty and holds no {kind} (it holds {shown}): name a new or empty folder")


def check_output(uri: str, manifest_name: str, kind: str, own: Callable[[str], bool], overwrite: bool) -> bool:
    """:func:`check_folder` for an artifact: its earlier version (its manifest, or a killed run's files) is replaced
    only with ``overwrite``.

    Args:
        own: whether a file name in the folder is one the artifact writes (its manifest always is).

    Returns:
        True when the folder holds an earlier artifact to replace.

    Raises:
        ArtifactError: OUT is a file, holds other files (named), or holds an artifact and ``overwrite`` is off.
    """
    if not check_folder(uri, kind, lambda name: name == manifest_name or own(name)):
        return False
    if not overwrite:
        raise ArtifactError(f"OUT {uri} already holds a {kind}: --overwrite replaces it")
    return True


def record(data: bytes) -> dict[str, Any]:
    """What a manifest records of one data file: its size and digest."""
    return {"bytes": len(data), "sha256": digest(data)}


def write_manifest(uri: str, manifest_name: str, recorded: Mapping[str, Any], manifest: Mapping[str, Any]) -> str:
    """Write the manifest of a folder whose data files are in place (written here or by other processes).

    Args:
        recorded: each data file's :func:`record` (or ``{"bytes": size, "sha256": None}``), by name in the folder.

    Returns:
        The manifest's path within its filesystem.
    """
    fs, root = filesystem(uri)
    path = posixpath.join(root, manifest_name)
    write_bytes(fs, path, json.dumps({**manifest, FILES_KEY: dict(recorded)}, indent=2, sort_keys=True).encode())
    return path


def remove_manifest(uri: str, manifest_name: str) -> None:
    """Make a folder stop being an artifact before its files are rewritten."""
    fs, root = filesystem(uri)
    path = posixpath.join(root, manifest_name)
    if fs.exists(path):
        fs.rm(path)


def write_artifact(uri: str, manifest_name: str, files: Mapping[str, bytes], manifest: Mapping[str, Any]) -> str:
    """Write ``files`` into the folder ``uri``, then ``manifest`` (with each file's size and digest) last.

    Returns:
        The manifest's path within its filesystem.
    """
    remove_manifest(uri, manifest_name)  # from here on the folder is not a valid artifact until the new one lands
    fs, root = filesystem(uri)
    for name, data in files.items():
        write_bytes(fs, posixpath.join(root, name), data)
    return write_manifest(uri, manifest_name, {name: record(data) for name, data in files.items()}, manifest)


def seal_artifact(uri: str, manifest_name: str, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Write the manifest of a folder whose data files another writer has put there (Ray Data's writes): every
    file not hidden, not ``_``-prefixed and not the manifest, recorded by size (no digest: they may be large).

    Returns:
        The manifest as written.
    """
    fs, root = filesystem(uri)
    fs.invalidate_cache(root)
    recorded = {
        posixpath.relpath(path, root): {"bytes": info["size"], "sha256": None}
        for path, info in sorted(fs.find(root, detail=True).items())
        if not posixpath.basename(path).startswith((".", "_"))
    }
    write_manifest(uri, manifest_name, recorded, manifest)
    return {**manifest, FILES_KEY: recorded}


def read_artifact(uri: str, manifest_name: str, kind: str) -> dict[str, Any]:
    """The manifest of a complete artifact folder.

    Args:
        kind: what the folder should hold, for messages ("exported query encoder", "gallery index").

    Raises:
        ArtifactError: no manifest, a manifest that does not parse, or a recorded file missing or of another size.
    """
    fs, root = filesystem(uri)
    path = posixpath.join(root, manifest_name)
    if not fs.exists(path):
        raise ArtifactError(f"{uri} is not a {kind}: it has no {manifest_name} (not made, or its writer was stopped)")
    try:
        manifest = json.loads(fs.cat_file(path))
        recorded = manifest[FILES_KEY]
    except (ValueError, KeyError, TypeError) as error:
        raise ArtifactError(f"{kind} {uri}: {manifest_name} is unreadable ({error})") from None
    fs.invalidate_cache(root)
    for name, entry in recorded.items():
        file = posixpath.join(root, name)
        if not fs.exists(file) or fs.size(file) != entry["bytes"]:
            raise ArtifactError(
                f"{kind} {uri} is incomplete: {name} is missing or not {entry['bytes']} bytes (a copy cut short?)"
            )
    return manifest


def read_file(uri: str, name: str, manifest: Mapping[str, Any]) -> bytes:
    """One data file of an artifact read by :func:`read_artifact`, checked against its recorded digest.

    Raises:
        ArtifactError: the file's contents differ from the ones recorded.
    """
    fs, root = filesystem(uri)
    data = fs.cat_file(posixpath.join(root, name))
    expected = manifest[FILES_KEY][name]["sha256"]
    if expected is not None and digest(data) != expected:
        raise ArtifactError(f"{uri}/{name} differs from the digest its manifest records: the artifact was altered")
    return data
