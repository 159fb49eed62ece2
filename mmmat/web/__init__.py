"""``mmmat serve``: a local web app (Dash) over the index, the model, identification, generation and design runs.

Everything the page needs (Dash's and Plotly's JavaScript) is served from the installed packages: the app works
without internet. It binds to 127.0.0.1 unless told otherwise, caps the size of an upload, and writes uploads
only into a private temporary folder, where they are read as data and never executed.
"""

from mmmat.web.uploads import DEFAULT_MAX_UPLOAD_MB, UploadError, UploadStore, check_upload_name

__all__ = ["DEFAULT_MAX_UPLOAD_MB", "UploadError", "UploadStore", "check_upload_name", "create_app", "serve"]


def __getattr__(name: str):  # lazy: the app imports Dash, which the library does not need
    if name in ("create_app", "serve"):
        from mmmat.web import app

        return getattr(app, name)
    raise AttributeError(name)
