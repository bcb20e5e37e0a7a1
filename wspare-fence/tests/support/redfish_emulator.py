"""sushy-tools' Redfish emulator (libvirt driver), with two test additions.

Runs the real sushy-tools 2.2.0 Flask application (the same one
`sushy-emulator` runs) over TLS, against qemu:///system, and adds:

1. A Redfish SessionService (sushy-tools 2.2.0 has none): POST
   /redfish/v1/SessionService/Sessions with {"UserName", "Password"} checked
   against the emulator's own htpasswd file answers 201 with X-Auth-Token and
   Location; requests with a valid X-Auth-Token skip basic auth; DELETE of
   the Location ends the session; GET of the collection (basic auth) lists
   the live sessions. The service root gets Links.Sessions.
2. With WSPARE_REDFISH_STUCK_OFF=1, ComputerSystem.Reset with ForceOff or
   GracefulShutdown answers 204 and does nothing, so PowerState keeps
   reading "On" from libvirt: the "accepts off, still reports on" fault.

    redfish_emulator.py CONFIG PORT CERT KEY

Prints "listening on https://127.0.0.1:PORT" when the socket is bound.
"""

import json
import os
import secrets
import ssl
import sys

import flask
from werkzeug.serving import make_server

from sushy_tools.emulator import auth_basic
from sushy_tools.emulator import main as sushy
from sushy_tools import error as sushy_error

SESSIONS_PATH = "/redfish/v1/SessionService/Sessions"
STUCK_OFF = os.environ.get("WSPARE_REDFISH_STUCK_OFF") == "1"


class SessionAuth:
    """WSGI middleware in front of sushy's basic-auth middleware."""

    def __init__(self, app, inner, auth_file):
        self.app = app          # the bare Flask wsgi app (no auth)
        self.inner = inner      # sushy's RedfishAuthMiddleware
        self.auth_file = auth_file
        self.tokens = {}        # token -> session id

    def _json(self, start_response, status, body, headers=()):
        data = json.dumps(body).encode()
        start_response(status, [("Content-Type", "application/json"),
                                ("Content-Length", str(len(data)))] + list(headers))
        return [data]

    def _error(self, start_response, status, message):
        return self._json(start_response, status, {"error": {
            "code": "Base.1.0.GeneralError", "message": message}})

    def __call__(self, env, start_response):
        path = env.get("PATH_INFO", "").rstrip("/")
        method = env.get("REQUEST_METHOD")
        if path == SESSIONS_PATH and method == "POST":
            try:
                size = int(env.get("CONTENT_LENGTH") or 0)
                body = json.loads(env["wsgi.input"].read(size) or b"{}")
                auth_basic.authenticate(self.auth_file, body.get("UserName", ""),
                                        body.get("Password", "").encode())
            except (ValueError, sushy_error.FishyError):
                return self._error(start_response, "401 UNAUTHORIZED",
                                   "Invalid username or password")
            token = secrets.token_hex(16)
            sid = secrets.token_hex(4)
            self.tokens[token] = sid
            return self._json(start_response, "201 CREATED", {
                "@odata.id": f"{SESSIONS_PATH}/{sid}", "Id": sid,
                "UserName": body.get("UserName")},
                [("X-Auth-Token", token), ("Location", f"{SESSIONS_PATH}/{sid}")])
        if path == SESSIONS_PATH and method == "GET" and "HTTP_X_AUTH_TOKEN" not in env:
            # Basic auth: lets a test check that fencers log out.
            try:
                user, password = auth_basic.parse_token(auth_basic.parse_header(env))
                auth_basic.authenticate(self.auth_file, user, password)
            except sushy_error.FishyError:
                return self._error(start_response, "401 UNAUTHORIZED", "Authorization required")
            members = [{"@odata.id": f"{SESSIONS_PATH}/{sid}"} for sid in self.tokens.values()]
            return self._json(start_response, "200 OK", {
                "@odata.id": SESSIONS_PATH, "Members": members,
                "Members@odata.count": len(members)})
        token = env.get("HTTP_X_AUTH_TOKEN")
        if token is not None:
            sid = self.tokens.get(token)
            if sid is None:
                return self._error(start_response, "401 UNAUTHORIZED", "Invalid session token")
            if path == f"{SESSIONS_PATH}/{sid}" and method == "DELETE":
                del self.tokens[token]
                start_response("204 NO CONTENT", [("Content-Length", "0")])
                return [b""]
            return self.app(env, start_response)
        return self.inner(env, start_response)


def patch_root(response):
    if flask.request.path.rstrip("/") == "/redfish/v1" and response.is_json:
        body = response.get_json()
        body.setdefault("SessionService", {"@odata.id": "/redfish/v1/SessionService"})
        body.setdefault("Links", {})["Sessions"] = {"@odata.id": SESSIONS_PATH}
        response.set_data(json.dumps(body, indent=4))
    return response


def stuck_reset(identity):
    reset_type = flask.request.json.get("ResetType")
    if reset_type in ("ForceOff", "GracefulShutdown"):
        sushy.app.logger.info("stuck: accepted %s for %s, doing nothing", reset_type, identity)
        return "", 204
    return original_reset(identity)


original_reset = None


def main():
    global original_reset
    config, port, cert, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    app = sushy.app
    app.configure(config_file=config)
    inner = app.wsgi_app
    bare = inner.app if isinstance(inner, sushy.RedfishAuthMiddleware) else inner
    app.wsgi_app = SessionAuth(bare, inner, app.config["SUSHY_EMULATOR_AUTH_FILE"])
    app.after_request(patch_root)
    if STUCK_OFF:
        endpoint = "system_reset_action"
        original_reset = app.view_functions[endpoint]
        app.view_functions[endpoint] = stuck_reset
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server = make_server("127.0.0.1", port, app, threaded=True, ssl_context=ctx)
    print(f"listening on https://127.0.0.1:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
