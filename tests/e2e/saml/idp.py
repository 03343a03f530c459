#!/usr/bin/python3
"""A real SAML 2.0 Identity Provider for the control plane's end-to-end tests.

Built on pysaml2 (Debian's python3-pysaml2, run with /usr/bin/python3): it
parses the SP's AuthnRequest, builds the Response with
saml2.server.Server.create_authn_response and signs through pysaml2's xmlsec1
backend. Only the attack modes touch the XML afterwards (see README.md).

    idp.py --port P --base https://127.0.0.1:P --cert CERT.pem --key KEY.pem \
           --sign-cert SIGN.crt --sign-key SIGN.key --sp-metadata SP.xml \
           --users USERS.json --admin-port A --metadata-out IDP.xml

Endpoints (HTTPS, 127.0.0.1:P):
    GET  /idp/metadata       this IdP's metadata (also written to --metadata-out)
    GET  /idp/sso/redirect   HTTP-Redirect binding AuthnRequest -> login form
    POST /idp/login          username/password/key -> auto-submit form to the ACS
Admin (plain HTTP, 127.0.0.1:A):
    GET  /mode               {"mode": "..."}
    POST /mode               {"mode": "..."}  (400 on an unknown mode)
    GET  /issued             every response issued so far (the JSON log lines)

stdout: one JSON line per event; `saml-idp listening <base>` once ready.
"""

import argparse
import base64
import copy
import datetime
import html
import json
import os
import secrets
import shutil
import signal
import ssl
import sys
import tempfile
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from lxml import etree

from saml2 import BINDING_HTTP_POST, BINDING_HTTP_REDIRECT, class_name, saml, xmldsig
from saml2.authn_context import PASSWORDPROTECTEDTRANSPORT
from saml2.config import IdPConfig
from saml2.metadata import create_metadata_string
from saml2.s_utils import do_ava
from saml2.saml import NAMEID_FORMAT_PERSISTENT, NAMEID_FORMAT_UNSPECIFIED
from saml2.server import Server
from saml2.sigver import pre_signature_part, signed_instance_factory
from saml2.time_util import instant

NS_SAMLP = "urn:oasis:names:tc:SAML:2.0:protocol"
NS_SAML = "urn:oasis:names:tc:SAML:2.0:assertion"
NS_DS = "http://www.w3.org/2000/09/xmldsig#"
NS = {"samlp": NS_SAMLP, "saml": NS_SAML, "ds": NS_DS}
ATTR_NAME_FORMAT = "urn:oasis:names:tc:SAML:2.0:attrname-format:basic"

FOREIGN_AUDIENCE = "https://someone-else.example/sp"
FOREIGN_RECIPIENT = "https://attacker.example/saml/acs"
XSW_USER = "mallory-admin"
XSW_GROUPS = ["clawos-admins"]

# mode -> (sign assertion, sign response, key: "idp" | "wrong" | None)
MODES = {
    "none": (True, False, "idp"),  # normal: assertion signed, response not
    "both": (True, True, "idp"),  # normal, response signed too
    "response-only": (False, True, "idp"),  # normal, only the response signed
    "unsigned": (False, False, None),
    "audience": (True, False, "idp"),
    "expired": (True, False, "idp"),  # Conditions + SubjectConfirmationData
    "expired-conditions": (True, False, "idp"),  # Conditions only
    "expired-subject": (True, False, "idp"),  # SubjectConfirmationData only
    "notyet": (True, False, "idp"),  # Conditions NotBefore 10 min ahead
    "recipient": (True, False, "idp"),  # SCD Recipient + Response Destination
    "recipient-only": (True, False, "idp"),  # SCD Recipient only
    "destination-only": (True, False, "idp"),  # Response Destination only
    "inresponseto": (True, False, "idp"),  # Response + SCD InResponseTo
    "inresponseto-assertion": (True, False, "idp"),  # SCD InResponseTo only
    "xsw": (True, False, "idp"),  # forged assertion first, signed one after it
    "xsw-extensions": (True, False, "idp"),  # forged only; signed one in Extensions
    "wrongkey": (True, False, "wrong"),
}


def log(event, **fields):
    fields = {"event": event, **fields}
    sys.stdout.write(json.dumps(fields, sort_keys=True) + "\n")
    sys.stdout.flush()
    return fields


def utc_str(dt):
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def make_wrong_keypair(like_cert_path, directory):
    """A fresh RSA key and a self-signed certificate carrying the SAME subject
    and issuer name as the real signing certificate, so only the key differs."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    with open(like_cert_path, "rb") as f:
        real = x509.load_pem_x509_certificate(f.read())
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(real.subject)
        .issuer_name(real.issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    key_path = os.path.join(directory, "wrong-sign.key")
    cert_path = os.path.join(directory, "wrong-sign.crt")
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def idp_config(base, sign_cert, sign_key, sp_metadata, xmlsec):
    entity_id = base + "/idp/metadata"
    conf = {
        "entityid": entity_id,
        "xmlsec_binary": xmlsec,
        "key_file": sign_key,
        "cert_file": sign_cert,
        "metadata": {"local": [sp_metadata]},
        "accepted_time_diff": 60,
        "service": {
            "idp": {
                "name": "ClawOS e2e test IdP",
                "endpoints": {
                    "single_sign_on_service": [
                        (base + "/idp/sso/redirect", BINDING_HTTP_REDIRECT),
                    ],
                },
                "name_id_format": [NAMEID_FORMAT_UNSPECIFIED, NAMEID_FORMAT_PERSISTENT],
                "want_authn_requests_signed": False,
                "policy": {"default": {"lifetime": {"minutes": 5}}},
            },
        },
    }
    cfg = IdPConfig()
    cfg.load(copy.deepcopy(conf))
    return cfg


class IdP:
    def __init__(self, args, tmpdir):
        self.base = args.base.rstrip("/")
        self.entity_id = self.base + "/idp/metadata"
        xmlsec = shutil.which("xmlsec1") or "/usr/bin/xmlsec1"
        with open(args.users) as f:
            self.users = json.load(f)
        self.tmpdir = tmpdir
        self.server = Server(
            config=idp_config(self.base, args.sign_cert, args.sign_key, args.sp_metadata, xmlsec)
        )
        wkey, wcert = make_wrong_keypair(args.sign_cert, self.tmpdir)
        # Same entity id, same metadata, other key: only used for signing.
        self.wrong_server = Server(
            config=idp_config(self.base, wcert, wkey, args.sp_metadata, xmlsec)
        )
        md = create_metadata_string(None, config=self.server.config)
        self.metadata_xml = md.decode("utf-8") if isinstance(md, bytes) else md
        self.lock = threading.Lock()  # pysaml2 objects are not thread-safe
        self.mode = args.mode
        self.pending = {}  # login key -> what the response needs from the request
        self.issued = []

    # ---- AuthnRequest ---------------------------------------------------------

    def accept_request(self, saml_request, relay_state):
        with self.lock:
            req = self.server.parse_authn_request(saml_request, BINDING_HTTP_REDIRECT)
            if req is None:
                raise ValueError("AuthnRequest could not be parsed")
            msg = req.message
            # ACS URL / binding come from the SP metadata (pysaml2 refuses an
            # AssertionConsumerServiceURL that the metadata does not list).
            rargs = self.server.response_args(msg, [BINDING_HTTP_POST])
        key = secrets.token_urlsafe(24)
        self.pending[key] = {
            "request_id": msg.id,
            "sp_entity_id": rargs["sp_entity_id"],
            "destination": rargs["destination"],
            "name_id_policy": rargs.get("name_id_policy"),
            "relay_state": relay_state,
        }
        log(
            "authn_request",
            request_id=msg.id,
            sp=rargs["sp_entity_id"],
            acs=rargs["destination"],
            relay_state_present=relay_state is not None,
        )
        return key

    # ---- Response ---------------------------------------------------------

    def issue(self, key, username):
        pend = self.pending.pop(key)
        mode = self.mode
        sign_assertion, sign_response, which_key = MODES[mode]
        user = self.users[username]
        groups = list(user.get("groups", []))
        identity = {"uid": [username], "groups": groups}

        nid_format = NAMEID_FORMAT_UNSPECIFIED
        pol = pend["name_id_policy"]
        if pol is not None and getattr(pol, "format", None) == NAMEID_FORMAT_PERSISTENT:
            nid_format = NAMEID_FORMAT_PERSISTENT
        name_id = saml.NameID(format=nid_format, text=username)

        acs = pend["destination"]
        with self.lock:
            # Unsigned Response object from pysaml2; signing happens below,
            # after the mode's changes, again through pysaml2 + xmlsec1.
            resp = self.server.create_authn_response(
                identity,
                in_response_to=pend["request_id"],
                destination=acs,
                sp_entity_id=pend["sp_entity_id"],
                name_id=name_id,
                authn={
                    "class_ref": PASSWORDPROTECTEDTRANSPORT,
                    "authn_auth": self.entity_id,
                },
                sign_assertion=False,
                sign_response=False,
                encrypt_assertion=False,
            )
            if isinstance(resp, (str, bytes)) or resp is None:
                raise RuntimeError("pysaml2 did not return a Response object")
            assertion = resp.assertion
            if isinstance(assertion, list):
                assertion = assertion[0]

            # Plain attribute names "uid" and "groups" (pysaml2's converters
            # would rename uid to an OID); multi-valued xs:string values.
            assertion.attribute_statement = [
                saml.AttributeStatement(
                    attribute=[
                        saml.Attribute(
                            name=name,
                            name_format=ATTR_NAME_FORMAT,
                            friendly_name=name,
                            attribute_value=do_ava(values, "xs:string"),
                        )
                        for name, values in (("uid", [username]), ("groups", groups))
                    ]
                )
            ]
            self.apply_field_mode(mode, resp, assertion)

            sec = None
            if which_key == "idp":
                sec = self.server.sec
            elif which_key == "wrong":
                sec = self.wrong_server.sec
            to_sign = []
            alg = dict(sign_alg=xmldsig.SIG_RSA_SHA256, digest_alg=xmldsig.DIGEST_SHA256)
            if sign_assertion:
                assertion.signature = pre_signature_part(assertion.id, sec.my_cert, 2, **alg)
                to_sign.append((class_name(assertion), assertion.id))
            if sign_response:
                resp.signature = pre_signature_part(resp.id, sec.my_cert, 1, **alg)
                to_sign.append((class_name(resp), resp.id))
            if to_sign:
                # Inner (assertion) first, then the enveloping response.
                xml = signed_instance_factory(resp, sec, to_sign)
            else:
                xml = resp.to_string()
        if isinstance(xml, str):
            xml = xml.encode("utf-8")

        entry = {
            "mode": mode,
            "user": username,
            "response_id": resp.id,
            "in_response_to": resp.in_response_to,
            "acs": acs,
            "assertion_ids": [assertion.id],
            "signed_assertion": sign_assertion,
            "signed_response": sign_response,
            "key": which_key,
        }
        if mode in ("xsw", "xsw-extensions"):
            xml, forged_id = self.wrap(xml, assertion.id, mode)
            entry["assertion_ids"] = [forged_id, assertion.id]
            entry["forged_assertion_id"] = forged_id
            entry["forged_user"] = XSW_USER
        entry = log("response", **entry)
        self.issued.append(entry)
        return acs, base64.b64encode(xml).decode("ascii"), pend["relay_state"]

    def apply_field_mode(self, mode, resp, assertion):
        """Field changes made BEFORE signing, so the signature covers them."""
        scd = assertion.subject.subject_confirmation[0].subject_confirmation_data
        now = datetime.datetime.now(datetime.timezone.utc)
        past = utc_str(now - datetime.timedelta(minutes=10))
        if mode == "audience":
            assertion.conditions.audience_restriction[0].audience[0].text = FOREIGN_AUDIENCE
        if mode in ("expired", "expired-conditions"):
            assertion.conditions.not_before = utc_str(now - datetime.timedelta(minutes=20))
            assertion.conditions.not_on_or_after = past
        if mode in ("expired", "expired-subject"):
            scd.not_on_or_after = past
        if mode == "notyet":
            assertion.conditions.not_before = utc_str(now + datetime.timedelta(minutes=10))
            assertion.conditions.not_on_or_after = utc_str(now + datetime.timedelta(minutes=15))
        if mode in ("recipient", "recipient-only"):
            scd.recipient = FOREIGN_RECIPIENT
        if mode in ("recipient", "destination-only"):
            resp.destination = FOREIGN_RECIPIENT
        if mode in ("inresponseto", "inresponseto-assertion"):
            made_up = "id-" + secrets.token_hex(16)
            scd.in_response_to = made_up
            if mode == "inresponseto":
                resp.in_response_to = made_up

    def wrap(self, xml, signed_id, variant):
        """XML Signature Wrapping on the signed document (lxml; the signed
        assertion's subtree is moved, never re-built)."""
        root = etree.fromstring(xml)
        orig = root.find("saml:Assertion", NS)
        if orig is None or orig.get("ID") != signed_id:
            raise RuntimeError("signed assertion not found for wrapping")
        forged = copy.deepcopy(orig)
        sig = forged.find("ds:Signature", NS)
        if sig is not None:
            forged.remove(sig)
        forged_id = "id-" + secrets.token_hex(16)
        forged.set("ID", forged_id)
        forged.find("saml:Subject/saml:NameID", NS).text = XSW_USER
        for attr in forged.iterfind("saml:AttributeStatement/saml:Attribute", NS):
            values = {"uid": [XSW_USER], "groups": XSW_GROUPS}.get(attr.get("Name"))
            if values is None:
                continue
            olds = attr.findall("saml:AttributeValue", NS)
            template = olds[0]
            for old in olds:
                attr.remove(old)
            for v in values:
                new = copy.deepcopy(template)
                new.text = v
                attr.append(new)
        pos = list(root).index(orig)
        if variant == "xsw":
            # Response: Issuer, Status, Assertion(forged, unsigned),
            #           Assertion(original, signed)
            root.insert(pos, forged)
        else:
            # Response: Issuer, Extensions(Assertion(original, signed)),
            #           Status, Assertion(forged, unsigned)
            root.remove(orig)
            root.insert(pos, forged)
            ext = root.find("samlp:Extensions", NS)
            if ext is None:
                ext = etree.Element("{%s}Extensions" % NS_SAMLP)
                after = 0
                for i, child in enumerate(root):
                    if child.tag in ("{%s}Issuer" % NS_SAML, "{%s}Signature" % NS_DS):
                        after = i + 1
                root.insert(after, ext)
            ext.append(orig)
        return etree.tostring(root, xml_declaration=True, encoding="UTF-8"), forged_id


# ---- HTTP ---------------------------------------------------------------------

PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title></head>
<body>{body}</body></html>
"""


def login_page(action, key, error=""):
    err = '<p class="error">%s</p>' % html.escape(error) if error else ""
    body = (
        "<h1>ClawOS test IdP</h1>%s"
        '<form method="post" action="%s">'
        '<input type="hidden" name="key" value="%s">'
        '<label>User <input type="text" name="username" autocomplete="username"></label>'
        '<label>Password <input type="password" name="password" '
        'autocomplete="current-password"></label>'
        '<button type="submit">Sign in</button>'
        "</form>"
    ) % (err, html.escape(action, quote=True), html.escape(key, quote=True))
    return PAGE.format(title="Sign in", body=body)


def post_page(acs, saml_response, relay_state):
    fields = '<input type="hidden" name="SAMLResponse" value="%s">' % html.escape(
        saml_response, quote=True
    )
    if relay_state is not None:
        fields += '<input type="hidden" name="RelayState" value="%s">' % html.escape(
            relay_state, quote=True
        )
    body = (
        '<form method="post" action="%s">%s'
        '<noscript><button type="submit">Continue</button></noscript></form>'
        "<script>document.forms[0].submit();</script>"
    ) % (html.escape(acs, quote=True), fields)
    return PAGE.format(title="Signing in", body=body)


def make_handler(idp):
    class Handler(BaseHTTPRequestHandler):
        server_version = "clawos-test-idp"
        protocol_version = "HTTP/1.1"
        timeout = 30

        def log_message(self, fmt, *a):  # stdout is for JSON lines only
            sys.stderr.write("idp: " + (fmt % a) + "\n")

        def send(self, status, body, ctype="text/html; charset=utf-8"):
            data = body.encode("utf-8") if isinstance(body, str) else body
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            url = urllib.parse.urlsplit(self.path)
            if url.path == "/idp/metadata":
                return self.send(200, idp.metadata_xml, "application/samlmetadata+xml")
            if url.path == "/idp/sso/redirect":
                q = urllib.parse.parse_qs(url.query)
                if "SAMLRequest" not in q:
                    return self.send(400, "missing SAMLRequest\n", "text/plain")
                relay = q.get("RelayState", [None])[0]
                try:
                    key = idp.accept_request(q["SAMLRequest"][0], relay)
                except Exception as exc:  # refuse anything pysaml2 refuses
                    log("bad_request", error="%s: %s" % (type(exc).__name__, exc))
                    return self.send(400, "bad AuthnRequest: %s\n" % exc, "text/plain")
                return self.send(200, login_page(idp.base + "/idp/login", key))
            return self.send(404, "not found\n", "text/plain")

        def do_POST(self):
            url = urllib.parse.urlsplit(self.path)
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b""
            if url.path != "/idp/login":
                return self.send(404, "not found\n", "text/plain")
            form = urllib.parse.parse_qs(raw.decode("utf-8", "replace"))
            key = form.get("key", [""])[0]
            username = form.get("username", [""])[0]
            password = form.get("password", [""])[0]
            if key not in idp.pending:
                return self.send(400, "unknown or used login key\n", "text/plain")
            user = idp.users.get(username)
            if user is None or not secrets.compare_digest(
                str(user.get("password", "")).encode(), password.encode()
            ):
                log("login_failed", user=username)
                return self.send(
                    401, login_page(idp.base + "/idp/login", key, "wrong user name or password")
                )
            try:
                acs, saml_response, relay = idp.issue(key, username)
            except Exception as exc:
                log("issue_failed", error="%s: %s" % (type(exc).__name__, exc))
                return self.send(500, "could not issue response: %s\n" % exc, "text/plain")
            return self.send(200, post_page(acs, saml_response, relay))

    return Handler


def make_admin_handler(idp):
    class Admin(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 30

        def log_message(self, fmt, *a):
            sys.stderr.write("idp-admin: " + (fmt % a) + "\n")

        def send_json(self, status, obj):
            data = (json.dumps(obj) + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/mode":
                return self.send_json(200, {"mode": idp.mode, "modes": sorted(MODES)})
            if self.path == "/issued":
                return self.send_json(200, idp.issued)
            return self.send_json(404, {"error": "not found"})

        def do_POST(self):
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b""
            if self.path != "/mode":
                return self.send_json(404, {"error": "not found"})
            try:
                mode = json.loads(raw or b"{}")["mode"]
            except (ValueError, KeyError, TypeError):
                return self.send_json(400, {"error": 'body must be {"mode": ...}'})
            if mode not in MODES:
                return self.send_json(400, {"error": "unknown mode", "modes": sorted(MODES)})
            idp.mode = mode
            log("mode", mode=mode)
            return self.send_json(200, {"mode": mode})

    return Admin


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--base", required=True, help="https://127.0.0.1:PORT")
    p.add_argument("--cert", required=True, help="TLS certificate (PEM)")
    p.add_argument("--key", required=True, help="TLS key (PEM)")
    p.add_argument("--sign-cert", required=True, help="SAML signing certificate (PEM)")
    p.add_argument("--sign-key", required=True, help="SAML signing key (PEM)")
    p.add_argument("--sp-metadata", required=True, help="SP metadata XML file")
    p.add_argument("--users", required=True, help="users JSON file")
    p.add_argument("--admin-port", type=int, required=True)
    p.add_argument("--metadata-out", required=True, help="write IdP metadata here")
    p.add_argument("--mode", default="none", choices=sorted(MODES), help="initial mode")
    args = p.parse_args()

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    tmpdir = tempfile.mkdtemp(prefix="saml-idp-")  # the wrongkey key pair
    try:
        serve(args, tmpdir)
    except KeyboardInterrupt:
        pass
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def serve(args, tmpdir):
    idp = IdP(args, tmpdir)
    tmp = args.metadata_out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(idp.metadata_xml)
    os.replace(tmp, args.metadata_out)

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(args.cert, args.key)
    httpd = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(idp))
    httpd.daemon_threads = True
    # Handshake lazily in the handler thread, not in accept().
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
    admin = ThreadingHTTPServer(("127.0.0.1", args.admin_port), make_admin_handler(idp))
    admin.daemon_threads = True
    threading.Thread(target=admin.serve_forever, daemon=True).start()

    sys.stdout.write("saml-idp listening %s\n" % idp.base)
    sys.stdout.flush()
    httpd.serve_forever()


if __name__ == "__main__":
    main()
