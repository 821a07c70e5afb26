#!/usr/bin/env node
// Every healing path of rolesync, driven through WorkOS's official emulator (workos/emulate):
// its signed webhooks apply; with the endpoint disabled, changes heal through `rolesync sync`; a
// login heals one; a sign-in with an AuthKit access token is answered from the database when its
// claims agree and heals when they do not; a login while WorkOS fails answers from the database; an unknown slug is kept
// until `roles add` and `replay --stored`. Run by scripts/test on both backends; scripts/try-locally
// runs it with --narrate --keep.
//
//   node scripts/e2e/workos-paths.mjs [--narrate] [--keep] sqlite|postgres...
//
// Where the emulator differs from WorkOS (rolesync's requests keep the form the official SDKs send):
// - It reads only `statuses[]=` and `events[]=`: for rolesync's `statuses=active,inactive,pending`
//   it returns every status (what rolesync asks for anyway); for `events=organization_membership...`
//   it returns every event type (organization.created, user.created...), which rolesync stores as
//   `ignored` (so the sync counts below include them).
// - It ignores `range_start`: the first `rolesync sync` reads from the emulator's first event.
// - Its event ids start `evt_`, WorkOS's `event_` (rolesync requires no prefix); webhook bodies carry
//   no `object` or `context`, and membership events no `roles` (only `role`).
// - A failed webhook is retried 3 times within about 7 s, each time with the same `t` in its signature
//   (WorkOS retries for days and signs each try afresh); none is exercised here.
// - Deleting a membership emits `.deleted` with the `updated_at` of its last change (WorkOS does the
//   same; rolesync orders a deletion after a live state of the same version).
import assert from 'node:assert/strict';
import {
  CLIENT_ID,
  EMULATOR_API_KEY,
  registerWebhook,
  rolesync,
  rolesyncClient,
  rolesyncEnv,
  sleep,
  startEmulator,
  startRolesync,
  throwawayDatabase,
  waitFor,
} from './harness.mjs';

const SECRET = 'whsec_e2e_local';
const TOKEN = 'login_token_e2e_local';

const args = process.argv.slice(2);
const narrate = args.includes('--narrate');
const keep = args.includes('--keep');
const backends = args.filter((a) => !a.startsWith('--'));
const say = (text) => narrate && console.log(`\n== ${text}`);
const show = (label, value) => narrate && console.log(`   ${label}: ${JSON.stringify(value)}`);

async function tour(backend) {
  const started = Date.now();
  const db = throwawayDatabase(backend);
  const emulator = await startEmulator();
  let server;
  try {
    const env = rolesyncEnv({ databaseUrl: db.url, emulator, secret: SECRET, loginToken: TOKEN });
    say(`rolesync migrate on ${db.url}; roles known: admin, member`);
    rolesync(['migrate'], env);
    assert.equal(rolesync(['roles', 'list'], env), 'admin\nmember\n');
    server = await startRolesync(env);
    const rs = rolesyncClient(server.url, TOKEN);
    const { api } = emulator;
    say(`rolesync serves on ${server.url}; the emulator on ${emulator.url}`);

    say('register rolesync as a webhook endpoint with the emulator (it signs every delivery)');
    const endpoint = await registerWebhook(emulator, server.url, SECRET);
    const org = (await api('POST', '/organizations', { name: 'Acme' })).id;
    const user = async (name) =>
      (await api('POST', '/user_management/users', { email: `${name}@acme.test`, first_name: name })).id;
    const [alice, bob, carol] = [await user('alice'), await user('bob'), await user('carol')];
    const member = async (user_id, role_slug) =>
      (await api('POST', '/user_management/organization_memberships', { organization_id: org, user_id, role_slug }))
        .id;
    const setRole = (om, role_slug) => api('PUT', `/user_management/organization_memberships/${om}`, { role_slug });
    const stored = (u) => rs.stored(org, u);
    const until = (what, u, check) =>
      waitFor(what, async () => {
        const row = await stored(u);
        return row && check(row) && row;
      });

    say('create memberships in WorkOS: alice admin, bob member; the webhooks apply');
    const [omAlice, omBob] = [await member(alice, 'admin'), await member(bob, 'member')];
    show('alice', await until('alice admin by webhook', alice, (r) => r.role_slug === 'admin' && r.status === 'active'));
    await until('bob member by webhook', bob, (r) => r.role_slug === 'member');
    await setRole(omBob, 'admin');
    show('bob after a role change', await until('bob admin by webhook', bob, (r) => r.role_slug === 'admin'));
    await api('PUT', `/user_management/organization_memberships/${omAlice}/deactivate`);
    show('alice after deactivation', await until('alice inactive by webhook', alice, (r) => r.status === 'inactive'));
    assert.match(rolesync(['audit', '--org', org], env), /webhook/, 'the audit trail names the webhook path');

    say('disable the webhook endpoint; change WorkOS: bob member, alice reactivated, carol added');
    await api('PUT', `/webhook_endpoints/${endpoint.id}`, { enabled: false });
    await setRole(omBob, 'member');
    await api('PUT', `/user_management/organization_memberships/${omAlice}/reactivate`);
    const omCarol = await member(carol, 'member');
    await sleep(1000);
    assert.equal((await stored(bob)).role_slug, 'admin', 'no webhook: bob is still admin in rolesync');
    assert.equal((await stored(alice)).status, 'inactive', 'no webhook: alice is still inactive');
    assert.equal(await stored(carol), null, 'no webhook: carol is unknown to rolesync');

    say('rolesync sync: one Events API catch-up pass heals all three');
    rolesync(['sync'], env);
    assert.equal((await stored(bob)).role_slug, 'member', 'sync healed bob');
    assert.equal((await stored(alice)).status, 'active', 'sync healed alice');
    assert.equal((await stored(carol)).role_slug, 'member', 'sync added carol');
    assert.match(rolesync(['audit', '--user', carol], env), /events/, 'the audit names the events path');
    rolesync(['sync'], env); // a second pass finds nothing new and changes nothing
    assert.equal((await stored(bob)).role_slug, 'member');

    say('carol becomes admin in WorkOS (no webhook); her next login heals her');
    await setRole(omCarol, 'admin');
    assert.equal((await stored(carol)).role_slug, 'member');
    const login = await rs.login(org, carol);
    show('login answer', login.body);
    assert.equal(login.status, 200);
    assert.deepEqual(
      [login.body.role, login.body.status, login.body.source, login.body.outcome],
      ['admin', 'active', 'workos', 'applied'],
    );

    say('dave signs in with AuthKit (password grant); the app passes his access token to rolesync');
    const daveEmail = 'dave@acme.test';
    const password = 'correct-horse-e2e-9';
    const dave = (await api('POST', '/user_management/users', { email: daveEmail, password, email_verified: true })).id;
    const omDave = await member(dave, 'admin');
    const authenticate = async () =>
      (await api('POST', '/user_management/authenticate', {
        grant_type: 'password', client_id: CLIENT_ID, client_secret: EMULATOR_API_KEY, email: daveEmail, password,
      })).access_token;
    const first = await authenticate();
    const signIns = [await rs.signIn(first), await rs.signIn(first)];
    show('sign-in answers', signIns.map((a) => a.body));
    assert.deepEqual(
      signIns.map((a) => [a.status, a.body.role, a.body.source]),
      [[200, 'admin', 'workos'], [200, 'admin', 'token']],
      'nothing stored (no webhook): fetched; then the claims agree: answered from the database',
    );
    say("dave becomes member in WorkOS (no webhook); his next token says so: it disagrees, rolesync fetches and heals");
    await setRole(omDave, 'member');
    const stale = await rs.signIn(first);
    assert.deepEqual([stale.body.role, stale.body.source], ['admin', 'token'], 'the old token still agrees with the stored row');
    const healed = await rs.signIn(await authenticate());
    show('sign-in answer', healed.body);
    assert.deepEqual([healed.status, healed.body.role, healed.body.source, healed.body.outcome], [200, 'member', 'workos', 'applied']);
    const forged = await rs.signIn(first.slice(0, -4) + (first.endsWith('AAAA') ? 'BBBB' : 'AAAA'));
    assert.deepEqual([forged.status, forged.body.error], [401, 'invalid_token']);

    say('WorkOS fails (emulator error hook): a login answers from the database, never fails');
    const hook = await api('POST', '/_emulate/hooks', {
      method: 'GET',
      path: '/user_management/organization_memberships',
      status: 500,
    });
    const fallback = await rs.login(org, bob);
    show('login answer', fallback.body);
    assert.equal(fallback.status, 200);
    assert.deepEqual(
      [fallback.body.role, fallback.body.source, fallback.body.workos_error],
      ['member', 'database', 'http_500'],
    );
    await api('DELETE', `/_emulate/hooks/${hook.id}`);

    say("enable the endpoint again; alice gets 'creator', a slug rolesync does not know: her role is kept");
    await api('PUT', `/webhook_endpoints/${endpoint.id}`, { enabled: true });
    await setRole(omAlice, 'creator');
    const kept = await until('alice creator refused', alice, (r) => r.workos_role_slug === 'creator');
    show('alice', kept);
    assert.equal(kept.role_slug, 'admin', 'the unknown slug is recorded, the stored role kept');
    assert.match(rolesync(['audit', '--user', alice, '--limit', '1'], env), /unknown_role/);

    say("rolesync roles add creator; rolesync replay --stored --outcome unknown_role: alice converges");
    rolesync(['roles', 'add', 'creator'], env);
    rolesync(['replay', '--stored', '--outcome', 'unknown_role'], env);
    assert.equal((await stored(alice)).role_slug, 'creator');

    say('delete bob in WorkOS: the webhook leaves a tombstone without a role');
    await api('DELETE', `/user_management/organization_memberships/${omBob}`);
    show('bob', await until('bob deleted by webhook', bob, (r) => r.status === 'deleted' && r.role_slug === null));

    if (keep) {
      console.log(`\nStill running (Ctrl-C stops both):
  emulator  ${emulator.url}   (API key sk_test_default; organization ${org})
  rolesync  ${server.url}     (login token ${TOKEN})
Try, in another terminal:
  curl -s -H 'authorization: Bearer ${TOKEN}' ${server.url}/v1/memberships/${org}/${alice}
  curl -s -X PUT -H 'authorization: Bearer sk_test_default' -H 'content-type: application/json' \\
       -d '{"role_slug":"member"}' ${emulator.url}/user_management/organization_memberships/${omAlice}
  DATABASE_URL='${db.url}' ${process.env.ROLESYNC_BIN ?? 'target/debug/rolesync'} audit --org ${org}`);
      await new Promise((resolve) => process.once('SIGINT', resolve));
    }
    console.log(`workos-paths ${backend}: ok in ${((Date.now() - started) / 1000).toFixed(1)} s`);
  } catch (e) {
    if (server) console.error(`--- rolesync's log:\n${server.child.output}`);
    throw e;
  } finally {
    await server?.child.stop();
    await emulator.child.stop();
    db.drop();
  }
}

for (const backend of backends.length ? backends : ['sqlite']) {
  await tour(backend);
}
