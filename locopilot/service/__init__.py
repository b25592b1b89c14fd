"""Running locopilot as a service: the systemd unit, the launchd job and the env file.

The files in the repository's ``systemd/`` folder are generated from these modules
(``just docs``; a test fails if they drift), and ``locopilot service install``
writes the same text, so the shipped examples and an installed service agree.
"""


def repository_files() -> dict[str, str]:
    """The generated files of the repository's ``systemd/`` folder: relative path → text (``just docs``)."""
    from locopilot.service import envfile, launchd, systemd

    return {
        "systemd/locopilot.env.example": envfile.example(),
        "systemd/locopilot.service": systemd.unit(),
        "systemd/com.locopilot.plist": launchd.example(),
    }
