#!/usr/bin/env python3
"""Browser stand-in for the SAML login (stdlib only).

    login.py --start https://127.0.0.1:CP/api/v1/login/saml --ca CP.pem \
             --ca2 IDP_CA.pem --user NAME --password PW [--replay] \
             [--then /api/v1/whoami] [--cross-site] [--replay-jar same|fresh]

GET start -> redirects (followed by hand, one cookie jar) -> IdP login form ->
POST credentials -> IdP's auto-submit form -> POST SAMLResponse/RelayState to
the ACS with `Origin: <IdP origin>`. The ACS answer is recorded, not followed.

Prints ONE JSON object on stdout. Exit 0 when the ACS was reached (whatever it
answered), 2 otherwise (reason on stderr).
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

MAX_HOPS = 10
BODY_CHARS = 500


class Fail(Exception):
    pass


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # 3xx surfaces as HTTPError; we follow by hand


class FormParser(HTMLParser):
    """Collects every <form> with its action, method and <input> fields."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.forms = []
        self._cur = None

    def handle_starttag(self, tag, attrs):
        a = {k.lower(): (v if v is not None else "") for k, v in attrs}
        if tag == "form":
            self._cur = {
                "action": a.get("action", ""),
                "method": a.get("method", "get").lower(),
                "inputs": [],
            }
            self.forms.append(self._cur)
        elif tag == "input" and self._cur is not None:
            self._cur["inputs"].append(
                (a.get("name", ""), a.get("type", "text").lower(), a.get("value", ""))
            )

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag):
        if tag == "form":
            self._cur = None


def parse_forms(text):
    p = FormParser()
    p.feed(text)
    p.close()
    return p.forms


def origin_of(url):
    u = urllib.parse.urlsplit(url)
    return "%s://%s" % (u.scheme, u.netloc)


def samesite_of(cookie):
    for k, v in getattr(cookie, "_rest", {}).items():
        if k.lower() == "samesite":
            return (v or "").lower()
    return None


class Browser:
    def __init__(self, ctx):
        self.jar = http.cookiejar.CookieJar()
        self.ctx = ctx
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=ctx),
            urllib.request.HTTPCookieProcessor(self.jar),
            NoRedirect(),
        )

    def request(self, method, url, data=None, headers=None, jar_filter=None):
        """Returns (status, headers, body_text, cookie_names_sent)."""
        body = None
        h = {"User-Agent": "clawos-e2e-login/1", "Accept": "text/html,*/*"}
        if data is not None:
            body = urllib.parse.urlencode(data).encode("ascii")
            h["Content-Type"] = "application/x-www-form-urlencoded"
        h.update(headers or {})
        req = urllib.request.Request(url, data=body, headers=h, method=method)
        withheld = []
        if jar_filter is not None:
            # Temporarily remove cookies a browser would not send.
            for c in list(self.jar):
                if not jar_filter(c):
                    withheld.append(c)
                    self.jar.clear(c.domain, c.path, c.name)
        try:
            try:
                resp = self.opener.open(req, timeout=30)
            except urllib.error.HTTPError as e:
                resp = e
            status = resp.status if hasattr(resp, "status") else resp.code
            raw = resp.read()
            hdrs = resp.headers
        except (urllib.error.URLError, OSError) as e:
            raise Fail("%s %s: %s" % (method, url, e))
        finally:
            for c in withheld:
                self.jar.set_cookie(c)
        sent = req.get_header("Cookie") or req.unredirected_hdrs.get("Cookie") or ""
        names = [p.split("=", 1)[0].strip() for p in sent.split(";") if p.strip()]
        return status, hdrs, raw.decode("utf-8", "replace"), names


def set_cookie_names(hdrs):
    names = []
    for v in hdrs.get_all("Set-Cookie") or []:
        name = v.split(";", 1)[0].split("=", 1)[0].strip()
        if name:
            names.append(name)
    return names


def run(args, out):
    ctx = ssl.create_default_context(cafile=args.ca)
    if args.ca2:
        ctx.load_verify_locations(cafile=args.ca2)
    b = Browser(ctx)

    # 1. start, then follow redirects by hand until a page is served.
    url = args.start
    status, hdrs, text = None, None, ""
    for hop in range(MAX_HOPS + 1):
        status, hdrs, text, _ = b.request("GET", url)
        out.setdefault("redirects", []).append({"url": url.split("?", 1)[0], "status": status})
        if status in (301, 302, 303, 307, 308):
            loc = hdrs.get("Location")
            if not loc:
                raise Fail("%s answered %d without Location" % (url, status))
            url = urllib.parse.urljoin(url, loc)
            continue
        break
    else:
        raise Fail("too many redirects")
    if status != 200:
        raise Fail("expected the IdP login form at %s, got HTTP %d: %s"
                   % (url.split("?", 1)[0], status, text[:200]))
    idp_page_url = url
    idp_origin = origin_of(idp_page_url)
    out["idp_origin"] = idp_origin

    # 2. the login form.
    forms = [f for f in parse_forms(text) if any(t == "password" for _, t, _ in f["inputs"])]
    if not forms:
        raise Fail("no login form (with a password field) at %s" % idp_page_url.split("?", 1)[0])
    form = forms[0]
    fields = {}
    for name, typ, value in form["inputs"]:
        if name and typ not in ("submit", "button", "image"):
            fields[name] = value
    fields["username"] = args.user
    fields["password"] = args.password
    action = urllib.parse.urljoin(idp_page_url, form["action"] or idp_page_url)
    status, hdrs, text, _ = b.request("POST", action, data=fields, headers={"Origin": idp_origin})
    out["login_status"] = status
    if status != 200:
        raise Fail("IdP refused the login: HTTP %d" % status)

    # 3. the IdP's auto-submit form.
    posts = [f for f in parse_forms(text)
             if any(n == "SAMLResponse" for n, _, _ in f["inputs"])]
    if not posts:
        raise Fail("IdP answer has no SAMLResponse form")
    pf = posts[0]
    acs = urllib.parse.urljoin(action, pf["action"])
    saml_fields = {}
    for name, _, value in pf["inputs"]:
        if name in ("SAMLResponse", "RelayState"):
            saml_fields[name] = value
    out["acs_url"] = acs
    out["relay_state_present"] = "RelayState" in saml_fields

    jar_filter = None
    if args.cross_site:
        # A browser withholds SameSite=Lax/Strict cookies on a cross-site POST.
        def jar_filter(c):
            return samesite_of(c) not in ("lax", "strict")

    # 4. POST to the ACS, as the browser would, from the IdP's origin.
    try:
        status, hdrs, text, sent = b.request(
            "POST", acs, data=saml_fields, headers={"Origin": idp_origin}, jar_filter=jar_filter
        )
    except Fail as e:
        raise Fail("ACS not reached: %s" % e)
    out["acs_status"] = status
    out["acs_location"] = hdrs.get("Location")
    out["cookies_set"] = set_cookie_names(hdrs)
    out["acs_cookies_sent"] = sent
    out["body"] = text[:BODY_CHARS]
    out["_acs_reached"] = True

    # 5. --then: a control-plane path with the same jar (no redirect following).
    if args.then:
        then_url = urllib.parse.urljoin(args.start, args.then)
        try:
            status, hdrs, text, _ = b.request("GET", then_url, headers={"Accept": "application/json"})
            out["then_status"] = status
            out["then_body"] = text[:BODY_CHARS]
        except Fail as e:
            out["then_status"] = None
            out["then_body"] = "error: %s" % e

    # 6. --replay: the exact same SAMLResponse/RelayState once more.
    if args.replay:
        rb = b if args.replay_jar == "same" else Browser(ctx)
        try:
            status, hdrs, text, _ = rb.request(
                "POST", acs, data=saml_fields, headers={"Origin": idp_origin}, jar_filter=jar_filter
            )
            out["replay_status"] = status
            out["replay_location"] = hdrs.get("Location")
            out["replay_cookies_set"] = set_cookie_names(hdrs)
            out["replay_body"] = text[:BODY_CHARS]
        except Fail as e:
            out["replay_status"] = None
            out["replay_body"] = "error: %s" % e


def main():
    p = argparse.ArgumentParser(description="browser stand-in for the SAML login")
    p.add_argument("--start", required=True, help="control plane SAML login URL")
    p.add_argument("--ca", required=True, help="CA/cert (PEM) trusted for the control plane")
    p.add_argument("--ca2", help="CA/cert (PEM) trusted for the IdP")
    p.add_argument("--user", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--replay", action="store_true", help="POST the same SAMLResponse again")
    p.add_argument("--replay-jar", choices=("same", "fresh"), default="same",
                   help="cookie jar for --replay (default: the same one)")
    p.add_argument("--then", help="control plane path to GET after the ACS")
    p.add_argument("--cross-site", action="store_true",
                   help="withhold SameSite=Lax/Strict cookies on the ACS POST, as a "
                        "browser does when the IdP is another site")
    args = p.parse_args()

    out = {
        "acs_status": None,
        "acs_location": None,
        "cookies_set": [],
        "body": "",
        "then_status": None,
        "then_body": "",
        "replay_status": None,
        "replay_body": "",
    }
    code = 0
    try:
        run(args, out)
    except Fail as e:
        sys.stderr.write("login.py: %s\n" % e)
        out["error"] = str(e)
    except ssl.SSLError as e:
        sys.stderr.write("login.py: TLS: %s\n" % e)
        out["error"] = "TLS: %s" % e
    if not out.pop("_acs_reached", False):
        code = 2
    sys.stdout.write(json.dumps(out) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
