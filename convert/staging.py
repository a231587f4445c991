"""All-or-nothing output folders: write into a hidden temp folder beside OUT, rename at the end.

The temp folder sits in OUT's parent so the final ``rename`` stays on one filesystem (atomic,
no copy). An existing OUT (only with ``--force``) is moved aside first and deleted only after
the new folder is in place; if that rename fails it is moved back. Any exception, including
Ctrl-C, removes the temp folder, so a failed run leaves the disk as it found it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

from sparsek.runtime.errors import UserError


def check_output(out: Path, sources: list[Path], force: bool) -> None:
    """Refuse outputs that would clobber user data or the source itself."""
    out_abs = out.expanduser().resolve()
    for src in sources:
        src_abs = src.resolve()
        if out_abs == src_abs or src_abs in out_abs.parents:
            raise UserError(f"OUT {out} is inside the source folder {src}; choose a folder outside it")
        if out_abs in src_abs.parents:
            raise UserError(f"OUT {out} contains the source folder {src}; choose another folder")
    if out.exists() or out.is_symlink():
        if not force:
            raise UserError(f"OUT {out} already exists; pass --force to replace it")
        if not out.is_dir() or out.is_symlink():
            raise UserError(f"OUT {out} exists and is not a folder; remove it yourself")
    parent = out_abs.parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is not None and (not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK)):
        raise UserError(f"cannot write into {existing}")


class Staging:
    """``with Staging(out, force) as tmp: ...write into tmp...; staging.commit()``."""

    def __init__(self, out: Path, force: bool):
        self.out = out.expanduser().absolute()
        self.force = force
        self.tmp: Path | None = None
        self._made_parents: list[Path] = []
        self._committed = False

    def __enter__(self) -> Path:
        missing = [p for p in (self.out.parent, *self.out.parent.parents) if not p.exists()]
        for p in reversed(missing):
            p.mkdir()
            self._made_parents.append(p)
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.sparsek-tmp-", dir=self.out.parent))
        except OSError as e:
            self._remove_made_parents()
            raise UserError(f"cannot create a folder in {self.out.parent}: {e.strerror or e}") from None
        return self.tmp

    def commit(self) -> None:
        """Move the finished folder to OUT (replacing an old OUT only now)."""
        assert self.tmp is not None
        old = None
        if self.out.exists():
            if not self.force:  # appeared while we were converting
                raise UserError(f"OUT {self.out} appeared during conversion; not replacing it without --force")
            old = self.out.parent / f".{self.out.name}.sparsek-old-{uuid.uuid4().hex[:8]}"
            os.rename(self.out, old)
        try:
            os.rename(self.tmp, self.out)
        except BaseException:
            if old is not None:
                os.rename(old, self.out)
            raise
        self._committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _remove_made_parents(self) -> None:
        for p in reversed(self._made_parents):
            try:
                p.rmdir()
            except OSError:
                break

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed:
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
            self._remove_made_parents()
