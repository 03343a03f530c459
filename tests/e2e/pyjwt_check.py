"""Independent checks of identity-manager tokens with PyJWT (used by e2e/identity.rs).

verify JWKS_URL ISSUER AUDIENCE TOKEN  -> {"ok": true, "claims": {...}} or {"ok": false, "error": ...}
forge-hs256 JWKS_URL TOKEN             -> the token re-signed with HS256 using the public key as secret
tamper TOKEN                            -> the token with one payload character changed
"""
import base64
import json
import sys

import jwt


def verify(jwks_url, issuer, audience, token):
    try:
        # A fresh client each time: no cache, the JWKS is fetched over HTTP.
        key = jwt.PyJWKClient(jwks_url, cache_keys=False).get_signing_key_from_jwt(token)
        claims = jwt.decode(token, key.key, algorithms=["EdDSA"], audience=audience, issuer=issuer)
        return {"ok": True, "claims": claims}
    except Exception as e:  # noqa: BLE001 - report any rejection
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}


def forge_hs256(jwks_url, token):
    header = jwt.get_unverified_header(token)
    key = jwt.PyJWKClient(jwks_url, cache_keys=False).get_signing_key(header["kid"])
    x = base64.urlsafe_b64decode(key._jwk_data["x"] + "==")
    payload = jwt.decode(token, options={"verify_signature": False})
    return jwt.encode(payload, x, algorithm="HS256", headers={"kid": header["kid"]})


def tamper(token):
    h, p, s = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))
    claims["agent"] = claims["agent"] + "-evil"
    p2 = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{h}.{p2}.{s}"


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "verify":
        print(json.dumps(verify(*args)))
    elif cmd == "forge-hs256":
        print(forge_hs256(*args))
    elif cmd == "tamper":
        print(tamper(*args))
    else:
        sys.exit(f"unknown command {cmd}")
