"""Print the locked version and sdist sha256 of one package from uv.lock: ``VERSION SHA256``.

Used by build/engine_wheel.sh and build/pyinstaller_wheel.sh, so a wheel built from
source is always the version (and the exact sdist) the lock file names.
"""

import re
import sys
import tomllib

lock_path, name = sys.argv[1], sys.argv[2]
with open(lock_path, "rb") as lock_file:
    lock = tomllib.load(lock_file)
(package,) = [p for p in lock["package"] if p["name"] == name]
print(package["version"], re.sub("^sha256:", "", package["sdist"]["hash"]))
