"""Files that a campaign names are read only from inside the campaigns directory.

A campaign may name other files: its message template today (`message.template_file`), images and
attachments with rich messages. Those names come from whoever can write a campaign — or post one to
`/api/v1/campaigns/validate` — so they are confined here, in one place, for every kind of file:

* A name is a path relative to the campaign file's folder. After resolving `..` and symlinks it must lie
  inside the campaign root (`campaign_root`): the campaigns directory, or — for a campaign file loaded from
  elsewhere, such as `wecast validate other/x.yaml` — that file's own folder.
* Absolute paths, and anything that resolves outside the root (`/proc/self/environ`, `../../etc/passwd`, a
  symlink to `/dev/zero`), are refused with one message that does not depend on whether the path exists.
* Inside the root, only regular files are read: a directory, FIFO, socket or device is refused before it is
  opened (opening a FIFO would block), and so is a file over the kind's size cap.
* `CampaignFile.read_bytes` opens without following a final symlink, without blocking, and checks that it
  opened the file that was checked (same device and inode), so a swap between check and read is caught.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from engine.i18n import N_, ntr, tr

# Templates: at most 32,768 characters (engine.render.MAX_TEMPLATE_CHARS) of up to 4 bytes each in UTF-8.
MAX_TEMPLATE_BYTES = 128 * 1024


class CampaignFileError(ValueError):
    """A campaign names a file it may not use; `str(e)` says why, without saying what exists outside."""


@dataclass(frozen=True)
class CampaignFile:
    """A checked file: regular, inside the campaign root, at most `max_bytes`."""

    name: str  # as the campaign wrote it (for messages)
    path: Path  # resolved, absolute
    size: int
    max_bytes: int
    _identity: tuple[int, int]  # (st_dev, st_ino) at check time

    def open(self) -> BinaryIO:
        """The file, opened for reading (close it, or use `with`): without following a final symlink, without
        blocking, and only if it is still the file that was checked. Raises CampaignFileError."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags)
        except OSError:
            raise CampaignFileError(tr("file {name} cannot be read", name=repr(self.name))) from None
        handle = os.fdopen(fd, "rb")
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino) != self._identity or not stat.S_ISREG(info.st_mode):
            handle.close()
            raise CampaignFileError(tr("file {name} changed while it was being read", name=repr(self.name)))
        return handle

    def read_bytes(self) -> bytes:
        """The file's content. Raises CampaignFileError if it changed into something else since the check."""
        with self.open() as handle:
            data = handle.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise CampaignFileError(
                tr("file {name} is larger than {size}", name=repr(self.name), size=_size(self.max_bytes))
            )
        return data

    def read_text(self) -> str:
        """The content as UTF-8 text. Raises CampaignFileError for binary or non-UTF-8 content."""
        data = self.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise CampaignFileError(tr("file {name} is not UTF-8 text", name=repr(self.name))) from None
        if "\x00" in text:
            raise CampaignFileError(tr("file {name} is binary (it contains NUL bytes), not text", name=repr(self.name)))
        return text


def campaign_root(campaigns_dir: Path, campaign_file: Path) -> Path:
    """The folder the files a campaign names must stay inside: the campaigns directory when the campaign file
    is in it, else the campaign file's own folder."""
    root = Path(os.path.realpath(campaigns_dir))
    if Path(os.path.realpath(campaign_file)).is_relative_to(root):
        return root
    return Path(os.path.realpath(campaign_file.parent))


def resolve_campaign_file(root: Path, base: Path, name: str, *, kind: str, max_bytes: int) -> CampaignFile:
    """Check the file `name` (relative to the folder `base`) that a campaign uses as its `kind` ("template",
    "image", ...): inside `root` after resolving `..` and symlinks, a regular file, at most `max_bytes`.

    Raises CampaignFileError. Every path outside the root gets the same message, existing or not."""
    what = file_kind(kind)
    outside = CampaignFileError(
        tr(
            "{kind} {name} is outside the campaigns directory; give a path relative to the campaign file "
            "that stays inside the campaigns directory",
            kind=what,
            name=repr(name),
        )
    )
    if not name.strip():
        raise CampaignFileError(tr("the {kind} name is empty", kind=what))
    if "\x00" in name or Path(name).is_absolute():
        raise outside
    resolved = Path(os.path.realpath(base / name))
    if not resolved.is_relative_to(os.path.realpath(root)):
        raise outside
    try:
        info = os.stat(resolved)
    except FileNotFoundError:
        raise CampaignFileError(tr("{kind} not found: {name}", kind=what, name=name)) from None
    except OSError:
        raise CampaignFileError(tr("{kind} {name} cannot be read", kind=what, name=repr(name))) from None
    if not stat.S_ISREG(info.st_mode):
        raise CampaignFileError(
            tr("{kind} {name} is not a regular file (a directory, FIFO or device)", kind=what, name=repr(name))
        )
    if info.st_size > max_bytes:
        raise CampaignFileError(
            tr("{kind} {name} is larger than {size}", kind=what, name=repr(name), size=_size(max_bytes))
        )
    return CampaignFile(name, resolved, info.st_size, max_bytes, (info.st_dev, info.st_ino))


# What a campaign uses a file as ("template", "image", "file"), in words: "image file 'x.png' is empty".
_KINDS = {"template": N_("template file"), "image": N_("image file"), "file": N_("file")}


def file_kind(kind: str) -> str:
    """The words for a file a campaign uses as `kind`, in the reader's language."""
    words = _KINDS.get(kind)
    return tr(words) if words is not None else tr("{kind} file", kind=kind)


def _size(n: int) -> str:
    if n >= 1024 * 1024 and n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)} MiB"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024} KiB"
    return ntr("{n} byte", "{n} bytes", n)
