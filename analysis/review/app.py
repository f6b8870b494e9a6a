"""The review on HTTP: a Flask application (pages, the JSON API they use, sign-in).

Routes (every one but ``/login`` and the login page's stylesheet needs a signed-in reader: pages
redirect to ``/login``, the rest answer 401):

* ``GET /``: the worklist; ``GET /studies/<uid>``: a study's page;
* ``GET /api/studies``, ``GET /api/studies/<uid>``: the same as JSON;
* ``POST /api/studies/<uid>/lesions/<id>`` ``{"decision": "accept"|"reject", "reason", "note"}``;
* ``POST /api/studies/<uid>/lesions`` ``{"point_mm": [x, y, z]}``: a missed lesion (201);
* ``POST /api/studies/<uid>/sign``;
* ``GET /api/studies/<uid>/lesions/<id>/<axial|coronal|sagittal>.png``, ``GET /api/studies/<uid>/slices/<k>.png``;
* ``GET|POST /login`` (fields ``user``, ``password``), ``POST /logout``.

Errors of the API are JSON ``{"error": "one line"}`` with their status: 401 (no session), 403
(no or a wrong CSRF token, or a cross-site origin), 404 (unknown study or lesion; a path that is
not a UID), 409 (signed already, undecided lesions, a click on a lesion there), 422 (a malformed
body), 429 (sign-in slowed down). A state-changing request needs the session's CSRF token in the
``X-CSRF-Token`` header (or a ``csrf_token`` form field). Responses forbid framing and caching of
patient data and allow scripts, styles and images from the server only (Content-Security-Policy).
"""
from __future__ import annotations

import hmac
import logging
from typing import Any, Callable
from urllib.parse import urlsplit

from flask import Flask, Response, g, jsonify, redirect, render_template, request, url_for

from analysis.review.auth import LoginThrottle, Sessions, check_password
from analysis.review.journal import REASONS
from analysis.review.service import ReviewError, ReviewService

log = logging.getLogger(__name__)

__all__ = ["create_app", "COOKIE"]

COOKIE = "bonemets_review"
_PUBLIC = {"login", "login_post", "login_style"}
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # "no-referrer" would make a browser send "Origin: null"
}


def _error(status: int, message: str) -> Response:
    response = jsonify({"error": message})
    response.status_code = status
    return response


def _wants_json() -> bool:
    return request.path.startswith("/api/")


def create_app(service: ReviewService, users: Callable[[], dict[str, str]] | dict[str, str], *,
               sessions: Sessions | None = None,
               throttle: LoginThrottle | None = None, secure_cookies: bool = False) -> Flask:
    """The application.

    Args:
        service: the review.
        users: ``{name: password hash}`` (:func:`analysis.review.auth.read_users`), or a callable
            giving it (:class:`analysis.review.auth.UsersFile`: a removed reader's sessions end).
        sessions, throttle: the session store and the sign-in slow-down (new ones by default).
        secure_cookies: mark the session cookie ``Secure`` (behind a TLS proxy).
    """
    app = Flask(__name__, static_folder="static", template_folder="templates")
    app.config.update(MAX_CONTENT_LENGTH=64 * 1024)
    app.json.sort_keys = False
    sessions = sessions or Sessions()
    throttle = throttle or LoginThrottle()
    readers = users if callable(users) else (lambda: users)

    @app.before_request
    def _guard():
        g.session = sessions.get(request.cookies.get(COOKIE))
        if g.session is not None and g.session.user not in readers():  # removed from the users file
            sessions.end(request.cookies.get(COOKIE))
            g.session = None
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            origin = request.headers.get("Origin")  # browsers send it on every cross-site POST
            if origin and urlsplit(origin).netloc != request.host:
                return _error(403, f"cross-site request from {origin} refused")
        if request.endpoint in _PUBLIC:
            return None
        if g.session is None:
            if _wants_json() or request.method != "GET":
                return _error(401, "sign in first")
            return redirect(url_for("login", next=request.full_path.rstrip("?")))
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            token = request.headers.get("X-CSRF-Token") or request.form.get("csrf_token") or ""
            if not hmac.compare_digest(token, g.session.csrf):
                return _error(403, "CSRF token missing or wrong")
        g.reader = g.session.user
        return None

    @app.after_request
    def _headers(response: Response) -> Response:
        for key, value in _HEADERS.items():
            response.headers.setdefault(key, value)
        if response.mimetype == "image/png":
            response.headers["Cache-Control"] = "private, max-age=600"
        else:
            response.headers["Cache-Control"] = "no-store"
        return response

    @app.errorhandler(ReviewError)
    def _review_error(exc: ReviewError):
        if _wants_json():
            return _error(exc.status, str(exc))
        return render_template("error.html", status=exc.status, message=str(exc)), exc.status

    @app.errorhandler(404)
    def _not_found(exc):
        if _wants_json():
            return _error(404, "not found")
        return render_template("error.html", status=404, message="not found"), 404

    @app.errorhandler(405)
    def _method(exc):
        return _error(405, f"{request.method} is not allowed here")

    @app.errorhandler(413)
    def _too_large(exc):
        return _error(413, "request body too large")

    @app.errorhandler(500)
    def _internal(exc):
        log.error("%s %s failed: %s", request.method, request.path, getattr(exc, "original_exception", exc))
        if _wants_json():
            return _error(500, "internal error; the server's log says why")
        return render_template("error.html", status=500, message="internal error"), 500

    # --- sign-in ----------------------------------------------------------------------------

    def _next_page() -> str:
        """Where to go after signing in: a path of this server only (never ``//host`` or ``/\\host``)."""
        target = request.values.get("next") or "/"
        safe = target.startswith("/") and not target.startswith("//") and "\\" not in target
        return target if safe else "/"

    @app.get("/login")
    def login():
        if g.session is not None:
            return redirect(_next_page())
        return render_template("login.html", message=None, next=_next_page(), user="")

    @app.get("/login.css")
    def login_style():
        return app.send_static_file("style.css")

    @app.post("/login")
    def login_post():
        name = (request.form.get("user") or "").strip()
        password = request.form.get("password") or ""
        keys = (f"user:{name.lower()}", f"addr:{request.remote_addr}")
        wait = throttle.wait(*keys)
        if wait > 0:
            response = Response(render_template("login.html", message=f"Too many failed sign-ins: wait {wait:.0f} s.",
                                                next=_next_page(), user=name), status=429)
            response.headers["Retry-After"] = str(max(1, round(wait)))
            return response
        if not check_password(readers(), name, password):
            throttle.failed(*keys)
            log.warning("failed sign-in for %r from %s", name[:64], request.remote_addr)
            return render_template("login.html", message="Wrong user name or password.", next=_next_page(),
                                   user=name), 401
        throttle.succeeded(keys[0])
        token = sessions.start(name)
        log.info("%s signed in from %s", name, request.remote_addr)
        response = redirect(_next_page())
        response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", secure=secure_cookies, path="/")
        return response

    @app.post("/logout")
    def logout():
        sessions.end(request.cookies.get(COOKIE))
        response = redirect(url_for("login"))
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="Strict", secure=secure_cookies)
        return response

    # --- pages ----------------------------------------------------------------------------

    def _page(template: str, **context: Any) -> str:
        return render_template(template, reader=g.reader, csrf=g.session.csrf, reasons=REASONS, **context)

    @app.get("/")
    def worklist():
        return _page("worklist.html", studies=service.worklist())

    @app.get("/studies/<uid>")
    def study_page(uid: str):
        study = service.study(uid, with_slices=False)
        return _page("study.html", study=study)

    # --- API ------------------------------------------------------------------------------

    @app.get("/api/studies")
    def api_studies():
        return jsonify({"studies": service.worklist()})

    @app.get("/api/studies/<uid>")
    def api_study(uid: str):
        return jsonify(service.study(uid))

    def _body() -> Any:
        return request.get_json(silent=True, force=True)

    @app.post("/api/studies/<uid>/lesions/<int:lesion_id>")
    def api_decide(uid: str, lesion_id: int):
        return jsonify(service.decide(uid, lesion_id, _body(), g.reader))

    @app.post("/api/studies/<uid>/lesions")
    def api_add(uid: str):
        return jsonify(service.add(uid, _body(), g.reader)), 201

    @app.post("/api/studies/<uid>/sign")
    def api_sign(uid: str):
        return jsonify(service.sign(uid, g.reader))

    @app.get("/api/studies/<uid>/lesions/<int:lesion_id>/<view>.png")
    def api_lesion_picture(uid: str, lesion_id: int, view: str):
        return Response(service.lesion_picture(uid, lesion_id, view), mimetype="image/png")

    @app.get("/api/studies/<uid>/slices/<int:k>.png")
    def api_slice(uid: str, k: int):
        return Response(service.slice_picture(uid, k), mimetype="image/png")

    return app
