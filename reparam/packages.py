"""Optional third-party packages: which version is installed, read from the package metadata (nothing imported)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["package_version"]


def package_version(name: str) -> str | None:
    """The installed version of the distribution ``name`` (``"executorch"``, ``"timm"``), or None when it is not
    installed.  Nothing is imported, so this is cheap and safe for a package that would fail to import."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None
