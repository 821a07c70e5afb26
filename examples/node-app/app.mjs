#!/usr/bin/env node
// A small web app gated by rolesync (Node >= 20, no npm packages). It signs a user in, asks
// rolesync for the user's role (POST /v1/reconcile) and keeps the answer in its session, then lets
// /studio open only while the stored membership is `active` with a role that grants it. Whenever
// rolesync does not answer, /studio is refused (503): it fails closed and never crashes.
//
//   ROLESYNC_URL=http://127.0.0.1:8080 ROLESYNC_LOGIN_TOKEN=... PORT=3000 node examples/node-app/app.mjs
import http from 'node:http';
import { randomBytes } from 'node:crypto';
import { pathToFileURL } from 'node:url';

/** The roles that may open /studio. */
const STUDIO_ROLES = new Set(['admin']);

/**
 * The app's HTTP server (not yet listening).
 * - `signInTimeoutMs` covers rolesync's login budget (ROLESYNC_LOGIN_BUDGET_MS, 1,500 ms by
 *   default) plus the database write, with a margin.
 * - `readTimeoutMs` bounds the per-request read of the stored role (a database read in rolesync).
 */
export function createApp({ rolesyncUrl, rolesyncToken, signInTimeoutMs = 2500, readTimeoutMs = 500 }) {
  const sessions = new Map(); // session id -> { userId, orgId, signIn }

  /** Calls rolesync; `{status, body}`, or `{status: 0, error}` when it cannot be reached in time. */
  async function rolesync(method, path, body, timeoutMs) {
    try {
      const response = await fetch(rolesyncUrl + path, {
        method,
        headers: { authorization: `Bearer ${rolesyncToken}`, 'content-type': 'application/json' },
        body: body && JSON.stringify(body),
        signal: AbortSignal.timeout(timeoutMs),
      });
      const text = await response.text();
      return { status: response.status, body: text ? JSON.parse(text) : null };
    } catch (e) {
      return { status: 0, error: e.name === 'TimeoutError' ? 'timeout' : 'unreachable' };
    }
  }

  // Stand-in for AuthKit's callback: a real app exchanges `?code=` with WorkOS
  // (userManagement.authenticateWithCode) and takes `user.id` and `organizationId` from the answer.
  async function callback(url, res) {
    const userId = url.searchParams.get('user_id');
    const orgId = url.searchParams.get('organization_id');
    if (!userId || !orgId) return send(res, 400, { error: 'user_id and organization_id are required' });
    const answer = await rolesync('POST', '/v1/reconcile', { user_id: userId, organization_id: orgId }, signInTimeoutMs);
    // Signed in either way; without rolesync's answer the session holds no role, so /studio stays shut.
    const signIn =
      answer.status === 200
        ? { role: answer.body.role, status: answer.body.status, source: answer.body.source }
        : { role: null, status: null, error: answer.error ?? `rolesync answered ${answer.status}` };
    const sid = randomBytes(18).toString('base64url');
    sessions.set(sid, { userId, orgId, signIn });
    res.setHeader('set-cookie', `sid=${sid}; HttpOnly; SameSite=Lax; Path=/`);
    send(res, 200, { signed_in: true, ...signIn });
  }

  // The gate reads the stored row on every request, so a role changed by webhook or catch-up takes
  // effect at the next request; the session's answer is only shown on `/`.
  async function studio(session, res) {
    const { userId, orgId } = session;
    const row = await rolesync('GET', `/v1/memberships/${encodeURIComponent(orgId)}/${encodeURIComponent(userId)}`, undefined, readTimeoutMs);
    if (row.status === 404) return send(res, 403, { error: 'no membership' });
    if (row.status !== 200) return send(res, 503, { error: 'roles_unavailable', detail: row.error ?? row.status });
    session.signIn = { ...session.signIn, role: row.body.role_slug, status: row.body.status };
    if (row.body.status !== 'active' || !STUDIO_ROLES.has(row.body.role_slug)) {
      return send(res, 403, { error: 'forbidden', role: row.body.role_slug, status: row.body.status });
    }
    send(res, 200, { studio: 'welcome', role: row.body.role_slug });
  }

  async function route(req, res) {
    const url = new URL(req.url, 'http://app');
    if (url.pathname === '/healthz') return send(res, 200, { ok: true });
    if (url.pathname === '/callback') return callback(url, res);
    const sid = /(?:^|;\s*)sid=([^;]+)/.exec(req.headers.cookie ?? '')?.[1];
    const session = sid && sessions.get(sid);
    if (!session) return send(res, 401, { error: 'sign in first: /callback?user_id=...&organization_id=...' });
    if (url.pathname === '/') return send(res, 200, session);
    if (url.pathname === '/studio') return studio(session, res);
    if (url.pathname === '/logout') {
      sessions.delete(sid);
      return send(res, 200, { signed_out: true });
    }
    send(res, 404, { error: 'not found' });
  }

  return http.createServer((req, res) => {
    route(req, res).catch((e) => {
      console.error(`request failed: ${e.stack}`);
      if (!res.headersSent) send(res, 500, { error: 'internal' });
    });
  });
}

function send(res, status, body) {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body));
}

if (import.meta.url === pathToFileURL(process.argv[1]).href) {
  const token = process.env.ROLESYNC_LOGIN_TOKEN;
  if (!token) {
    console.error('ROLESYNC_LOGIN_TOKEN is required (the token rolesync serve was given)');
    process.exit(2);
  }
  const app = createApp({ rolesyncUrl: process.env.ROLESYNC_URL ?? 'http://127.0.0.1:8080', rolesyncToken: token });
  app.listen(Number(process.env.PORT ?? 3000), '127.0.0.1', () => {
    console.log(`listening on http://127.0.0.1:${app.address().port}`);
  });
  process.on('SIGTERM', () => app.close(() => process.exit(0)));
}
