"""The web console's static files (``console/``), shipped inside the package and the one-file binary.

:func:`console_assets` reads them once into memory; :mod:`locopilot.api.console` serves them.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

#: The only types the console ships; anything else in the folder is not served.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".json": "application/manifest+json",
    ".txt": "text/plain; charset=utf-8",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str


def console_assets() -> dict[str, Asset]:
    """Every file of the console by its name (``app.js``), read from the package. Blocks (file reads)."""
    folder = resources.files(__name__).joinpath("console")
    assets = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in CONTENT_TYPES:
            assets[entry.name] = Asset(entry.read_bytes(), CONTENT_TYPES[suffix])
    return assets
