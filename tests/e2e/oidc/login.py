#!/usr/bin/env python3
"""Browser-less driver for an OpenID Connect authorization-code login.

Acts like a browser: starts at the relying party's login URL, follows every
redirect by hand (one cookie jar for all hosts), fills in the provider's login
form, and stops at the relying party's callback, reporting what the callback
answered as one JSON object on stdout.  Standard library only.

    python3 login.py --start URL --ca CA.pem [--ca2 CA2.pem] --user NAME \
        --password PW [--replay] [--no-follow-final]

Exit 0 when the flow reached the callback (whatever the callback answered),
2 when it could not (message on stderr).  Neither cookie values nor the
password are ever printed.
"""

import argparse
import http.cookiejar
import json
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser

MAX_HOPS = 25
BODY_CHARS = 500
TIMEOUT = 30
REDIRECTS = (301, 302, 303, 307, 308)


class Fail(Exception):
    """The flow could not reach the callback."""


class _NoRaise(urllib.request.HTTPErrorProcessor):
    """Hand every response back as is: no redirect following, no HTTPError."""

    def http_response(self, request, response):
        return response

    https_response = http_response


class _Forms(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.forms = []
        self._current = None

    def handle_starttag(self, tag, attrs):
        a = {k.lower(): (v if v is not None else "") for k, v in attrs}
        if tag == "form":
            self._current = {
                "action": a.get("action", ""),
                "method": (a.get("method") or "get").lower(),
                "inputs": [],
            }
            self.forms.append(self._current)
        elif tag in ("input", "button") and self._current is not None:
            name = a.get("name")
            if name:
                kind = a.get("type", "text" if tag == "input" else "submit").lower()
                self._current["inputs"].append((name, kind, a.get("value", "")))

    def handle_endtag(self, tag):
        if tag == "form":
            self._current = None


def parse_forms(html):
    p = _Forms()
    try:
        p.feed(html)
        p.close()
    except Exception:  # malformed HTML: keep what was parsed
        pass
    return p.forms


def origin(url):
    u = urllib.parse.urlsplit(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    return (u.scheme, (u.hostname or "").lower(), port)


def strip_query(url):
    u = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((u.scheme, u.netloc, u.path, "", ""))


class Browser:
    def __init__(self, cafiles):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        for ca in cafiles:
            ctx.load_verify_locations(cafile=ca)
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=ctx),
            urllib.request.HTTPCookieProcessor(self.jar),
            _NoRaise(),
        )
        # _NoRaise replaces the default HTTPErrorProcessor, so the default
        # redirect handler is never consulted: every hop is ours to follow.
        self.hops = []

    def request(self, method, url, form=None):
        data = None
        headers = {
            "User-Agent": "clawos-e2e-login/1 (urllib)",
            "Accept": "text/html,application/json;q=0.9,*/*;q=0.8",
        }
        if form is not None:
            data = urllib.parse.urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            resp = self.opener.open(req, timeout=TIMEOUT)
        except urllib.error.HTTPError as e:  # should not happen, but be safe
            resp = e
        except (urllib.error.URLError, OSError) as e:
            raise Fail(f"{method} {strip_query(url)} failed: {e}") from None
        with resp:
            raw = resp.read()
            status = resp.status if hasattr(resp, "status") else resp.code
            hdrs = resp.headers
        charset = hdrs.get_content_charset() or "utf-8"
        body = raw.decode(charset, errors="replace")
        self.hops.append({"method": method, "url": strip_query(url), "status": status})
        return status, hdrs, body


def set_cookie_names(headers):
    names = []
    for line in headers.get_all("Set-Cookie") or []:
        name = line.split(";", 1)[0].split("=", 1)[0].strip()
        if name and name not in names:
            names.append(name)
    return names


def login_flow(args):
    b = Browser([c for c in (args.ca, args.ca2) if c])
    start_origin = origin(args.start)

    def is_callback(url):
        return origin(url) == start_origin and urllib.parse.urlsplit(url).path.endswith("/callback")

    method, url, form = "GET", args.start, None
    posted_login = False
    for _ in range(MAX_HOPS):
        if is_callback(url):
            break
        status, headers, body = b.request(method, url, form)
        if status in REDIRECTS:
            loc = headers.get("Location")
            if not loc:
                raise Fail(f"{status} from {strip_query(url)} without Location")
            nxt = urllib.parse.urljoin(url, loc)
            if status in (307, 308):
                url = nxt  # keep method and body
            else:
                method, url, form = "GET", nxt, None
            continue
        forms = parse_forms(body) if "html" in (headers.get_content_type() or "") else []
        login_form = next((f for f in forms if any(k == "password" for _, k, _ in f["inputs"])), None)
        if login_form is not None:
            if posted_login:
                raise Fail(
                    f"the provider rejected the login for user {args.user!r} "
                    f"(HTTP {status}, login form shown again): wrong user name or password?"
                )
            fields = {}
            for name, kind, value in login_form["inputs"]:
                if kind in ("hidden", "text", "email") and name not in ("login", "password"):
                    fields[name] = value
            fields["login"] = args.user
            fields["password"] = args.password
            method = "POST" if login_form["method"] == "post" else "GET"
            action = urllib.parse.urljoin(url, login_form["action"] or url)
            if method == "GET":
                sep = "&" if urllib.parse.urlsplit(action).query else "?"
                url, form = action + sep + urllib.parse.urlencode(fields), None
            else:
                url, form = action, fields
            posted_login = True
            continue
        # response_mode=form_post: an auto-submitting form aimed at the callback.
        cb_form = next(
            (f for f in forms if is_callback(urllib.parse.urljoin(url, f["action"] or url))),
            None,
        )
        if cb_form is not None and status == 200:
            fields = {n: v for n, k, v in cb_form["inputs"] if k == "hidden"}
            method = "POST" if cb_form["method"] == "post" else "GET"
            action = urllib.parse.urljoin(url, cb_form["action"] or url)
            if method == "POST":
                url, form = action, fields
            else:
                url, form = action + "?" + urllib.parse.urlencode(fields), None
            break
        snippet = " ".join(body.split())[:300]
        raise Fail(
            f"stuck at {strip_query(url)}: HTTP {status}, neither a redirect, a login form "
            f"nor the callback; body starts: {snippet!r}"
        )
    else:
        raise Fail(f"gave up after {MAX_HOPS} hops without reaching the callback")

    if not is_callback(url):
        raise Fail("did not reach the callback")

    callback_url, callback_method, callback_form = url, method, form
    status, headers, body = b.request(callback_method, callback_url, callback_form)
    result = {
        "callback_url": callback_url,
        "callback_status": status,
        "callback_location": headers.get("Location"),
        "cookies_set": set_cookie_names(headers),
        "body": body[:BODY_CHARS],
        "replay_status": None,
        "replay_body": None,
        "final_url": None,
        "final_status": None,
    }

    loc = headers.get("Location")
    if not args.no_follow_final and status in REDIRECTS and loc:
        final = urllib.parse.urljoin(callback_url, loc)
        fstatus, _, _ = b.request("GET", final)
        result["final_url"] = strip_query(final)
        result["final_status"] = fstatus

    if args.then:
        # A request with whatever session the login left in the jar (e.g. whoami).
        then = urllib.parse.urljoin(callback_url, args.then)
        tstatus, _, tbody = b.request("GET", then)
        result["then_status"] = tstatus
        result["then_body"] = tbody[:BODY_CHARS]

    if args.replay:
        rstatus, _, rbody = b.request(callback_method, callback_url, callback_form)
        result["replay_status"] = rstatus
        result["replay_body"] = rbody[:BODY_CHARS]

    result["hops"] = b.hops
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--start", required=True, help="relying party login URL")
    ap.add_argument("--ca", required=True, help="CA file to trust")
    ap.add_argument("--ca2", help="second CA file to trust")
    ap.add_argument("--user", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--replay", action="store_true",
                    help="send the same callback request a second time")
    ap.add_argument("--no-follow-final", action="store_true",
                    help="do not follow the callback's own redirect")
    ap.add_argument("--then", metavar="PATH",
                    help="after the callback, GET this path on the relying party and record "
                         "then_status/then_body (e.g. /api/v1/whoami)")
    args = ap.parse_args()
    try:
        result = login_flow(args)
    except Fail as e:
        print(f"login.py: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
