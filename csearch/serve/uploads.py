"""INDEX_DIR/uploads/: the images added through the API, kept with the index they belong to."""

from __future__ import annotations

import io
import uuid
from pathlib import Path

from ..store.durable import TMP_PREFIX, fsync_dir, write_bytes_atomic

UPLOADS = "uploads"
LEGACY_TMP_PREFIX = ".tmp-"  # what servers before the durable module left behind on a crash

FORMAT_SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


def upload_suffix(data: bytes) -> str:
    """A file suffix for the upload's real format (sniffed, never the client's file name)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        fmt = image.format or ""
    if fmt in FORMAT_SUFFIXES:
        return FORMAT_SUFFIXES[fmt]
    found = [ext for ext, name in Image.registered_extensions().items() if name == fmt]
    return found[0] if found else ".img"


class Uploads:
    """The uploads folder of one index. Files get fresh random names, never the client's."""

    def __init__(self, index_dir: Path):
        self.index_dir = Path(index_dir)
        self.directory = self.index_dir / UPLOADS

    def save(self, data: bytes) -> Path:
        """Store a validated image durably (before the index refers to it); its absolute path."""
        if not self.directory.is_dir():
            self.directory.mkdir(exist_ok=True)
            fsync_dir(self.index_dir)
        path = self.directory / f"{uuid.uuid4().hex}{upload_suffix(data)}"
        write_bytes_atomic(path, data)
        return path.resolve()

    def delete(self, path: Path) -> None:
        """Only files this service stored (catalogue images are the user's own files)."""
        if Path(path).parent == self.directory.resolve():
            Path(path).unlink(missing_ok=True)

    def remove_stale_temp_files(self) -> None:
        """Temporary files of writes cut short by a crash (never referred to by the index)."""
        if self.directory.is_dir():
            for prefix in (TMP_PREFIX, LEGACY_TMP_PREFIX):
                for stale in self.directory.glob(f"{prefix}*"):
                    stale.unlink(missing_ok=True)
