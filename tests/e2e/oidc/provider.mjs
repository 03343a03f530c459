// Test-only OpenID provider for the ClawOS end-to-end tests.
//
// All OpenID Connect / OAuth logic comes from the certified `oidc-provider`
// library; this file only configures it, supplies the account store
// (USERS.json), a minimal login page for the interaction step, and a
// test-only "tamper" switch that alters ID tokens on their way out of the
// token endpoint (simulating a hostile network in front of the relying
// party). See README.md next to this file.

import { readFileSync } from 'node:fs';
import { randomBytes, timingSafeEqual, createHash } from 'node:crypto';
import * as http from 'node:http';
import * as https from 'node:https';
import { parseArgs } from 'node:util';

import Provider from 'oidc-provider';
import {
  SignJWT, decodeJwt, decodeProtectedHeader, importJWK,
} from 'jose';

// ---------------------------------------------------------------- arguments

const { values: args } = parseArgs({
  options: {
    port: { type: 'string' },
    issuer: { type: 'string' },
    cert: { type: 'string' },
    key: { type: 'string' },
    jwks: { type: 'string' },
    'client-id': { type: 'string' },
    'client-secret': { type: 'string' },
    'redirect-uri': { type: 'string' },
    users: { type: 'string' },
    'admin-port': { type: 'string' },
  },
  strict: true,
  allowPositionals: false,
});

for (const name of ['port', 'issuer', 'cert', 'key', 'jwks', 'client-id',
  'client-secret', 'redirect-uri', 'users', 'admin-port']) {
  if (!args[name]) {
    console.error(`provider.mjs: missing required --${name}`);
    process.exit(64);
  }
}

const port = Number.parseInt(args.port, 10);
const adminPort = Number.parseInt(args['admin-port'], 10);
const { issuer } = args;
const clientId = args['client-id'];
const clientSecret = args['client-secret'];
const redirectUri = args['redirect-uri'];

const jwks = JSON.parse(readFileSync(args.jwks, 'utf8'));
if (!Array.isArray(jwks.keys) || jwks.keys.length === 0) {
  console.error('provider.mjs: --jwks must hold {"keys":[...]} with at least one private JWK');
  process.exit(64);
}
const users = JSON.parse(readFileSync(args.users, 'utf8'));

// ---------------------------------------------------------------- accounts

function lookupUser(name) {
  return typeof name === 'string' && Object.hasOwn(users, name) ? users[name] : undefined;
}

function sameSecret(a, b) {
  // Compare digests so that differing lengths do not short-circuit.
  const da = createHash('sha256').update(String(a)).digest();
  const db = createHash('sha256').update(String(b)).digest();
  return timingSafeEqual(da, db);
}

async function findAccount(_ctx, sub) {
  const user = lookupUser(sub);
  if (!user) return undefined;
  return {
    accountId: sub,
    async claims() {
      const claims = {
        sub,
        name: typeof user.name === 'string' ? user.name : sub,
        preferred_username: sub,
        groups: Array.isArray(user.groups) ? user.groups.map(String) : [],
      };
      if (typeof user.email === 'string') {
        claims.email = user.email;
        claims.email_verified = true;
      }
      return claims;
    },
  };
}

// ---------------------------------------------------------------- consent

// Consent is granted automatically: whatever OpenID scopes / claims / resource
// scopes the (single, first-party) client asks for are added to its grant, so
// the consent prompt never triggers and no consent page is ever shown.
async function loadExistingGrant(ctx) {
  const { oidc } = ctx;
  const grantId = oidc.result?.consent?.grantId
    || oidc.session.grantIdFor(oidc.client.clientId);
  let grant = grantId ? await oidc.provider.Grant.find(grantId) : undefined;
  if (!grant) {
    grant = new oidc.provider.Grant({
      clientId: oidc.client.clientId,
      accountId: oidc.session.accountId,
    });
  }
  const scopes = [...oidc.requestParamOIDCScopes];
  if (scopes.length) grant.addOIDCScope(scopes.join(' '));
  const claims = [...oidc.requestParamClaims];
  if (claims.length) grant.addOIDCClaims(claims);
  for (const [indicator, server] of Object.entries(oidc.resourceServers ?? {})) {
    const wanted = [...oidc.requestParamScopes].filter((s) => server.scopes.has(s));
    if (wanted.length) grant.addResourceScope(indicator, wanted.join(' '));
  }
  await grant.save();
  return grant;
}

// ---------------------------------------------------------------- pages

function esc(value) {
  return String(value)
    .replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;')
    .replace(/"/g, '&quot;').replace(/'/g, '&#39;');
}

function page(title, inner) {
  return `<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>${esc(title)}</title></head>
<body>
<h1>${esc(title)}</h1>
${inner}
</body>
</html>
`;
}

function loginPage(uid, { error, login } = {}) {
  const errorLine = error ? `<p class="error" role="alert">${esc(error)}</p>\n` : '';
  return page('Sign in to the test OpenID provider', `${errorLine}<form method="post" action="/interaction/${esc(uid)}/login" autocomplete="off">
<input type="hidden" name="prompt" value="login">
<label>Username <input type="text" name="login" value="${esc(login ?? '')}" autofocus required></label>
<label>Password <input type="password" name="password" required></label>
<button type="submit">Sign in</button>
</form>`);
}

async function renderError(ctx, out) {
  ctx.type = 'html';
  ctx.body = page('OpenID provider error', Object.entries(out)
    .map(([k, v]) => `<pre><strong>${esc(k)}</strong>: ${esc(v)}</pre>`).join('\n'));
}

async function logoutSource(ctx, form) {
  ctx.body = page('Sign out?', `${form}
<button type="submit" form="op.logoutForm" value="yes" name="logout">Yes, sign me out</button>
<button type="submit" form="op.logoutForm">No</button>`);
}

async function postLogoutSuccessSource(ctx) {
  ctx.body = page('Signed out', '<p>You are signed out.</p>');
}

// ---------------------------------------------------------------- provider

const provider = new Provider(issuer, {
  jwks,
  clients: [{
    client_id: clientId,
    client_secret: clientSecret,
    token_endpoint_auth_method: 'client_secret_basic',
    response_types: ['code'],
    grant_types: ['authorization_code'],
    redirect_uris: [redirectUri],
    id_token_signed_response_alg: 'RS256',
  }],
  // PKCE with S256 only (no "plain") for every client, confidential ones included.
  pkce: { methods: ['S256'], required: () => true },
  responseTypes: ['code'],
  scopes: ['openid'],
  // groups / name / preferred_username live in the `openid` scope so that they
  // are in every ID token whatever else the client asks for; the relying
  // party never calls userinfo.
  claims: {
    openid: ['sub', 'name', 'preferred_username', 'groups'],
    profile: ['name', 'preferred_username'],
    groups: ['groups'],
    email: ['email', 'email_verified'],
  },
  conformIdTokenClaims: false,
  findAccount,
  loadExistingGrant,
  cookies: {
    // Distinct names: cookies are per host, not per port, so the relying
    // party on 127.0.0.1 sees them too.
    names: {
      session: 'op_session',
      interaction: 'op_interaction',
      resume: 'op_interaction_resume',
    },
    long: { httpOnly: true, sameSite: 'lax', signed: true },
    short: { httpOnly: true, sameSite: 'lax', signed: true },
    keys: [randomBytes(32).toString('base64url')],
  },
  interactions: {
    url: async (_ctx, interaction) => `/interaction/${interaction.uid}`,
  },
  features: {
    devInteractions: { enabled: false },
    registration: { enabled: false },
    introspection: { enabled: false },
    revocation: { enabled: false },
    rpInitiatedLogout: { enabled: true, logoutSource, postLogoutSuccessSource },
  },
  renderError,
  ttl: {
    AccessToken: 600,
    AuthorizationCode: 60,
    IdToken: 600,
    Interaction: 600,
    Session: 3600,
    Grant: 3600,
  },
  // Nothing in this provider may reach out to the network: every outbound
  // request the library could make (none of the enabled features needs one)
  // is aborted before it starts.
  httpOptions: (url) => ({
    signal: AbortSignal.abort(new Error(`outbound HTTP refused in the test provider: ${url}`)),
  }),
});

// ---------------------------------------------------------------- interactions

async function readForm(req, limit = 16 * 1024) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > limit) throw new Error('form body too large');
    chunks.push(chunk);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

// Fallback for the consent prompt (e.g. the client sent prompt=consent): grant
// what is missing and go on, without any page.
async function autoConsent(ctx, details) {
  const { prompt, params, session } = details;
  let grant = details.grantId ? await provider.Grant.find(details.grantId) : undefined;
  if (!grant) {
    grant = new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
  }
  const d = prompt.details ?? {};
  if (d.missingOIDCScope) grant.addOIDCScope(d.missingOIDCScope.join(' '));
  if (d.missingOIDCClaims) grant.addOIDCClaims(d.missingOIDCClaims);
  for (const [indicator, scopes] of Object.entries(d.missingResourceScopes ?? {})) {
    grant.addResourceScope(indicator, scopes.join(' '));
  }
  const grantId = await grant.save();
  const returnTo = await provider.interactionResult(
    ctx.req, ctx.res, { consent: { grantId } }, { mergeWithLastSubmission: true },
  );
  ctx.status = 303;
  ctx.redirect(returnTo);
}

const INTERACTION = /^\/interaction\/([A-Za-z0-9_-]+)(\/login)?$/;

provider.use(async (ctx, next) => {
  const m = INTERACTION.exec(ctx.path);
  if (!m) return next();
  const [, uid, login] = m;
  ctx.set('cache-control', 'no-store');
  try {
    const details = await provider.interactionDetails(ctx.req, ctx.res);
    if (details.uid !== uid) {
      ctx.status = 400;
      ctx.type = 'html';
      ctx.body = page('Error', '<p>Interaction mismatch.</p>');
      return undefined;
    }
    if (ctx.method === 'GET' && !login) {
      if (details.prompt.name === 'login') {
        ctx.type = 'html';
        ctx.body = loginPage(uid);
        return undefined;
      }
      if (details.prompt.name === 'consent') {
        await autoConsent(ctx, details);
        return undefined;
      }
      ctx.status = 400;
      ctx.type = 'html';
      ctx.body = page('Error', `<p>Unsupported prompt ${esc(details.prompt.name)}.</p>`);
      return undefined;
    }
    if (ctx.method === 'POST' && login) {
      if (details.prompt.name !== 'login') {
        ctx.status = 400;
        ctx.type = 'html';
        ctx.body = page('Error', '<p>No login is pending.</p>');
        return undefined;
      }
      const form = await readForm(ctx.req);
      const name = form.get('login') ?? '';
      const password = form.get('password') ?? '';
      const user = lookupUser(name);
      const ok = user !== undefined && sameSecret(password, user.password ?? '');
      if (!ok) {
        console.log(JSON.stringify({ event: 'login_failed', login: name }));
        ctx.status = 401;
        ctx.type = 'html';
        ctx.body = loginPage(uid, { error: 'Invalid username or password.', login: name });
        return undefined;
      }
      console.log(JSON.stringify({ event: 'login_ok', login: name }));
      const returnTo = await provider.interactionResult(
        ctx.req, ctx.res, { login: { accountId: name } }, { mergeWithLastSubmission: false },
      );
      ctx.status = 303;
      ctx.redirect(returnTo);
      return undefined;
    }
    ctx.status = 405;
    ctx.body = 'method not allowed';
    return undefined;
  } catch (err) {
    ctx.status = err.statusCode ?? err.status ?? 400;
    ctx.type = 'html';
    ctx.body = page('Error', `<p>${esc(err.error ?? 'error')}: ${esc(err.error_description ?? err.message)}</p>`);
    return undefined;
  }
});

// ---------------------------------------------------------------- tamper

const TAMPER_MODES = new Set(['none', 'signature', 'audience', 'nonce', 'expired', 'issuer']);
let tamperMode = 'none';

async function signingKey(kid) {
  const jwk = jwks.keys.find((k) => k.kid === kid) ?? jwks.keys[0];
  return importJWK(jwk, 'RS256');
}

async function tamperIdToken(idToken, mode) {
  if (mode === 'none') return idToken;
  if (mode === 'signature') {
    const [h, p, s] = idToken.split('.');
    // Flip a character in the middle of the signature: every bit of a middle
    // base64url character is significant (the last one may carry padding bits
    // only, which some decoders ignore).
    const i = Math.floor(s.length / 2);
    const flipped = s[i] === 'A' ? 'B' : 'A';
    return `${h}.${p}.${s.slice(0, i)}${flipped}${s.slice(i + 1)}`;
  }
  const header = decodeProtectedHeader(idToken);
  const claims = decodeJwt(idToken);
  const now = Math.floor(Date.now() / 1000);
  switch (mode) {
    case 'audience': claims.aud = 'someone-else'; break;
    case 'nonce': claims.nonce = 'not-the-nonce'; break;
    case 'expired': claims.exp = now - 600; claims.iat = now - 1200; break;
    case 'issuer': claims.iss = 'https://evil.example'; break;
    default: throw new Error(`unknown tamper mode ${mode}`);
  }
  return new SignJWT(claims)
    .setProtectedHeader({ ...header, alg: 'RS256' })
    .sign(await signingKey(header.kid));
}

provider.use(async (ctx, next) => {
  await next();
  if (ctx.oidc?.route !== 'token' || ctx.status !== 200) return;
  const body = ctx.body;
  if (!body || typeof body !== 'object' || typeof body.id_token !== 'string') return;
  const mode = tamperMode;
  body.id_token = await tamperIdToken(body.id_token, mode);
  ctx.body = body;
  console.log(JSON.stringify({
    event: 'token_response',
    tamper: mode,
    id_token_header: decodeProtectedHeader(body.id_token),
    id_token_claims: decodeJwt(body.id_token),
  }));
});

// ---------------------------------------------------------------- servers

function adminHandler(req, res) {
  const reply = (status, obj) => {
    res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store' });
    res.end(`${JSON.stringify(obj)}\n`);
  };
  const path = new URL(req.url, 'http://admin').pathname;
  if (path !== '/tamper') return reply(404, { error: 'not found' });
  if (req.method === 'GET') return reply(200, { mode: tamperMode });
  if (req.method !== 'POST') return reply(405, { error: 'method not allowed' });
  const chunks = [];
  let size = 0;
  req.on('data', (c) => {
    size += c.length;
    if (size <= 4096) chunks.push(c);
  });
  req.on('end', () => {
    let mode;
    try {
      ({ mode } = JSON.parse(Buffer.concat(chunks).toString('utf8')));
    } catch {
      return reply(400, { error: 'body must be JSON {"mode": ...}' });
    }
    if (size > 4096 || !TAMPER_MODES.has(mode)) {
      return reply(400, { error: `mode must be one of ${[...TAMPER_MODES].join(', ')}` });
    }
    tamperMode = mode;
    console.log(JSON.stringify({ event: 'tamper_mode', mode }));
    return reply(200, { mode });
  });
  return undefined;
}

const tls = { cert: readFileSync(args.cert), key: readFileSync(args.key) };
const server = https.createServer(tls, provider.callback());
const admin = http.createServer(adminHandler);

function listen(srv, p) {
  return new Promise((resolve, reject) => {
    srv.once('error', reject);
    srv.listen(p, '127.0.0.1', () => {
      srv.off('error', reject);
      resolve();
    });
  });
}

function shutdown() {
  server.close();
  admin.close();
  server.closeAllConnections?.();
  admin.closeAllConnections?.();
  process.exit(0);
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);

try {
  await listen(admin, adminPort);
  await listen(server, port);
} catch (err) {
  console.error(`provider.mjs: cannot listen: ${err.message}`);
  process.exit(1);
}
console.log(`oidc-provider listening ${issuer}`);
