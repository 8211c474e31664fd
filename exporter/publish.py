"""Publishing a bundle directory whole or not at all, and never over what it was not told to replace.

A bundle is built in a staging directory beside its output (`.<name>.stage-<random>`, holding a `.owner`
file with the builder's PID) and published by one rename that refuses to replace anything (Linux
renameat2 RENAME_NOREPLACE). Replacing an existing bundle (`--force`) first renames it aside to a unique
name, publishes, then deletes it. Staging directories left by a killed run (their PID no longer running)
are removed by the next run beside the same output.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import tempfile
from pathlib import Path

from runtime.bundle import MANIFEST
from runtime.errors import BundleError

OWNER = ".owner"
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output path that exists and may not be replaced: only an existing bundle
    (a directory with a manifest) is replaced, and only with `overwrite`."""
    if out.is_symlink() or out.exists():
        if overwrite and out.is_dir() and not out.is_symlink() and (out / MANIFEST).is_file():
            return
        hint = "pass --force to replace it" if (out / MANIFEST).is_file() else "choose a new output path"
        raise BundleError(f"{out}: already exists; {hint}")
    if not out.parent.is_dir():
        if out.parent.exists():
            raise BundleError(f"{out.parent}: not a directory; choose an output path inside a directory")
        out.parent.mkdir(parents=True, exist_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: Path) -> list[Path]:
    """Remove the staging and set-aside directories of `out` whose owner process is gone; a bundle set aside
    by a `--force` run killed before it published goes back to `out` when nothing took its place."""
    removed = []
    for d in sorted(out.parent.glob(f".{out.name}.*-*")):
        if not d.is_dir() or d.is_symlink():
            continue
        try:
            pid = int((d / OWNER).read_text())
        except (OSError, ValueError):
            continue  # not ours, or being written right now
        if _alive(pid):
            continue
        if (d / "bundle" / MANIFEST).is_file() and not (out.exists() or out.is_symlink()):
            os.rename(d / "bundle", out)
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def stage(out: Path) -> Path:
    """A new, uniquely named staging directory beside `out`, owned by this process, with the permissions
    the umask gives a new directory (mkdtemp's 0700 would make the bundle unreadable to other accounts)."""
    clean_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.stage-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    (tmp / OWNER).write_text(str(os.getpid()))
    return tmp


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`; FileExistsError if `dst` exists (an empty directory included)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        fn = getattr(libc, "renameat2", None)
        if fn is not None:
            if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
                return
            err = ctypes.get_errno()
            if err == errno.EEXIST:
                raise FileExistsError(errno.EEXIST, os.strerror(err), str(dst))
            if err not in (errno.EINVAL, errno.ENOSYS):  # a file system without the flag falls through
                raise OSError(err, os.strerror(err), str(src))
    if dst.exists() or dst.is_symlink():  # elsewhere: check, then rename (a race window remains)
        raise FileExistsError(errno.EEXIST, "exists", str(dst))
    os.rename(src, dst)


def publish(tmp: Path, out: Path, overwrite: bool) -> Path:
    """Move the staged bundle `tmp` to `out`: never over anything but an existing bundle, and over that
    only with `overwrite`; `tmp` is gone afterwards whatever happens."""
    (tmp / OWNER).unlink(missing_ok=True)
    aside = None
    try:
        if overwrite and (out / MANIFEST).is_file() and not out.is_symlink():
            aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            (aside / OWNER).write_text(str(os.getpid()))
            os.rename(out, aside / "bundle")
        try:
            rename_noreplace(tmp, out)
        except FileExistsError:
            raise BundleError(
                f"{out}: appeared while this bundle was built; nothing was replaced (choose another output path, "
                "or pass --force to replace a bundle)"
            ) from None
    except BaseException:
        if aside is not None and (aside / "bundle").exists() and not out.exists():
            os.rename(aside / "bundle", out)  # put the old bundle back
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    return out
