"""Output folders: a command replaces only a folder of its own kind (a store, a run), never a user's files.

``--overwrite`` lets ``convert`` and ``export`` replace an ichprep store (or an interrupted one); a folder that
holds anything else is refused with what it holds unless the user names ``--overwrite-any``.  ``ichtrain``'s
run and experiment folders follow the same rule (:func:`check_output_folder`).
"""

from __future__ import annotations

from .errors import StoreExistsError

_SHOWN = 5


def describe_entries(entries: list[str]) -> str:
    """ "3 entries: a, b, c" (the first few names, and how many more)."""
    more = f", ... ({len(entries) - _SHOWN} more)" if len(entries) > _SHOWN else ""
    return f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}: {', '.join(entries[:_SHOWN])}{more}"


def check_output_folder(where, entries: list[str], *, ours: bool, kind: str, overwrite_any: bool) -> None:
    """Refuse to write into ``where`` when it holds ``entries`` and is not ``kind`` (``ours`` False), unless
    ``overwrite_any``.

    Raises
    ------
    StoreExistsError
        Naming the folder, what it holds, and the two ways on.
    """
    if not entries or ours or overwrite_any:
        return
    raise StoreExistsError(
        f"{where} is not {kind} and is not empty ({describe_entries(entries)}); refusing to replace or write "
        "into it: choose another path, or pass --overwrite-any to replace what it holds"
    )
