"""The spool folder: where the trainer leaves checkpoints for the uploader. Every path a request
names must stay inside it, symlinks resolved, because the uploader reads and then deletes them."""

from __future__ import annotations

import os
from pathlib import Path

from ckpt_uploader.ownership import private_folder
from ckpt_uploader.protocol import JobSpec, ProtocolError, check_relative_path


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = private_folder(Path(root), "spool")
        self.real_root = os.path.realpath(self.root)

    def _inside(self, path: Path) -> bool:
        real = os.path.realpath(path)
        return real != self.real_root and real.startswith(self.real_root + os.sep)

    def job_folder(self, src: str) -> Path:
        """``<spool>/<src>``; ProtocolError when it resolves outside the spool (or to the spool itself)."""
        check_relative_path(src, "src")
        folder = self.root / src
        if not self._inside(folder):
            raise ProtocolError(
                f"src: {src!r} resolves to {os.path.realpath(folder)}, outside the spool {self.real_root}"
            )
        return folder

    def check_job(self, spec: JobSpec) -> None:
        """Every path of the job stays inside the spool; files that do not exist yet pass here and
        fail the job later if they are still missing."""
        folder = self.job_folder(spec.src)
        for entry in spec.files:
            path = folder / entry.name
            if (path.exists() or path.is_symlink()) and not self._inside(path):
                raise ProtocolError(
                    f"files: {entry.name!r} resolves to {os.path.realpath(path)}, "
                    f"outside the spool {self.real_root}"
                )
