"""User-facing errors: one clear line naming the file or value and what to do."""


class DiffDISError(Exception):
    """A problem the user can fix (a missing file, a bad value).

    Front ends (the CLI, the ComfyUI nodes, the training scripts) print ``str(error)`` as a single
    line instead of a traceback.
    """
