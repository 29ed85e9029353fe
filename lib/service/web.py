"""The local web page of ``bow_pipeline/serve.py``: a Flask app on one
:class:`~lib.service.query_service.QueryService`.

Why Flask: a small, well-kept WSGI framework whose request parsing (multipart uploads
with a size cap, ``MAX_CONTENT_LENGTH``), routing, static files and test client are
maintained for us; werkzeug's threaded server (``make_server(..., threaded=True)``)
answers each request in its own thread, which suits a local tool: the expensive part
(network, index) is shared by the service, and the page needs nothing else. Everything
the page uses (``static/``: plain HTML, CSS and JavaScript) is served from the
repository: no CDN, no build step, no network access.

API (JSON): ``GET /api/info``; ``POST /api/search`` (multipart: ``image`` file, optional
``box`` "x1,y1,x2,y2" in pixels of the photo, optional ``top``); ``GET /api/queries``;
``GET /api/queries/<i>?top=K`` (a dataset query with its ground truth). Images:
``GET /thumb/<image id>?size=N`` (a database image resized server-side, N capped),
``GET /query_image/<i>?size=N`` and ``/query_image/<i>/file`` (a dataset query photo).
Every error is a JSON ``{"error": "<one line>"}`` with a 4xx status (5xx: logged, never
a stack trace in the page).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from flask import Flask, Response, jsonify, request, send_file
from PIL import Image, ImageOps
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.utils import secure_filename

from lib.errors import UserError
from lib.service.query_service import QueryService, parse_box

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
MAX_UPLOAD_BYTES = 20 << 20
MAX_TOP = 200
THUMB_SIZES = (96, 160, 256, 512, 1024)  # longest side; a request is rounded up to one


def thumbnail_bytes(path: Path, size: int, max_pixels: int) -> bytes:
    """JPEG of an image resized to fit ``size`` x ``size`` (EXIF orientation applied,
    so boxes in original pixels scale by width alone). Checks the pixel count before
    decoding, like the pipeline's decoder; JPEGs are decoded at a reduced scale."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise UserError(f"{path.name}: too large ({w}x{h} pixels) for a thumbnail")
            im.draft("RGB", (size, size))
            out = ImageOps.exif_transpose(im) or im
            out = out.convert("RGB")
            out.thumbnail((size, size), Image.Resampling.BILINEAR)
            buf = io.BytesIO()
            out.save(buf, "JPEG", quality=85)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path.name}: cannot make a thumbnail ({reason})") from None
    return buf.getvalue()


def _size_arg(default: int) -> int:
    try:
        n = int(request.args.get("size", default))
    except ValueError:
        raise UserError("size: expected an integer number of pixels") from None
    return next((s for s in THUMB_SIZES if s >= n), THUMB_SIZES[-1])


def _top_arg(value: Any, default: int) -> int:
    if value in (None, ""):
        return default
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise UserError(f"top: expected an integer, got {value!r}") from None
    if not 1 <= n <= MAX_TOP:
        raise UserError(f"top: must lie in [1, {MAX_TOP}], got {n}")
    return n


def create_app(service: QueryService, max_upload_bytes: int = MAX_UPLOAD_BYTES,
               default_top: int = 20) -> Flask:
    """The Flask app answering with ``service`` (shared by every request thread)."""
    app = Flask(__name__, static_folder=str(STATIC), static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = int(max_upload_bytes)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    s = service.settings

    @lru_cache(maxsize=4096)
    def thumb(kind: str, key: str, size: int) -> bytes:
        path = (service.database_image(key) if kind == "db"
                else service.query_image(int(key))[1])
        return thumbnail_bytes(path, size, service.max_pixels)

    def jpeg(data: bytes) -> Response:
        r = Response(data, mimetype="image/jpeg")
        r.headers["Cache-Control"] = "max-age=3600"
        return r

    @app.get("/")
    def index() -> Response:
        return app.send_static_file("index.html")

    @app.get("/api/info")
    def info() -> Response:
        return jsonify({
            "dataset": s["dataset"], "n_db": service.n_db,
            "settings": {k: s[k] for k in ("masking", "augmentation", "kernel", "rerank",
                                           "top", "query_expansion", "network", "n_centers")},
            "limits": {"max_upload_bytes": app.config["MAX_CONTENT_LENGTH"],
                       "max_pixels": service.max_pixels, "max_top": MAX_TOP},
            "default_top": default_top})

    @app.post("/api/search")
    def search() -> Response:
        f = request.files.get("image")
        if f is None:
            raise UserError("no photo in the request (multipart field 'image')")
        name = secure_filename(f.filename or "") or "upload"
        data = f.read()
        box = parse_box(request.form.get("box"))
        top = _top_arg(request.form.get("top"), default_top)
        return jsonify(service.search_bytes(data, name, box, top).to_json())

    @app.get("/api/queries")
    def queries() -> Response:
        gt = service.ground_truth()
        return jsonify({"queries": [
            {"index": i, "name": q.name, "image": q.image,
             "box": None if q.bbox is None else list(q.bbox),
             "n_positives": len(q.positives), "n_junk": len(q.junk)}
            for i, q in enumerate(gt.queries)]})

    @app.get("/api/queries/<int:i>")
    def dataset_query(i: int) -> Response:
        top = _top_arg(request.args.get("top"), default_top)
        return jsonify(service.search_dataset_query(i, top).to_json())

    @app.get("/thumb/<path:image_id>")
    def db_thumb(image_id: str) -> Response:
        if not service.has_image(image_id):
            return _error(404, f"image '{image_id}' is not in this run's index")
        return jpeg(thumb("db", image_id, _size_arg(256)))

    @app.get("/query_image/<int:i>")
    def query_thumb(i: int) -> Response:
        service.query_image(i)  # range check
        return jpeg(thumb("query", str(i), _size_arg(512)))

    @app.get("/query_image/<int:i>/file")
    def query_file(i: int) -> Response:
        return send_file(service.query_image(i)[1], max_age=3600)

    _install_error_handlers(app)
    return app


def _error(status: int, message: str) -> Response:
    r = jsonify({"error": message})
    r.status_code = status
    return r


def _install_error_handlers(app: Flask) -> None:
    """Every failure is one JSON line with a status; nothing leaks a stack trace."""
    handlers: dict[Any, Callable[[Any], Response]] = {}

    def user_error(e: UserError) -> Response:
        return _error(400, str(e).splitlines()[0] if str(e) else type(e).__name__)

    def too_large(e: RequestEntityTooLarge) -> Response:
        mb = (app.config["MAX_CONTENT_LENGTH"] or 0) / (1 << 20)
        return _error(413, f"upload too large: the limit is {mb:g} MB")

    def http_error(e: HTTPException) -> Response:
        return _error(e.code or 500, f"{e.name}: {e.description}")

    def internal(e: Exception) -> Response:
        log.exception("request %s %s failed", request.method, request.path)
        return _error(500, f"internal error ({type(e).__name__}); see the server's log")

    handlers[UserError] = user_error
    handlers[RequestEntityTooLarge] = too_large
    handlers[HTTPException] = http_error
    handlers[Exception] = internal
    for exc, fn in handlers.items():
        app.register_error_handler(exc, fn)
