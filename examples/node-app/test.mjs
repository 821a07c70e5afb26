#!/usr/bin/env node
// The example app against the real rolesync binary and WorkOS's emulator (run by scripts/test):
// sign-in as admin opens /studio; a role change delivered by webhook shuts it at the next request;
// a lost webhook heals at the next sign-in; with rolesync stopped /studio is refused, not crashed.
import assert from 'node:assert/strict';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  Child,
  registerWebhook,
  rolesync,
  rolesyncClient,
  rolesyncEnv,
  sleep,
  startEmulator,
  startRolesync,
  throwawayDatabase,
  waitFor,
} from '../../scripts/e2e/harness.mjs';

const SECRET = 'whsec_example_app';
const TOKEN = 'login_token_example_app';
const here = path.dirname(fileURLToPath(import.meta.url));

/** A browser of one user: keeps the session cookie. */
function browser(base) {
  let cookie = '';
  return async (route) => {
    const response = await fetch(base + route, { headers: { cookie } });
    const set = response.headers.get('set-cookie');
    if (set) cookie = set.split(';')[0];
    return { status: response.status, body: await response.json() };
  };
}

const started = Date.now();
const db = throwawayDatabase('sqlite');
const emulator = await startEmulator();
let server;
let app;
try {
  const env = rolesyncEnv({ databaseUrl: db.url, emulator, secret: SECRET, loginToken: TOKEN });
  rolesync(['migrate'], env);
  server = await startRolesync(env);
  app = new Child('node-app', process.execPath, [path.join(here, 'app.mjs')], {
    PORT: '0',
    ROLESYNC_URL: server.url,
    ROLESYNC_LOGIN_TOKEN: TOKEN,
  });
  const appUrl = await waitFor('the example app', () => /listening on (\S+)/.exec(app.output)?.[1]);

  const { api } = emulator;
  const endpoint = await registerWebhook(emulator, server.url, SECRET);
  const org = (await api('POST', '/organizations', { name: 'Studio Co' })).id;
  const alice = (await api('POST', '/user_management/users', { email: 'alice@studio.test' })).id;
  const om = (
    await api('POST', '/user_management/organization_memberships', {
      organization_id: org,
      user_id: alice,
      role_slug: 'admin',
    })
  ).id;
  const setRole = (role_slug) => api('PUT', `/user_management/organization_memberships/${om}`, { role_slug });
  const rs = rolesyncClient(server.url, TOKEN);
  const storedRole = async () => (await rs.stored(org, alice))?.role_slug;
  const get = browser(appUrl);

  // 1. Sign-in as admin: /studio opens.
  const signIn = await get(`/callback?user_id=${alice}&organization_id=${org}`);
  assert.deepEqual([signIn.status, signIn.body.role, signIn.body.status], [200, 'admin', 'active'], 'sign-in as admin');
  assert.equal((await get('/studio')).status, 200, 'admin opens /studio');

  // 2. Role changed in WorkOS and delivered by webhook: the next /studio request is refused.
  await setRole('member');
  await waitFor('the webhook to store member', async () => (await storedRole()) === 'member');
  const refused = await get('/studio');
  assert.deepEqual([refused.status, refused.body.role], [403, 'member'], '/studio after the webhook');

  // 3. Webhook lost (endpoint disabled): the stored role stays stale until the next sign-in heals it.
  await api('PUT', `/webhook_endpoints/${endpoint.id}`, { enabled: false });
  await setRole('admin');
  await sleep(500);
  assert.equal((await get('/studio')).status, 403, 'no webhook: still member in rolesync');
  const again = await get(`/callback?user_id=${alice}&organization_id=${org}`);
  assert.deepEqual([again.body.role, again.body.source], ['admin', 'workos'], 'the sign-in fetched WorkOS');
  assert.equal((await get('/studio')).status, 200, 'healed at the next sign-in');

  // 4. rolesync stopped: /studio is refused (fail closed), the app keeps serving.
  await server.child.stop();
  const down = await get('/studio');
  assert.deepEqual([down.status, down.body.error], [503, 'roles_unavailable'], '/studio with rolesync down');
  const blindSignIn = await get(`/callback?user_id=${alice}&organization_id=${org}`);
  assert.deepEqual([blindSignIn.status, blindSignIn.body.role], [200, null], 'sign-in without rolesync holds no role');
  assert.equal((await get('/studio')).status, 503, 'still refused');
  assert.equal((await fetch(`${appUrl}/healthz`)).status, 200, 'the app is alive');
  assert.equal(app.proc.exitCode, null, 'the app did not exit');
  console.log(`example node-app: ok in ${((Date.now() - started) / 1000).toFixed(1)} s`);
} catch (e) {
  console.error(`--- app's output:\n${app?.output}\n--- rolesync's log:\n${server?.child.output}`);
  throw e;
} finally {
  await app?.stop();
  await server?.child.stop();
  await emulator.child.stop();
  db.drop();
}
