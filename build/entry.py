"""The frozen binary's entry script (PyInstaller runs it as ``__main__``).

A separate file rather than ``locopilot/__main__.py``: PyInstaller puts the
script's folder on the analysis path, which would make ``locopilot``'s own
modules importable as top-level names (``server``, ``app``, ``errors``).
"""

from locopilot.__main__ import main

if __name__ == "__main__":
    main()
